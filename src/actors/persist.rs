//! `PersistSupervisor`: stores the Kafka log of accepted messages in MongoDB,
//! on nodes with the persist role in cluster mode.
//!
//! The supervisor runs a fixed number of consumer-group workers, each a task
//! with its own Kafka consumer, and restarts one that fails or panics. A
//! worker takes a batch of records, inserts their messages into MongoDB
//! (retrying until the write succeeds), raises each room's persisted
//! watermark in Redis, and only then commits the batch's offsets. A crash
//! anywhere replays records whose messages may already be stored; the store
//! keys documents by message id, so a replay never duplicates anything.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as KafkaMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use tokio::task::{AbortHandle, JoinError};

use crate::config::{ClusterSettings, KafkaSettings};
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;
use crate::store::keys;
use crate::store::mongo::{check_storable, MongoStore};

/// Aborts one worker's task, as a crash would; the supervisor restarts it
/// after its usual back-off. Answers whether a worker was running there.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct KillWorker {
    pub index: usize,
}

/// Stops every worker, then the supervisor itself (a draining node, a test
/// that is done). Their consumers leave the group while closing, so the
/// partitions move to other nodes at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Asks how many workers run now and how often they were restarted.
#[derive(Message)]
#[rtype(result = "PersistStatus")]
pub struct GetStatus;

/// The answer to [`GetStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistStatus {
    /// Workers whose task is running (not waiting to be restarted).
    pub running: usize,
    /// Restarts since the supervisor started, whatever their cause.
    pub restarts: u64,
}

/// How long a worker waits for more records after the first of a batch:
/// long enough to fill batches under load, short enough to add little
/// latency to the history of a quiet room.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// First pause before retrying a failed MongoDB write; doubled each time.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// Longest pause between write retries, so a recovered MongoDB is used
/// again within seconds.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Pause after a consumer error before asking Kafka again.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Consecutive consumer errors after which a worker gives up on its
/// consumer and lets the supervisor start a fresh one.
const MAX_RECV_ERRORS: u32 = 20;

/// How often consumer lag is measured and published. Short, so that the
/// gauge reads 0 within seconds of the workers catching up (each
/// measurement is one watermark query per assigned partition).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// How long a watermark or committed-offset query for lag may take.
const LAG_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for Redis when raising watermarks: a Redis outage must not
/// hold up storing messages, it only delays the trimming of the cache.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause before restarting a failed worker, so a worker that fails at once
/// (Kafka down) does not spin.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// How long the group waits for a silent worker before giving its
/// partitions to another: shorter than librdkafka's 45 s default, so a
/// crashed node delays history by seconds, not a minute.
const SESSION_TIMEOUT_MS: &str = "10000";

/// Raises a room's persisted watermark to `ARGV[1]` unless it is already
/// higher, atomically (two workers may store the same room around a
/// rebalance). Returns the watermark after the call.
const RAISE_WATERMARK: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local seq = tonumber(ARGV[1])
if seq > current then
  redis.call('SET', KEYS[1], ARGV[1])
  return seq
end
return current
";

/// Runs the persist workers of a node and restarts a failed one.
pub struct PersistSupervisor {
    cluster: ClusterSettings,
    mongo: Arc<MongoStore>,
    redis: ConnectionManager,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    restarts: u64,
    /// Source of [`Slot::generation`] values.
    generations: u64,
}

/// One worker place of the supervisor.
struct Slot {
    /// Aborts the running task; `None` while waiting for a restart.
    abort: Option<AbortHandle>,
    /// Tells the end of the current task from a late report of an earlier
    /// task of the same slot.
    generation: u64,
    /// Lag of the partitions assigned to this slot's worker, last measured.
    lag: Arc<AtomicI64>,
}

