//! Start-up of cluster mode: connects Redis, Kafka and MongoDB, and starts
//! the actors that use them.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
    let client = redis::Client::open(c.redis.url.as_str())
        .map_err(|e| ChatError::Unavailable(e.to_string()))
        .map_err(service("redis"))?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// How many complete RESP commands (arrays of bulk strings) `buf`
    /// starts with, and how many bytes they take.
    fn complete_commands(buf: &[u8]) -> (usize, usize) {
        fn line(buf: &[u8], at: usize) -> Option<(i64, usize)> {
            let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let n = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
            Some((n, end + 2))
        }
        let (mut count, mut used) = (0, 0);
        'commands: while let Some((args, mut at)) = line(buf, used) {
            for _ in 0..args {
                let Some((len, start)) = line(buf, at) else {
                    break 'commands;
                };
                at = start + len as usize + 2;
                if at > buf.len() {
                    break 'commands;
                }
            }
            count += 1;
            used = at;
        }
        (count, used)
    }

    /// One client of the fake Redis: answers `+OK` to every command while
    /// `answering`, and nothing at all otherwise; drops the connection
    /// when told to.
    async fn serve(mut socket: TcpStream, answering: bool, mut drop_all: watch::Receiver<u32>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            tokio::select! {
                _ = drop_all.changed() => return,
                read = socket.read(&mut chunk) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !answering {
                        continue;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let (count, used) = complete_commands(&buf);
                    buf.drain(..used);
                    if socket.write_all(&b"+OK\r\n".repeat(count)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// A Redis that answers until `stall` is set, then drops its
    /// connections and accepts new ones without ever answering on them
    /// (a Redis that is starting up or stalled, not one that refuses).
    async fn fake_redis() -> (String, Arc<AtomicBool>, watch::Sender<u32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let stalled = Arc::new(AtomicBool::new(false));
        let (drop_all, watcher) = watch::channel(0);
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let answering = !flag.load(Ordering::SeqCst);
                let mut told = watcher.clone();
                told.borrow_and_update();
                tokio::spawn(serve(socket, answering, told));
            }
        });
        (url, stalled, drop_all)
    }

    /// While Redis accepts connections but does not answer, every command
    /// is answered (with an error) within about one connect timeout, not
    /// after a reconnect's retries and backoff.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_fail_fast_while_redis_accepts_but_does_not_answer() {
        let (url, stalled, drop_all) = fake_redis().await;
        let client = redis::Client::open(url.as_str()).unwrap();
        let redis = connect_redis(&client).await.unwrap();
        let mut conn = redis.clone();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();

        stalled.store(true, Ordering::SeqCst);
        drop_all.send(1).unwrap();
        // Commands every 50 ms for 6 s, as sends keep arriving.
        let mut waits = Vec::new();
        for i in 0..120u32 {
            let mut conn = redis.clone();
            waits.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50) * i).await;
                let started = Instant::now();
                let result: redis::RedisResult<()> =
                    redis::cmd("GET").arg("k").query_async(&mut conn).await;
                (started.elapsed(), result.is_ok())
            }));
        }
        let mut slowest = Duration::ZERO;
        for wait in waits {
            let (took, ok) = wait.await.unwrap();
            assert!(!ok, "a stalled Redis answered");
            slowest = slowest.max(took);
        }
        eprintln!("slowest command while Redis was stalled: {slowest:?}");
        assert!(
            slowest < REDIS_CONNECT_TIMEOUT + Duration::from_millis(700),
            "a command waited {slowest:?} (connect timeout {REDIS_CONNECT_TIMEOUT:?})"
        );
    }
}
