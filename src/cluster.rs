//! Start-up of cluster mode: connects Redis, Kafka and MongoDB, and starts
//! the actors that use them.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;

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

/// How long one attempt at connecting to Redis may take.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a Redis command may wait for its answer.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at the first connection to Redis, at start-up.
const REDIS_START_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const REDIS_START_PAUSE: Duration = Duration::from_millis(300);

/// The settings of the Redis command connection. While Redis is away a
/// send should get `unavailable` within seconds, so every reconnect is a
/// single attempt: the connection manager makes each command issued during
/// a reconnect wait for all of it, retries and their backoff included,
/// before the command's own response timeout even starts. With two retries
/// that was up to 4 s per command against a Redis that accepts connections
/// but does not answer (one starting up, or stalled), several times over
/// in one send. Without retries a command waits for at most one connect
/// attempt, and the next command after a failed attempt starts a new one.
pub(crate) fn redis_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_number_of_retries(0)
}

/// The Redis client of the command connection and the relay's
/// subscription, with `TCP_NODELAY`: the command connection pipelines many
/// small requests, and with Nagle's algorithm one written while an earlier
/// one is unacknowledged waits for that acknowledgement.
fn redis_client(url: &str) -> Result<redis::Client, ChatError> {
    let info = url
        .into_connection_info()
        .map_err(|e| ChatError::Unavailable(e.to_string()))?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    redis::Client::open(info.set_tcp_settings(tcp))
        .map_err(|e| ChatError::Unavailable(e.to_string()))
}

/// The Redis command connection. Start-up keeps a few attempts of its own
/// (the manager's reconnects have none).
async fn connect_redis(client: &redis::Client) -> Result<ConnectionManager, ChatError> {
    let mut attempt = 1;
    loop {
        match ConnectionManager::new_with_config(client.clone(), redis_config()).await {
            Ok(redis) => return Ok(redis),
            Err(e) if attempt < REDIS_START_ATTEMPTS => {
                log::warn!("Redis does not answer yet ({e}); trying again.");
                attempt += 1;
                tokio::time::sleep(REDIS_START_PAUSE).await;
            }
            Err(e) => return Err(ChatError::Unavailable(e.to_string())),
        }
    }
}

/// Connects every service; fails naming the first one that does not answer.
pub(crate) async fn connect(
    settings: &Settings,
    c: &ClusterSettings,
    metrics: Arc<Metrics>,
) -> Result<ClusterParts, StartError> {
    let client = redis_client(&c.redis.url).map_err(service("redis"))?;
    let redis = connect_redis(&client).await.map_err(service("redis"))?;
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