impl PersistSupervisor {
    pub fn new(
        cluster: ClusterSettings,
        mongo: Arc<MongoStore>,
        redis: ConnectionManager,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Self {
        let slots = (0..workers)
            .map(|_| Slot {
                abort: None,
                generation: 0,
                lag: Arc::new(AtomicI64::new(0)),
            })
            .collect();
        Self {
            cluster,
            mongo,
            redis,
            metrics,
            slots,
            restarts: 0,
            generations: 0,
        }
    }

    /// Starts the worker of slot `index` and watches its task.
    fn start_worker(&mut self, index: usize, ctx: &mut Context<Self>) {
        self.generations += 1;
        let generation = self.generations;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.lag.store(0, Relaxed);
        let worker = Worker {
            index,
            kafka: self.cluster.kafka.clone(),
            batch_size: self.cluster.mongo.batch_size.max(1),
            mongo: self.mongo.clone(),
            redis: self.redis.clone(),
            script: redis::Script::new(RAISE_WATERMARK),
            metrics: self.metrics.clone(),
            lag: slot.lag.clone(),
            lag_measured: Instant::now(),
            lag_task: None,
        };
        let handle = actix::spawn(worker.run());
        slot.abort = Some(handle.abort_handle());
        slot.generation = generation;
        ctx.spawn(
            fut::wrap_future::<_, Self>(handle)
                .map(move |outcome, act, ctx| act.worker_ended(index, generation, outcome, ctx)),
        );
    }

    /// A worker's task ended: restart it unless it stopped on purpose.
    fn worker_ended(
        &mut self,
        index: usize,
        generation: u64,
        outcome: Result<Result<(), ChatError>, JoinError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.abort = None;
        slot.lag.store(0, Relaxed);
        match outcome {
            Ok(Ok(())) => {
                log::info!("worker={index}: Persist worker stopped.");
                return;
            }
            Ok(Err(e)) => log::warn!(
                "worker={index}: Persist worker failed: {}; restarting in {RESTART_DELAY:?}.",
                detail(&e)
            ),
            Err(e) if e.is_cancelled() => log::warn!(
                "worker={index}: Persist worker was killed; restarting in {RESTART_DELAY:?}."
            ),
            Err(e) => log::warn!(
                "worker={index}: Persist worker panicked: {e}; restarting in {RESTART_DELAY:?}."
            ),
        }
        self.restarts += 1;
        ctx.run_later(RESTART_DELAY, move |act, ctx| act.start_worker(index, ctx));
    }
}

impl Actor for PersistSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "topic={} group={} database={}: Starting {} persist workers.",
            self.cluster.kafka.topic,
            self.cluster.kafka.group,
            self.cluster.mongo.database,
            self.slots.len()
        );
        for index in 0..self.slots.len() {
            self.start_worker(index, ctx);
        }
        // The node's gauge is the sum over its workers, each of which
        // measures only the partitions it holds.
        ctx.run_interval(LAG_INTERVAL, |act, _| {
            let lag = act.slots.iter().map(|s| s.lag.load(Relaxed)).sum();
            act.metrics.consumer_lag.store(lag, Relaxed);
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Worker tasks are not tied to this actor's context: stop them too.
        for slot in &mut self.slots {
            if let Some(abort) = slot.abort.take() {
                abort.abort();
            }
        }
        log::info!("Persist workers stopped.");
    }
}

impl Handler<KillWorker> for PersistSupervisor {
    type Result = bool;

    fn handle(&mut self, msg: KillWorker, _: &mut Context<Self>) -> bool {
        match self.slots.get(msg.index).and_then(|s| s.abort.as_ref()) {
            Some(abort) => {
                log::warn!("worker={}: Killing a persist worker on request.", msg.index);
                abort.abort();
                true
            }
            None => false,
        }
    }
}

impl Handler<Stop> for PersistSupervisor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        // `stopped` aborts the worker tasks.
        ctx.stop();
    }
}

impl Handler<GetStatus> for PersistSupervisor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(PersistStatus {
            running: self.slots.iter().filter(|s| s.abort.is_some()).count(),
            restarts: self.restarts,
        })
    }
}

/// The Kafka consumer of one worker.
type PersistConsumer = StreamConsumer<PersistContext>;

