//! HTTP routes: the WebSocket upgrade, the REST API, health and metrics,
//! and the web client's static files.

mod api;
mod bearer;
mod health;
mod limit;
mod ws;

use actix_web::middleware::from_fn;
use actix_web::{web, HttpResponse};

use crate::actors::app::AppState;
use crate::error::ChatError;

/// Mounts every route. Errors of the extractors answer in the contract's
/// error shape. The REST API and the WebSocket upgrade are limited per
/// client address; health, metrics and the web client's files are not.
/// `/metrics` is here unless `http.metrics_bind` gives it its own listener
/// (see [`configure_metrics`]).
pub fn configure(cfg: &mut web::ServiceConfig, app: &web::Data<AppState>) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(256 * 1024)
            .error_handler(|e, _| ChatError::bad_request(format!("bad JSON body: {e}")).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ChatError::bad_request(format!("bad query: {e}")).into()),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ChatError::bad_request(format!("bad path: {e}")).into()),
    )
    .service(
        web::resource("/ws")
            .wrap(from_fn(limit::per_address))
            .route(web::get().to(ws::upgrade)),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz));
    if app.settings.http.metrics_bind.is_none() {
        configure_metrics(cfg);
    }
    cfg.service(
        web::scope("/api/v1")
            .wrap(from_fn(limit::per_address))
            .route("/auth/guest", web::post().to(api::guest))
            .route("/me", web::get().to(api::me))
            .route("/rooms", web::get().to(api::rooms))
            .route("/rooms/{room}/messages", web::get().to(api::messages))
            .route("/rooms/{room}/messages", web::post().to(api::post_message))
            .default_service(web::to(not_found)),
    );
    let dir = &app.settings.http.static_dir;
    if dir.join("index.html").is_file() {
        cfg.service(
            actix_files::Files::new("/", dir)
                .index_file("index.html")
                .default_handler(web::to(not_found)),
        );
    } else {
        cfg.route("/", web::get().to(placeholder))
            .default_service(web::to(not_found));
    }
}

/// Mounts `/metrics` alone: on the main listener, or on the listener of
/// `http.metrics_bind`, which operators can keep off the public network.
pub fn configure_metrics(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(health::metrics));
}

/// `404` in the contract's error shape.
pub async fn not_found() -> Result<HttpResponse, ChatError> {
    Err(ChatError::NotFound)
}

/// Served at `/` until the web client has been built.
async fn placeholder() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(concat!(
            "<!doctype html><meta charset=utf-8><title>ScalableChat</title>",
            "<h1>ScalableChat node</h1><p>The web client is not built. ",
            "Run <code>make run</code> to build it, or speak the v1 protocol at ",
            "<code>/ws</code> (see docs/PROTOCOL.md).</p>"
        ))
}
