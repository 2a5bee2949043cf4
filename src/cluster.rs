//! Start-up of cluster mode: connects Redis, Kafka and MongoDB, and starts
//! the actors that use them.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::ConnectionManager;

use crate::actors::kafka_sink::KafkaSink;
use crate::actors::persist::PersistSupervisor;
use crate::actors::redis_bridge::RedisBridge;
use crate::actors::registry::{AttachBridge, RoomRegistry};
use crate::config::{ClusterSettings, Role, Settings};
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::store::cluster::ClusterStore;
use crate::store::mongo::MongoStore;
use crate::StartError;

/// The connected services of a cluster node.
pub(crate) struct ClusterParts {
    pub store: ClusterStore,
    /// The persist workers, on nodes with the persist role.
    pub persist: Option<Addr<PersistSupervisor>>,
    client: redis::Client,
    redis: ConnectionManager,
    metrics: Arc<Metrics>,
}

fn service(service: &'static str) -> impl Fn(ChatError) -> StartError {
    move |error| StartError::Service { service, error }
}

/// Connects every service; fails naming the first one that does not answer.
pub(crate) async fn connect(
    settings: &Settings,
    c: &ClusterSettings,
    metrics: Arc<Metrics>,
) -> Result<ClusterParts, StartError> {
    let client = redis::Client::open(c.redis.url.as_str())
        .map_err(|e| ChatError::Unavailable(e.to_string()))
        .map_err(service("redis"))?;
    // Short timeouts and retries: while Redis is down a send should get
    // `unavailable` within seconds, not wait out a long reconnect.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let redis = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|e| ChatError::Unavailable(e.to_string()))
        .map_err(service("redis"))?;
    let sink = KafkaSink::connect(&c.kafka, metrics.clone())
        .await
        .map_err(service("kafka"))?
        .start();
    let mongo = Arc::new(
        MongoStore::connect(&c.mongo)
            .await
            .map_err(service("mongo"))?,
    );
    let persist = settings.node.roles.contains(&Role::Persist).then(|| {
        PersistSupervisor::new(
            c.clone(),
            mongo.clone(),
            redis.clone(),
            metrics.clone(),
            c.kafka.persist_workers,
        )
        .start()
    });
    let store = ClusterStore::new(
        redis.clone(),
        sink,
        mongo,
        c.redis.clone(),
        settings.node.id.clone(),
    );
    Ok(ClusterParts {
        store,
        persist,
        client,
        redis,
        metrics,
    })
}

impl ClusterParts {
    /// Starts the relay and attaches it to the registry.
    pub(crate) fn start_bridge(
        self,
        settings: &Settings,
        registry: Addr<RoomRegistry>,
    ) -> Addr<RedisBridge> {
        let bridge = RedisBridge::new(
            self.client,
            self.redis,
            registry.clone(),
            settings.node.id.clone(),
            self.metrics,
        )
        .start();
        registry.do_send(AttachBridge {
            bridge: bridge.clone(),
        });
        bridge
    }
}