/// One consumer-group worker: everything its task owns.
struct Worker {
    index: usize,
    kafka: KafkaSettings,
    /// Most records in one batch (`mongo.batch_size`).
    batch_size: usize,
    mongo: Arc<MongoStore>,
    redis: ConnectionManager,
    /// The watermark script, hashed once.
    script: redis::Script,
    metrics: Arc<Metrics>,
    /// Where this worker publishes its lag for the supervisor to sum.
    lag: Arc<AtomicI64>,
    lag_measured: Instant,
    /// The lag measurement in flight, if any (it runs on a blocking thread).
    lag_task: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    /// Consumes until the task is aborted; returns only on a failure that a
    /// fresh consumer may cure.
    async fn run(mut self) -> Result<(), ChatError> {
        let guard = ConsumerGuard(Some(Arc::new(subscribe(&self.kafka, self.index)?)));
        let Some(consumer) = guard.0.as_deref() else {
            return Err(ChatError::Internal("the consumer guard is empty".into()));
        };
        log::info!(
            "worker={} topic={}: Persist worker subscribed.",
            self.index,
            self.kafka.topic
        );
        let mut errors = 0;
        loop {
            self.measure_lag(&guard);
            // Wake up now and then while idle, to keep measuring lag.
            let first = match tokio::time::timeout(LAG_INTERVAL, consumer.recv()).await {
                Err(_idle) => continue,
                Ok(Ok(record)) => record,
                Ok(Err(e)) => {
                    errors += 1;
                    if errors >= MAX_RECV_ERRORS {
                        return Err(ChatError::Unavailable(format!(
                            "{errors} Kafka consumer errors in a row, the last: {e}"
                        )));
                    }
                    log::warn!("worker={}: Kafka consumer error: {e}.", self.index);
                    tokio::time::sleep(RECV_ERROR_PAUSE).await;
                    continue;
                }
            };
            errors = 0;
            let mut batch = Batch::default();
            batch.take(self.index, &first);
            // Release the record's buffer before waiting for more.
            drop(first);
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while batch.records < self.batch_size {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(record)) => batch.take(self.index, &record),
                    Ok(Err(e)) => {
                        log::warn!("worker={}: Kafka consumer error: {e}.", self.index);
                        break;
                    }
                    Err(_window_over) => break,
                }
            }
            self.store(consumer, batch).await;
        }
    }

    /// Stores a batch, raises the watermarks, then commits its offsets.
    async fn store(&mut self, consumer: &PersistConsumer, batch: Batch) {
        let n = batch.messages.len();
        if n > 0 {
            let started = Instant::now();
            let new = self.insert(&batch.messages).await;
            self.raise_watermarks(&batch.messages).await;
            self.metrics.persist_batches.fetch_add(1, Relaxed);
            self.metrics.persist_messages.fetch_add(n as u64, Relaxed);
            log::debug!(
                "worker={} messages={n} new={new} elapsed={:?}: Batch persisted.",
                self.index,
                started.elapsed()
            );
        }
        let mut offsets = TopicPartitionList::with_capacity(batch.next_offsets.len());
        for (topic, partition, next) in &batch.next_offsets {
            if let Err(e) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                log::warn!(
                    "worker={}: Cannot list an offset to commit: {e}.",
                    self.index
                );
            }
        }
        // Asynchronous: the result arrives in `PersistContext::commit_callback`.
        // A lost commit only replays records that are already stored.
        if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
            log::warn!(
                "worker={}: Committing offsets failed: {e}; the batch will be stored again after a restart.",
                self.index
            );
        }
    }

    /// Inserts until MongoDB accepts the batch; never gives up, since the
    /// offsets must not move past records that are not stored.
    async fn insert(&self, messages: &[ChatMessage]) -> usize {
        let mut pause = RETRY_FIRST;
        let mut attempt = 1u32;
        loop {
            match self.mongo.insert_batch(messages).await {
                Ok(new) => {
                    if attempt > 1 {
                        log::info!(
                            "worker={} attempt={attempt}: MongoDB write succeeded again.",
                            self.index
                        );
                    }
                    return new;
                }
                Err(e) => {
                    log::warn!(
                        "worker={} attempt={attempt}: MongoDB write failed: {}; retrying in {pause:?}.",
                        self.index,
                        detail(&e)
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                    attempt += 1;
                }
            }
        }
    }

    /// Raises each room's persisted watermark to the batch's highest seq of
    /// that room. A failure only delays the trimming of the Redis cache, so
    /// it is logged and passed over.
    async fn raise_watermarks(&self, messages: &[ChatMessage]) {
        let mut highest: BTreeMap<&str, u64> = BTreeMap::new();
        for m in messages {
            let seq = highest.entry(m.room.as_str()).or_default();
            *seq = (*seq).max(m.seq);
        }
        // One script call per room (each room's keys live in their own
        // cluster slot); the connection pipelines them.
        let calls = highest.into_iter().map(|(room, seq)| {
            let mut redis = self.redis.clone();
            let script = &self.script;
            async move {
                let result: redis::RedisResult<u64> = script
                    .key(keys::persisted(room))
                    .arg(seq)
                    .invoke_async(&mut redis)
                    .await;
                (room, seq, result)
            }
        });
        let joined = futures_util::future::join_all(calls);
        let Ok(results) = tokio::time::timeout(WATERMARK_TIMEOUT, joined).await else {
            log::warn!(
                "worker={}: Raising the persisted watermarks timed out.",
                self.index
            );
            return;
        };
        for (room, seq, result) in results {
            if let Err(e) = result {
                log::warn!(
                    "worker={} room={room} seq={seq}: Raising the persisted watermark failed: {e}.",
                    self.index
                );
            }
        }
    }

    /// Every [`LAG_INTERVAL`], measures this worker's lag on a blocking
    /// thread (the watermark queries wait for the broker).
    fn measure_lag(&mut self, consumer: &ConsumerGuard) {
        if self.lag_measured.elapsed() < LAG_INTERVAL
            || self.lag_task.as_ref().is_some_and(|t| !t.is_finished())
        {
            return;
        }
        self.lag_measured = Instant::now();
        let Some(consumer) = consumer.0.clone() else {
            return;
        };
        let lag = self.lag.clone();
        let index = self.index;
        self.lag_task = Some(tokio::task::spawn_blocking(move || {
            match lag_of(&consumer) {
                Ok(n) => lag.store(n, Relaxed),
                Err(e) => log::debug!("worker={index}: Cannot measure consumer lag: {e}."),
            }
        }));
    }
}

