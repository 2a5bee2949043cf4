//! The persist workers against the real services: every record of the
//! Kafka log stored in MongoDB once, through duplicates, a record that is
//! not a message, and workers killed and restarted; the lag they measure;
//! the watermarks they raise in Redis.
//!
//! Needs Redis, Kafka and MongoDB (`scripts/services up`); `make test`
//! starts them. Each test has its own topic, group, database and rooms,
//! and removes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use common::Services;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use scalable_chat::actors::persist_supervisor::{
    GetStatus, KillWorker, PersistStatus, PersistSupervisor, Stop, RESTART_DELAY,
};
use scalable_chat::actors::persist_worker::{lag_of, subscribe};
use scalable_chat::config::{ClusterSettings, KafkaSettings, MongoSettings};
use scalable_chat::metrics::Metrics;
use scalable_chat::protocol::{ChatMessage, User};
use scalable_chat::store::keys;
use scalable_chat::store::mongo::{MongoStore, COLLECTION};
use scalable_chat::store::redis::RedisConn;

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(200);

fn unique() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

/// A topic, group, database and rooms of one test, and what it produced.
struct Fixture {
    settings: ClusterSettings,
    rooms: Vec<String>,
    mongo: Arc<MongoStore>,
    /// The test's database, seen directly.
    db: mongodb::Database,
    redis: RedisConn,
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
    /// Last seq given out per room.
    seqs: Vec<u64>,
    /// Every distinct message produced.
    produced: Vec<ChatMessage>,
}

