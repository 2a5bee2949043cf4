//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::atomic::Ordering::Relaxed;

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use crate::actors::app::AppState;
use crate::store::kafka::TopicCheck;

/// 200 while the process serves.
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when every dependency answers and the node is not draining, else 503;
/// the body names each dependency and its state. A cluster node also
/// reports what its start-up check found of the Kafka topic's durability:
/// an unsafe topic the settings allowed does not make the node unready.
pub(super) async fn readyz(
    app: web::Data<AppState>,
    topic: Option<web::Data<TopicCheck>>,
) -> HttpResponse {
    let deps = app.store.check().await;
    let draining = app.draining.load(Relaxed);
    let ready = !draining && deps.iter().all(|d| d.error.is_none());
    let mut map = Map::new();
    for d in deps {
        let state = match d.error {
            None => "ok".to_string(),
            Some(e) => format!("error: {e}"),
        };
        map.insert(d.name.to_string(), Value::String(state));
    }
    let status = match (ready, draining) {
        (true, _) => "ready",
        (false, true) => "draining",
        (false, false) => "unavailable",
    };
    let mut body = json!({"status": status, "dependencies": map});
    if let Some(topic) = topic {
        body["kafka"] = json!({
            "durability": topic.durability.describe(),
            "replication_factor": topic.settings.replication_factor,
            "min_insync_replicas": topic.settings.min_insync_replicas,
            "unclean_leader_election": topic.settings.unclean_leader_election,
        });
    }
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text format.
pub(super) async fn metrics(app: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(app.metrics.render())
}