/// A consumer of the topic in the persist group, committing by hand.
fn subscribe(kafka: &KafkaSettings, worker: usize) -> Result<PersistConsumer, ChatError> {
    let kafka_error =
        |doing: &str, e: KafkaError| ChatError::Unavailable(format!("Kafka: cannot {doing}: {e}"));
    let consumer: PersistConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group)
        .set("client.id", format!("scalable-chat-persist-{worker}"))
        // Offsets are committed only after MongoDB holds the batch.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .create_with_context(PersistContext { worker })
        .map_err(|e| kafka_error("create a consumer", e))?;
    consumer
        .subscribe(&[&kafka.topic])
        .map_err(|e| kafka_error("subscribe to the topic", e))?;
    Ok(consumer)
}

/// Records not yet stored on the partitions assigned to `consumer`: the
/// high watermark minus the next offset the worker will take (its position,
/// or the group's committed offset before the first fetch).
fn lag_of(consumer: &PersistConsumer) -> KafkaResult<i64> {
    let positions = consumer.position()?;
    let mut lag = 0;
    let mut unknown = TopicPartitionList::new();
    let mut watermarks = Vec::new();
    for p in positions.elements() {
        let (low, high) = consumer.fetch_watermarks(p.topic(), p.partition(), LAG_QUERY_TIMEOUT)?;
        match p.offset() {
            Offset::Offset(next) => lag += (high - next).max(0),
            _ => {
                unknown.add_partition(p.topic(), p.partition());
                watermarks.push((p.topic().to_string(), p.partition(), low, high));
            }
        }
    }
    if unknown.count() > 0 {
        let committed = consumer.committed_offsets(unknown, LAG_QUERY_TIMEOUT)?;
        for (topic, partition, low, high) in watermarks {
            let next = match committed
                .find_partition(&topic, partition)
                .map(|p| p.offset())
            {
                Some(Offset::Offset(next)) => next,
                // Nothing committed: the group starts from the earliest.
                _ => low,
            };
            lag += (high - next).max(0);
        }
    }
    Ok(lag)
}

/// The records of one batch: what to store and what to commit.
#[derive(Default)]
struct Batch {
    /// Records taken, stored or skipped.
    records: usize,
    messages: Vec<ChatMessage>,
    /// Per partition, one past the last record taken: the offset to commit.
    next_offsets: Vec<(String, i32, i64)>,
}

impl Batch {
    /// Takes one record. A record that is not a storable chat message is
    /// logged and skipped (its offset still moves on), so it never blocks
    /// its partition.
    fn take(&mut self, worker: usize, record: &BorrowedMessage<'_>) {
        self.records += 1;
        let (topic, partition, offset) = (record.topic(), record.partition(), record.offset());
        match self
            .next_offsets
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some((_, _, next)) => *next = (*next).max(offset + 1),
            None => self
                .next_offsets
                .push((topic.to_string(), partition, offset + 1)),
        }
        let decoded = match record.payload() {
            None => Err("the record has no payload".to_string()),
            Some(payload) => serde_json::from_slice::<ChatMessage>(payload)
                .map_err(|e| format!("not a chat message: {e}"))
                .and_then(|m| check_storable(&m).map(|()| m).map_err(|e| detail(&e))),
        };
        match decoded {
            Ok(message) => self.messages.push(message),
            Err(e) => log::error!(
                "worker={worker} topic={topic} partition={partition} offset={offset}: Skipped a record that cannot be stored: {e}."
            ),
        }
    }
}

