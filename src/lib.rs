//! ScalableChat: a real-time chat node. Clients speak the v1 contract
//! (`docs/PROTOCOL.md`) over WebSocket and HTTP; the node keeps every
//! acknowledged message durable.
//!
//! The binary only wires settings and logging; [`Node::start`] is the whole
//! server, so tests start the very same thing.

pub mod actors;
pub mod auth;
mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};

use actors::persist::{PersistSupervisor, Stop as PersistStop};
use actors::registry::{Drain, Publish, RoomRegistry};
use actors::scheduler::Scheduler;
use auth::Tokens;
use config::Settings;
use limits::{AddressSlots, UserRates};
use metrics::Metrics;
use store::embedded::EmbeddedStore;
use store::MessageStore;

/// What every request handler and session shares.
pub struct AppState {
    pub settings: Settings,
    pub tokens: Tokens,
    pub store: Arc<dyn MessageStore>,
    pub registry: Addr<RoomRegistry>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: new messages are refused while the node drains.
    pub draining: AtomicBool,
    /// One token bucket per user, over all of the user's connections.
    pub user_rates: UserRates,
    /// WebSocket connections open per client address.
    pub address_slots: Arc<AddressSlots>,
    session_ids: AtomicU64,
}

impl AppState {
    /// A node-unique number for a new session.
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Relaxed)
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the message store: {0:?}")]
    Store(error::ChatError),
    #[error("cannot reach {service}: {error:?}")]
    Service {
        service: &'static str,
        error: error::ChatError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Server(std::io::Error),
}

/// A running node.
pub struct Node {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    app: Arc<AppState>,
    server: Server,
    handle: ServerHandle,
    /// Stopped when draining, so its partitions move to other nodes at once.
    persist: Option<Addr<PersistSupervisor>>,
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
            metrics.clone(),
        ));
        let persist = cluster.as_ref().and_then(|parts| parts.persist.clone());
        let bridge = cluster.map(|parts| parts.start_bridge(&settings, registry.clone()));
        Scheduler::new(&settings, metrics.clone(), registry.clone(), bridge).start();
        let app = Arc::new(AppState {
            tokens: Tokens::new(&settings.auth.secret, settings.auth.token_ttl_secs),
            store,
            registry,
            metrics,
            draining: AtomicBool::new(false),
            user_rates: UserRates::new(
                settings.limits.user_rate_per_sec,
                settings.limits.user_rate_burst,
            ),
            address_slots: Arc::new(AddressSlots::new(
                settings.limits.max_connections_per_address,
            )),
            session_ids: AtomicU64::new(1),
            settings,
        });
        let data = web::Data::from(app.clone());
        let bind = app.settings.http.bind;
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .configure(|cfg| http::configure(cfg, &data))
        })
        .on_connect(|conn, _| actors::session::configure_connection(conn))
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
        match app.settings.cluster() {
            None => log::info!(
                "Node {} listening on http://{addr} (standalone, store in {}).",
                app.settings.node.id,
                app.settings.node.data_dir.display()
            ),
            Some(c) => log::info!(
                "Node {} listening on http://{addr} (cluster: redis {}, kafka {}, mongo {}).",
                app.settings.node.id,
                c.redis.url,
                c.kafka.brokers,
                c.mongo.url
            ),
        }
        Ok(Node {
            addr,
            app,
            server,
            handle,
            persist,
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn serve(self) -> Result<(), StartError> {
        let Node {
            app,
            server,
            handle,
            persist,
            ..
        } = self;
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
        let _ = server.await;
        Ok(())
    }
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
