//! Start-up of cluster mode: connects Redis, Kafka and MongoDB, and starts
//! the actors that use them.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::kafka_sink::KafkaSink;
use crate::actors::messages::RelayReports;
use crate::actors::persist_supervisor::PersistSupervisor;
use crate::actors::redis_bridge::RedisBridge;
use crate::actors::registry::{AttachBridge, RoomRegistry};
use crate::actors::scheduler::{DEAD_AFTER, HEARTBEAT_SECS};
use crate::config::{ClusterSettings, RedisSettings, Role, Settings};
use crate::error::{ChatError, StartError};
use crate::metrics::Metrics;
use crate::store::cluster::ClusterStore;
use crate::store::kafka::{Durability, TopicCheck};
use crate::store::keys;
use crate::store::mongo::MongoStore;
use crate::store::redis::{self, RedisConn};

/// The connected services of a cluster node.
pub(crate) struct ClusterParts {
    pub store: ClusterStore,
    /// The persist workers, on nodes with the persist role.
    pub persist: Option<Addr<PersistSupervisor>>,
    /// The durability of the Kafka topic, as found at start-up.
    pub topic: TopicCheck,
    redis: RedisConn,
    /// For the relay, which opens its own subscription connections.
    redis_settings: RedisSettings,
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
    let redis = redis::connect(&c.redis).await.map_err(service("redis"))?;
    ensure_unique_id(&redis, &settings.node.id).await?;
    let sink = KafkaSink::connect(&c.kafka, metrics.clone())
        .await
        .map_err(service("kafka"))?;
    let topic = sink.topic_check().clone();
    if let Durability::Unsafe(unsafe_settings) = &topic.durability {
        if !c.kafka.allow_unsafe_durability {
            return Err(StartError::UnsafeDurability {
                topic: c.kafka.topic.clone(),
                settings: unsafe_settings.join(", "),
            });
        }
        log::warn!(
            "Kafka topic {} could lose acknowledged messages ({}): starting anyway because kafka.allow_unsafe_durability = true. Fit for a single development broker only.",
            c.kafka.topic,
            topic.durability.describe()
        );
    }
    let sink = sink.start();
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
        Arc::new(sink),
        mongo,
        c.kafka.clone(),
        c.redis.clone(),
        settings.node.id.clone(),
        metrics.clone(),
    );
    Ok(ClusterParts {
        store,
        persist,
        topic,
        redis,
        redis_settings: c.redis.clone(),
        metrics,
    })
}

/// Refuses to start when a live node already uses `node_id`: two nodes
/// with one id would share one heartbeat and one set of members, and the
/// sweep would never see either leave. A recent heartbeat may also be this
/// node's own previous run (killed, now restarted): only one that moves on
/// while we watch it for a heartbeat's interval is another node.
async fn ensure_unique_id(redis: &RedisConn, node_id: &str) -> Result<(), StartError> {
    let beat = |mut conn: RedisConn| {
        let node = node_id.to_string();
        async move {
            let score: Option<i64> = ::redis::cmd("ZSCORE")
                .arg(keys::NODES)
                .arg(&node)
                .query_async(&mut conn)
                .await
                .map_err(|e| ChatError::Unavailable(format!("redis: {e}")))?;
            Ok::<_, ChatError>(score)
        }
    };
    let Some(first) = beat(redis.clone()).await.map_err(service("redis"))? else {
        return Ok(());
    };
    let age = crate::protocol::now_ms() - first;
    if age > DEAD_AFTER.as_millis() as i64 {
        return Ok(());
    }
    log::info!(
        "Node id {node_id} had a heartbeat {age} ms ago; checking that no other node uses it."
    );
    tokio::time::sleep(Duration::from_secs(u64::from(HEARTBEAT_SECS) + 1)).await;
    let again = beat(redis.clone()).await.map_err(service("redis"))?;
    match again {
        Some(later) if later > first => Err(StartError::DuplicateNodeId {
            node_id: node_id.to_string(),
        }),
        _ => Ok(()),
    }
}

impl ClusterParts {
    /// Starts the relay and attaches it to the registry.
    pub(crate) fn start_bridge(
        self,
        settings: &Settings,
        registry: Addr<RoomRegistry>,
    ) -> Addr<RedisBridge> {
        let bridge = RedisBridge::new(
            self.redis_settings,
            self.redis,
            RelayReports::to(&registry),
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