/// Owns a worker's consumer and closes it on a blocking thread when the
/// worker ends or is aborted: closing leaves the group, which waits for the
/// broker, and must not stall the thread that runs the actors.
struct ConsumerGuard(Option<Arc<PersistConsumer>>);

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(consumer));
            }
            Err(_) => drop(consumer),
        }
    }
}

/// Callbacks of a worker's consumer: rebalances and commit results are
/// worth a log line.
struct PersistContext {
    worker: usize,
}

impl ClientContext for PersistContext {}

impl ConsumerContext for PersistContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => log::info!(
                "worker={} partitions={}: Persist worker assigned partitions.",
                self.worker,
                partitions(tpl)
            ),
            Rebalance::Revoke(tpl) => log::info!(
                "worker={} partitions={}: Persist worker released partitions.",
                self.worker,
                partitions(tpl)
            ),
            Rebalance::Error(e) => {
                log::warn!(
                    "worker={}: Consumer group rebalance failed: {e}.",
                    self.worker
                )
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            log::warn!(
                "worker={}: Committing offsets failed: {e}; those records will be stored again (harmlessly) after a rebalance.",
                self.worker
            );
        }
    }
}

/// `[0, 2]`-style list of the partitions in `tpl`.
fn partitions(tpl: &TopicPartitionList) -> String {
    let list: Vec<String> = tpl
        .elements()
        .iter()
        .map(|p| p.partition().to_string())
        .collect();
    format!("[{}]", list.join(", "))
}

/// The details of an error for the log (the `Display` of some variants is
/// the sentence meant for clients).
fn detail(e: &ChatError) -> String {
    match e {
        ChatError::Unavailable(m) | ChatError::Internal(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures_util::TryStreamExt;
    use mongodb::bson::{doc, Document};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use super::*;
    use crate::config::{MongoSettings, RedisSettings};
    use crate::protocol::User;

    const BROKERS: &str = "127.0.0.1:9092";
    const REDIS_URL: &str = "redis://127.0.0.1:6379";
    const MONGO_URL: &str = "mongodb://127.0.0.1:27017";

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
        redis: ConnectionManager,
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
            let settings = ClusterSettings {
                redis: RedisSettings {
                    url: REDIS_URL.into(),
                    cache_size: 500,
                    cid_ttl_secs: 3600,
                },
                kafka: KafkaSettings {
                    brokers: BROKERS.into(),
                    topic: format!("test.persist.{id}"),
                    partitions: 3,
                    replication_factor: 1,
                    linger_ms: 2,
                    message_timeout_ms: 10_000,
                    group: format!("test-persist-{id}"),
                    persist_workers: 2,
                },
                mongo: MongoSettings {
                    url: MONGO_URL.into(),
                    database: format!("test_{id}"),
                    batch_size: 500,
                },
            };
            let hint = "(start the services with scripts/services up)";
            let redis = match redis::Client::open(REDIS_URL) {
                Ok(client) => match tokio::time::timeout(
                    Duration::from_secs(5),
                    ConnectionManager::new(client),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    other => panic!("Redis must run on {REDIS_URL} {hint}: {other:?}"),
                },
                Err(e) => panic!("bad Redis URL: {e}"),
            };
            let mongo = match MongoStore::connect(&settings.mongo).await {
                Ok(m) => Arc::new(m),
                Err(e) => panic!("MongoDB must run on {MONGO_URL} {hint}: {e:?}"),
            };
            let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
                .set("bootstrap.servers", BROKERS)
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
                Err(e) => panic!("Kafka must run on {BROKERS} {hint}: {e}"),
            }
            let producer: FutureProducer = match ClientConfig::new()
                .set("bootstrap.servers", BROKERS)
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set("message.timeout.ms", "15000")
                .create()
            {
                Ok(p) => p,
                Err(e) => panic!("Kafka producer: {e}"),
            };
            Self {
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

        async fn count(&self) -> Result<u64, String> {
            self.mongo
                .collection()
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
                .mongo
                .collection()
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
            if let Err(e) = self.mongo.drop_database().await {
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
        if !(1000..=records as u64).contains(&stored) || metrics.persist_batches.load(Relaxed) == 0
        {
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
}
