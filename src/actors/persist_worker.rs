//! A persist worker: one consumer-group member's task, run and restarted
//! by the `PersistSupervisor`.
//!
//! A worker takes a batch of records, inserts their messages into MongoDB
//! (retrying until the write succeeds), raises each room's persisted
//! watermark in Redis, and only then commits the batch's offsets. A crash
//! anywhere replays records whose messages may already be stored; the store
//! keys documents by message id, so a replay never duplicates anything.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
    StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as KafkaMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::{ClusterSettings, KafkaSettings};
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;
use crate::store::kafka::{client_config, client_error};
use crate::store::mongo::{check_storable, MongoStore};
use crate::store::redis::RedisConn;
use crate::store::scripts::Scripts;

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
pub const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// How long a watermark or committed-offset query for lag may take.
const LAG_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for Redis when raising watermarks: a Redis outage must not
/// hold up storing messages, it only delays the trimming of the cache.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the group waits for a silent worker before giving its
/// partitions to another: shorter than librdkafka's 45 s default, so a
/// crashed node delays history by seconds, not a minute.
const SESSION_TIMEOUT_MS: &str = "10000";

/// The Kafka consumer of one worker.
pub type PersistConsumer = StreamConsumer<PersistContext>;

/// One consumer-group worker: everything its task owns.
pub struct Worker {
    index: usize,
    kafka: KafkaSettings,
    /// Most records in one batch (`mongo.batch_size`).
    batch_size: usize,
    mongo: Arc<MongoStore>,
    redis: RedisConn,
    scripts: Scripts,
    metrics: Arc<Metrics>,
    /// Where this worker publishes its lag for the supervisor to sum.
    lag: Arc<AtomicI64>,
    lag_measured: Instant,
    /// The lag measurement in flight, if any (it runs on a blocking thread).
    lag_task: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    pub fn new(
        index: usize,
        cluster: &ClusterSettings,
        mongo: Arc<MongoStore>,
        redis: RedisConn,
        metrics: Arc<Metrics>,
        lag: Arc<AtomicI64>,
    ) -> Self {
        Self {
            index,
            kafka: cluster.kafka.clone(),
            batch_size: cluster.mongo.batch_size.max(1),
            mongo,
            redis,
            scripts: Scripts::new(cluster.redis.room_idle_ttl_secs),
            metrics,
            lag,
            lag_measured: Instant::now(),
            lag_task: None,
        }
    }

    /// Consumes until the task is aborted; returns only on a failure that a
    /// fresh consumer may cure.
    pub async fn run(mut self) -> Result<(), ChatError> {
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
            // The store counts for every worker of the node.
            self.metrics
                .cid_conflicts
                .store(self.mongo.cid_conflicts(), Relaxed);
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
                        e.detail()
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
            let scripts = &self.scripts;
            async move {
                let result = scripts.raise_watermark(&mut redis, room, seq).await;
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
                    "worker={} room={room} seq={seq}: Raising the persisted watermark failed: {}.",
                    self.index,
                    e.detail()
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
///
/// The group assigns partitions cooperative-sticky: when a node joins or
/// leaves, only the partitions that move are revoked and assigned
/// (rdkafka's default `rebalance` calls the incremental assign and
/// unassign for this protocol), and every other worker keeps storing. A
/// batch taken from a partition that is revoked meanwhile is still stored
/// and its offsets committed: that commit may fail or land after the new
/// owner's, which only makes records that are already stored be stored
/// again (harmlessly, by message id), and never moves the group's offset
/// past a record that is not stored.
pub fn subscribe(kafka: &KafkaSettings, worker: usize) -> Result<PersistConsumer, ChatError> {
    let kafka_error = |doing: &str, e: KafkaError| client_error(kafka, doing, &e);
    let consumer: PersistConsumer = client_config(kafka)
        .set("group.id", &kafka.group)
        .set("client.id", format!("scalable-chat-persist-{worker}"))
        // Offsets are committed only after MongoDB holds the batch.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("partition.assignment.strategy", "cooperative-sticky")
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
pub fn lag_of(consumer: &PersistConsumer) -> KafkaResult<i64> {
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
                .and_then(|m| check_storable(&m).map(|()| m).map_err(|e| e.detail())),
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
pub struct PersistContext {
    worker: usize,
}

impl ClientContext for PersistContext {}

impl ConsumerContext for PersistContext {
    /// With the cooperative protocol the lists are what changed: partitions
    /// added to, or taken from, what the worker already had.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let protocol = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => "cooperative",
            RebalanceProtocol::Eager => "eager",
            RebalanceProtocol::None => "none",
        };
        match rebalance {
            Rebalance::Assign(tpl) => log::info!(
                "worker={} partitions={} protocol={protocol}: Persist worker assigned partitions.",
                self.worker,
                partitions(tpl)
            ),
            Rebalance::Revoke(tpl) => log::info!(
                "worker={} partitions={} protocol={protocol}: Persist worker released partitions.",
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
