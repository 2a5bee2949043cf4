//! [`Node`]: the whole server. Opens the store (embedded, or the cluster's
//! services), starts the actors and the HTTP server, and on SIGTERM drains:
//! stops accepting, answers what it accepted, closes the sessions.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};

use crate::actors::app::AppState;
use crate::actors::messages::Publish;
use crate::actors::persist_supervisor::{PersistSupervisor, Stop as PersistStop};
use crate::actors::redis_bridge::{RedisBridge, Retire};
use crate::actors::registry::{Drain, RoomRegistry};
use crate::actors::scheduler::Scheduler;
use crate::actors::session;
use crate::cluster;
use crate::config::{redact_url, Settings};
use crate::error::StartError;
use crate::http;
use crate::metrics::Metrics;
use crate::store::embedded::EmbeddedStore;
use crate::store::MessageStore;

/// A running node.
pub struct Node {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    app: Arc<AppState>,
    server: Server,
    handle: ServerHandle,
    /// The listener of `http.metrics_bind`, serving `/metrics` alone.
    metrics_server: Option<Server>,
    /// Stopped when draining, so its partitions move to other nodes at once.
    persist: Option<Addr<PersistSupervisor>>,
    /// Cluster mode: told when draining, to take the node off the live ones.
    bridge: Option<Addr<RedisBridge>>,
}

impl Node {
    /// Opens the store, starts the actors and binds the HTTP server. Must be
    /// called inside an actix system.
    pub async fn start(settings: Settings) -> Result<Node, StartError> {
        let metrics = Arc::new(Metrics::default());
        // The registry's address exists before the registry, because the
        // store reports durable messages to it.
        let registry_ctx = actix::Context::<RoomRegistry>::new();
        let bus = registry_ctx.address();
        let (store, cluster): (Arc<dyn MessageStore>, _) = match settings.cluster() {
            None => {
                let store = EmbeddedStore::open(
                    &settings.node.data_dir,
                    Box::new(move |message| bus.do_send(Publish { message })),
                )
                .map_err(StartError::Store)?;
                (Arc::new(store), None)
            }
            Some(c) => {
                let parts = cluster::connect(&settings, &c, metrics.clone()).await?;
                (Arc::new(parts.store.clone()), Some(parts))
            }
        };
        let registry = registry_ctx.run(RoomRegistry::new(
            settings.node.id.clone(),
            store.clone(),
            Duration::from_millis(settings.limits.fanout_window_ms),
            metrics.clone(),
        ));
        let persist = cluster.as_ref().and_then(|parts| parts.persist.clone());
        let topic = cluster
            .as_ref()
            .map(|parts| web::Data::new(parts.topic.clone()));
        let bridge = cluster.map(|parts| parts.start_bridge(&settings, registry.clone()));
        Scheduler::new(
            &settings,
            metrics.clone(),
            registry.clone(),
            bridge.clone(),
            store.clone(),
        )
        .start();
        let app = Arc::new(AppState::new(settings, store, registry, metrics));
        let data = web::Data::from(app.clone());
        let bind = app.settings.http.bind;
        let durability = topic.as_ref().map(|t| t.durability.describe());
        let mut server = HttpServer::new(move || {
            let mut app = App::new().app_data(data.clone());
            if let Some(topic) = &topic {
                app = app.app_data(topic.clone());
            }
            app.configure(|cfg| http::configure(cfg, &data))
        })
        .on_connect(|conn, _| session::configure_connection(conn))
        // Chat frames are small and each should leave at once: with Nagle's
        // algorithm a frame written while the previous one is not yet
        // acknowledged waits for that acknowledgement (actix leaves the
        // socket's default, which has it on).
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(5);
        if app.settings.http.workers > 0 {
            server = server.workers(app.settings.http.workers);
        }
        let server = server
            .bind(bind)
            .map_err(|source| StartError::Bind { addr: bind, source })?;
        let addr = server.addrs().first().copied().unwrap_or(bind);
        let server = server.run();
        let handle = server.handle();
        let metrics_server = match app.settings.http.metrics_bind {
            Some(bind) => Some(metrics_server(web::Data::from(app.clone()), bind)?),
            None => None,
        };
        match app.settings.cluster() {
            None => log::info!(
                "Node {} listening on http://{addr} (standalone, store in {}).",
                app.settings.node.id,
                app.settings.node.data_dir.display()
            ),
            // The URLs may carry passwords.
            Some(c) => log::info!(
                "Node {} listening on http://{addr} (cluster: redis {}, kafka {} with durability {}, mongo {}).",
                app.settings.node.id,
                redact_url(&c.redis.url),
                redact_url(&c.kafka.brokers),
                durability.as_deref().unwrap_or("unknown"),
                redact_url(&c.mongo.url)
            ),
        }
        Ok(Node {
            addr,
            app,
            server,
            handle,
            metrics_server,
            persist,
            bridge,
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn serve(self) -> Result<(), StartError> {
        let Node {
            app,
            server,
            handle,
            metrics_server,
            persist,
            bridge,
            ..
        } = self;
        // Metrics stay readable while the node drains; they stop with it.
        let metrics_handle = metrics_server.map(|m| {
            let handle = m.handle();
            actix_web::rt::spawn(m);
            handle
        });
        let mut server = actix_web::rt::spawn(server);
        tokio::select! {
            ended = &mut server => {
                return match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(StartError::Server(e)),
                    Err(e) => Err(StartError::Server(std::io::Error::other(e))),
                };
            }
            () = shutdown_signal() => {}
        }
        drain(&app, &handle).await;
        if let Some(persist) = persist {
            // Leave the consumer group now rather than at its timeout.
            let _ = tokio::time::timeout(Duration::from_secs(5), persist.send(PersistStop)).await;
        }
        if let Some(bridge) = bridge {
            let _ = tokio::time::timeout(Duration::from_secs(2), bridge.send(Retire)).await;
        }
        let _ = server.await;
        if let Some(handle) = metrics_handle {
            handle.stop(true).await;
        }
        Ok(())
    }
}

/// The listener of `http.metrics_bind`: `/metrics` and nothing else (other
/// paths answer 404), on one worker, so that the metrics can be kept off
/// the network clients reach.
fn metrics_server(data: web::Data<AppState>, bind: SocketAddr) -> Result<Server, StartError> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(http::configure_metrics)
            .default_service(web::to(http::not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(bind)
    .map_err(|source| StartError::Bind { addr: bind, source })?;
    log::info!(
        "Metrics on http://{}/metrics.",
        server.addrs().first().copied().unwrap_or(bind)
    );
    Ok(server.run())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            log::error!("Cannot listen for SIGTERM: {e}.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Stops accepting, answers every accepted message, closes the sessions and
/// stops the server.
async fn drain(app: &AppState, handle: &ServerHandle) {
    let started = Instant::now();
    let deadline = Duration::from_secs(app.settings.http.shutdown_timeout_secs);
    log::info!("Draining: no new connections or messages.");
    app.draining.store(true, Relaxed);
    handle.pause().await;
    let sessions = app.registry.send(Drain).await.unwrap_or(0);
    let _ = tokio::time::timeout(deadline, app.store.flush()).await;
    while app.metrics.connections.load(Relaxed) > 0 && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = app.metrics.connections.load(Relaxed);
    if left > 0 {
        log::warn!("Drain deadline reached with {left} sessions still open.");
    }
    handle.stop(true).await;
    log::info!(
        "Drained {sessions} sessions in {} ms; exiting.",
        started.elapsed().as_millis()
    );
}