impl Fixture {
    /// Sets everything up against the local services; panics with a
    /// hint when one is down (nothing is created before they answer).
    async fn new(rooms: usize) -> Self {
        // RUST_LOG=info shows the workers' lifecycle.
        let _ = env_logger::builder().is_test(true).try_init();
        let id = unique();
        let services = Services::local();
        let settings = ClusterSettings {
            redis: services.redis_settings(),
            kafka: KafkaSettings {
                brokers: services.kafka_brokers(),
                topic: format!("test.persist.{id}"),
                partitions: 3,
                replication_factor: 1,
                // The workers are tested alone; the node's check of the
                // topic does not run here.
                allow_unsafe_durability: true,
                client: Default::default(),
                linger_ms: 2,
                message_timeout_ms: 10_000,
                group: format!("test-persist-{id}"),
                persist_workers: 2,
            },
            mongo: MongoSettings::new(services.mongo_url(), format!("test_{id}")),
        };
        let hint = "(start the services with scripts/services up)";
        let redis = services.redis().await;
        let mongo = match MongoStore::connect(&settings.mongo).await {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("MongoDB must run on {} {hint}: {e:?}", settings.mongo.url),
        };
        let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
            .set("bootstrap.servers", &settings.kafka.brokers)
            .create()
        {
            Ok(a) => a,
            Err(e) => panic!("Kafka admin client: {e}"),
        };
        let topic = NewTopic::new(&settings.kafka.topic, 3, TopicReplication::Fixed(1));
        let options = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(10)))
            .operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics([&topic], &options).await {
            Ok(results) => {
                if let Some(Err((name, code))) = results.into_iter().next() {
                    panic!("cannot create topic {name}: {code}");
                }
            }
            Err(e) => panic!("Kafka must run on {} {hint}: {e}", settings.kafka.brokers),
        }
        let producer: FutureProducer = match ClientConfig::new()
            .set("bootstrap.servers", &settings.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "15000")
            .create()
        {
            Ok(p) => p,
            Err(e) => panic!("Kafka producer: {e}"),
        };
        let db = match mongodb::Client::with_uri_str(&settings.mongo.url).await {
            Ok(client) => client.database(&settings.mongo.database),
            Err(e) => panic!("MongoDB client: {e}"),
        };
        Self {
            db,
            rooms: (0..rooms).map(|r| format!("persist-{id}-{r}")).collect(),
            seqs: vec![0; rooms],
            produced: Vec::new(),
            settings,
            mongo,
            redis,
            admin,
            producer,
        }
    }

    /// `n` new messages, round robin over the rooms.
    fn next_messages(&mut self, n: usize) -> Vec<ChatMessage> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r = (self.produced.len() + i) % self.rooms.len();
            self.seqs[r] += 1;
            let seq = self.seqs[r];
            out.push(ChatMessage {
                room: self.rooms[r].clone(),
                seq,
                id: ulid::Ulid::new().to_string(),
                user: User {
                    id: format!("u{}", i % 7),
                    name: format!("user{}", i % 7),
                },
                text: format!("message {seq} of room {r}"),
                ts: 1_700_000_000_000 + (self.produced.len() + i) as i64,
                cid: format!("cid-{}", unique()),
            });
        }
        self.produced.extend(out.iter().cloned());
        out
    }

    /// Produces messages the way the node does: JSON, key = room.
    async fn produce(&self, msgs: &[ChatMessage]) -> Result<(), String> {
        let payloads: Vec<(String, Vec<u8>)> = msgs
            .iter()
            .map(|m| serde_json::to_vec(m).map(|p| (m.room.clone(), p)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let sends = payloads
            .iter()
            .map(|(room, payload)| self.produce_raw(room, payload));
        futures_util::future::try_join_all(sends).await?;
        Ok(())
    }

    async fn produce_raw(&self, key: &str, payload: &[u8]) -> Result<(), String> {
        let record = FutureRecord::to(&self.settings.kafka.topic)
            .key(key)
            .payload(payload);
        self.producer
            .send(record, Duration::from_secs(15))
            .await
            .map(|_| ())
            .map_err(|(e, _)| format!("produce: {e}"))
    }

    /// The messages collection, to look at what was stored.
    fn messages(&self) -> mongodb::Collection<Document> {
        self.db.collection(COLLECTION)
    }

    async fn count(&self) -> Result<u64, String> {
        self.messages()
            .count_documents(doc! {})
            .await
            .map_err(|e| e.to_string())
    }

    /// The persisted watermark of each room (0 when unset).
    async fn watermarks(&self) -> Result<Vec<u64>, String> {
        let mut redis = self.redis.clone();
        let mut out = Vec::new();
        for room in &self.rooms {
            let v: Option<u64> = redis::cmd("GET")
                .arg(keys::persisted(room))
                .query_async(&mut redis)
                .await
                .map_err(|e| e.to_string())?;
            out.push(v.unwrap_or(0));
        }
        Ok(out)
    }

    /// Waits until MongoDB holds exactly every message produced and each
    /// room's watermark is its highest seq; fails after `within`, or at
    /// once if MongoDB holds more documents than were produced.
    async fn settle(&self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let expected = self.produced.len() as u64;
        loop {
            let count = self.count().await?;
            let marks = self.watermarks().await?;
            if count > expected {
                return Err(format!("{count} documents for {expected} messages"));
            }
            if count == expected && marks == self.seqs {
                break;
            }
            if started.elapsed() > within {
                return Err(format!(
                    "after {within:?}: {count} of {expected} documents, watermarks {marks:?}, expected {:?}",
                    self.seqs
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let took = started.elapsed();
        // Each message exactly once, and nothing else.
        let ids: Vec<Document> = self
            .messages()
            .find(doc! {})
            .projection(doc! {"_id": 1})
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let stored: HashSet<String> = ids
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(String::from))
            .collect();
        let produced: HashSet<String> = self.produced.iter().map(|m| m.id.clone()).collect();
        if ids.len() != produced.len() || stored != produced {
            return Err(format!(
                "stored ids differ from produced: {} stored ({} distinct), {} produced",
                ids.len(),
                stored.len(),
                produced.len()
            ));
        }
        Ok(took)
    }

    /// Removes the topic, the database and the Redis keys.
    async fn cleanup(&self) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = self
            .admin
            .delete_topics(&[&self.settings.kafka.topic], &options)
            .await
        {
            eprintln!("cannot delete the test topic: {e}");
        }
        if let Err(e) = self.db.drop().await {
            eprintln!("cannot drop the test database: {e:?}");
        }
        let keys: Vec<String> = self.rooms.iter().map(|r| keys::persisted(r)).collect();
        let mut redis = self.redis.clone();
        let deleted: redis::RedisResult<()> =
            redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
        if let Err(e) = deleted {
            eprintln!("cannot delete the test keys: {e}");
        }
    }
}

/// Runs `scenario` on a fresh fixture, cleans up whatever happened, then
/// fails if the scenario did.
async fn run<F>(rooms: usize, scenario: F)
where
    F: for<'a> FnOnce(
        &'a mut Fixture,
    ) -> futures_util::future::LocalBoxFuture<'a, Result<(), String>>,
{
    let mut fx = Fixture::new(rooms).await;
    let result = scenario(&mut fx).await;
    fx.cleanup().await;
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn start(fx: &Fixture, metrics: &Arc<Metrics>, workers: usize) -> Addr<PersistSupervisor> {
    PersistSupervisor::new(
        fx.settings.clone(),
        fx.mongo.clone(),
        fx.redis.clone(),
        metrics.clone(),
        workers,
    )
    .start()
}

#[actix::test]
async fn workers_store_each_message_once_and_survive_kills() {
    run(3, |fx| Box::pin(stores_once_and_survives_kills(fx))).await;
}

async fn stores_once_and_survives_kills(fx: &mut Fixture) -> Result<(), String> {
    // 1,000 messages, 50 of them twice (a producer retry), and a record
    // that is not a message at all.
    let first = fx.next_messages(1000);
    fx.produce(&first).await?;
    fx.produce_raw(&fx.rooms[0], b"{not json").await?;
    let again: Vec<ChatMessage> = first.iter().step_by(20).cloned().collect();
    fx.produce(&again).await?;
    let records = (first.len() + 1 + again.len()) as i64;

    // Lag as the workers measure it: a consumer of another group that
    // took one record has all the others still to go.
    let mut probe = fx.settings.kafka.clone();
    probe.group = format!("{}-probe", probe.group);
    let consumer = Arc::new(subscribe(&probe, 99).map_err(|e| format!("{e:?}"))?);
    match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
        Ok(Ok(_)) => {}
        other => return Err(format!("probe consumer got no record: {other:?}")),
    }
    let measured = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || lag_of(&consumer))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    if measured != records - 1 {
        return Err(format!("lag {measured}, expected {}", records - 1));
    }
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .map_err(|e| e.to_string())?;

    let metrics = Arc::new(Metrics::default());
    let supervisor = start(fx, &metrics, 2);
    let took = fx.settle(Duration::from_secs(30)).await?;
    eprintln!("1,000 messages stored in {took:?} (including the group joining).");
    let stored = metrics.persist_messages.load(Relaxed);
    if !(1000..=records as u64).contains(&stored) || metrics.persist_batches.load(Relaxed) == 0 {
        return Err(format!("metrics: {stored} messages persisted"));
    }

    // A second burst while workers are killed and restarted.
    let second = fx.next_messages(1000);
    let producing = async {
        for chunk in second.chunks(100) {
            fx.produce(chunk).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, String>(())
    };
    let killing = async {
        let mut killed = Vec::new();
        for (after_ms, index) in [(200, 0), (700, 1), (1800, 0)] {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            killed.push(supervisor.send(KillWorker { index }).await);
        }
        killed
    };
    let (produced, killed) = futures_util::join!(producing, killing);
    produced?;
    if killed.iter().any(|k| !matches!(k, Ok(true))) {
        return Err(format!(
            "every kill should find a running worker: {killed:?}"
        ));
    }
    fx.settle(Duration::from_secs(60)).await?;
    // The last killed worker comes back after the restart delay.
    let want = PersistStatus {
        running: 2,
        restarts: 3,
    };
    let deadline = Instant::now() + RESTART_DELAY + Duration::from_secs(10);
    loop {
        let status = supervisor
            .send(GetStatus)
            .await
            .map_err(|e| e.to_string())?;
        if status == want {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("status after three kills: {status:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
    if supervisor.send(KillWorker { index: 7 }).await != Ok(false) {
        return Err("a kill of a worker that does not exist finds nothing".into());
    }
    supervisor.send(Stop).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Throughput into MongoDB: `PERSIST_BENCH_MESSAGES` (default 20,000)
/// messages over 30 rooms, `PERSIST_BENCH_WORKERS` (default 2) workers.
/// `cargo test --release persist_throughput -- --ignored --nocapture`
#[actix::test]
#[ignore = "a measurement, not a check"]
async fn persist_throughput() {
    run(30, |fx| Box::pin(throughput(fx))).await;
}

async fn throughput(fx: &mut Fixture) -> Result<(), String> {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = env("PERSIST_BENCH_MESSAGES", 20_000);
    let workers = env("PERSIST_BENCH_WORKERS", 2);
    let msgs = fx.next_messages(n);
    fx.produce(&msgs).await?;
    let metrics = Arc::new(Metrics::default());
    let supervisor = start(fx, &metrics, workers);
    let took = fx.settle(Duration::from_secs(600)).await?;
    eprintln!(
        "{n} messages, {workers} workers: {took:?}, {:.0} messages/s, {} batches.",
        n as f64 / took.as_secs_f64(),
        metrics.persist_batches.load(Relaxed)
    );
    supervisor.send(Stop).await.map_err(|e| e.to_string())?;
    Ok(())
}
