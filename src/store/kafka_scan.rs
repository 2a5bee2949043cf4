//! The seeding scan: a room's messages among the Kafka records the persist
//! group has not stored in MongoDB yet. When Redis has no seq for a room (a
//! new room, or Redis lost its data), the room's seq must start above
//! everything durable, and the cids it had accepted must be known again:
//! these records are durable but not yet in MongoDB.
//!
//! Redis cannot tell a new room from one it lost (both have no keys), so
//! every seeding asks Kafka; the asking is kept cheap. The node has one
//! scan consumer, made on first use and kept (a new one only after an
//! error); one scan uses it at a time, and the others wait their turn
//! within the scan's time limit. A scan looks at the room's partition only,
//! and reads records only when the persist group has not committed that
//! partition up to its end: a new room on a node whose persist workers keep
//! up costs three small requests, and no record is read.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use super::kafka::{client_config, client_error, METADATA_TIMEOUT};
use super::scripts::{AcceptedCid, Stamp};
use crate::config::KafkaSettings;
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;

/// Longest time one scan may take, all of it (the wait for its turn,
/// metadata, committed offsets, watermarks, reading); past it the seed is
/// refused. The sends of the room wait on the scan.
const SCAN_LIMIT: Duration = Duration::from_secs(5);

/// How long a failed scan's error answers further scans of the same room.
/// The sends that find a room unseeded queue for its seeding one at a time;
/// with Kafka away each scan fails only after a timeout, so without this
/// the last send of the queue would wait for all of them in turn.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Attempts at reading the group's committed offsets: the group
/// coordinator may still be loading when a broker has just started.
const COORDINATOR_TRIES: usize = 15;

/// The partitioner the producer uses unless `[kafka.client]` names
/// another (librdkafka's default).
const DEFAULT_PARTITIONER: &str = "consistent_random";

/// Scans the unpersisted tail of the log, one scan at a time, remembering
/// recent failures.
pub struct TailScan {
    settings: KafkaSettings,
    metrics: Arc<Metrics>,
    /// The node's scan consumer: `None` until the first scan, and again
    /// after a scan failed, so that the next one starts afresh.
    consumer: Arc<Mutex<Option<ScanConsumer>>>,
    /// One permit: the scan that holds it uses the consumer.
    turn: Arc<Semaphore>,
    /// Per room, the last scan that failed: when, and its error.
    failed: Arc<Mutex<HashMap<String, (Instant, ChatError)>>>,
}

type ScanConsumer = BaseConsumer<ScanContext>;

impl TailScan {
    pub fn new(settings: KafkaSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            settings,
            metrics,
            consumer: Arc::default(),
            turn: Arc::new(Semaphore::new(1)),
            failed: Arc::default(),
        }
    }

    /// What `room` accepted among the records not yet stored by the persist
    /// group, in log order. Waits for its turn, then runs on a blocking
    /// thread; `unavailable` once [`SCAN_LIMIT`] has passed.
    pub async fn unpersisted(&self, room: &str) -> Result<Vec<AcceptedCid>, ChatError> {
        if let Ok(mut failed) = self.failed.lock() {
            failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
            if let Some((_, e)) = failed.get(room) {
                return Err(e.clone());
            }
        }
        let result = self.scan(room).await;
        if let (Err(e), Ok(mut failed)) = (&result, self.failed.lock()) {
            failed.insert(room.to_string(), (Instant::now(), e.clone()));
        }
        result
    }

    async fn scan(&self, room: &str) -> Result<Vec<AcceptedCid>, ChatError> {
        let deadline = Instant::now() + SCAN_LIMIT;
        let permit = tokio::time::timeout(SCAN_LIMIT, self.turn.clone().acquire_owned())
            .await
            .map_err(|_| too_long())?
            .map_err(|e| ChatError::Internal(e.to_string()))?;
        let scan = Scan {
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            room: room.to_string(),
            deadline,
        };
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = permit;
            scan.with_consumer(&consumer)
        })
        .await
        .map_err(|e| ChatError::Internal(e.to_string()))?
    }
}

/// The partition librdkafka's default partitioner (`consistent_random`)
/// gives a record whose key is `room`: the CRC-32 of the key modulo the
/// number of partitions. The producer keys every record by its room, so
/// all of a room's records are there.
pub fn partition_of(room: &str, partitions: usize) -> i32 {
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(u32::MAX);
    // Below the partition count, which is an i32.
    i32::try_from(crc32fast::hash(room.as_bytes()) % partitions).unwrap_or(0)
}

/// Whether the producer places records with [`partition_of`]: true unless
/// `[kafka.client]` sets another `partitioner`.
fn default_partitioner(settings: &KafkaSettings) -> bool {
    settings
        .client
        .iter()
        .filter(|(k, _)| k.trim() == "partitioner")
        .all(|(_, v)| v.trim() == DEFAULT_PARTITIONER)
}

fn too_long() -> ChatError {
    ChatError::Unavailable("kafka: the unpersisted backlog cannot be scanned now".into())
}

/// The scan's consumer: reaching the end of a partition is how the scan
/// knows it is done, not an error worth a log line.
struct ScanContext;

impl rdkafka::ClientContext for ScanContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            log::warn!("Kafka scan: {error}: {reason}.");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ScanContext {}

/// One scan, for one room, to finish by `deadline`.
struct Scan {
    settings: KafkaSettings,
    metrics: Arc<Metrics>,
    room: String,
    deadline: Instant,
}

impl Scan {
    /// Runs with the node's scan consumer, making it if there is none, and
    /// dropping it if the scan fails.
    fn with_consumer(
        &self,
        slot: &Mutex<Option<ScanConsumer>>,
    ) -> Result<Vec<AcceptedCid>, ChatError> {
        let mut slot = slot
            .lock()
            .map_err(|_| ChatError::Internal("scan consumer lock poisoned".into()))?;
        let consumer = match slot.take() {
            Some(c) => c,
            None => self.new_consumer()?,
        };
        let result = self.unpersisted(&consumer);
        if result.is_ok() {
            *slot = Some(consumer);
        }
        result
    }

    /// A consumer that reads as the persist group (its committed offsets)
    /// without joining it: partitions are assigned by hand, and nothing is
    /// committed.
    fn new_consumer(&self) -> Result<ScanConsumer, ChatError> {
        let settings = &self.settings;
        let consumer = client_config(settings)
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(ScanContext)
            .map_err(|e| client_error(settings, "create the scan's consumer", &e))?;
        self.metrics.seed_scan_consumers.fetch_add(1, Relaxed);
        Ok(consumer)
    }

    /// What is left of the scan's time for one request, at most
    /// [`METADATA_TIMEOUT`].
    fn left(&self) -> Result<Duration, ChatError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then(|| left.min(METADATA_TIMEOUT))
            .ok_or_else(too_long)
    }

    /// Reads the room's partition from the persist group's committed offset
    /// to its high watermark as read when the scan starts, and returns the
    /// messages of the room found there. When the committed offset is the
    /// watermark, nothing is read.
    ///
    /// The scan stops at those watermarks rather than at the partition's
    /// current end: while other nodes keep producing to the room's
    /// partition the end moves on, and every send of the room would wait
    /// while the scan chased it. What is produced after the watermarks were
    /// read took its seq from the Redis being seeded, which the seed never
    /// lowers.
    fn unpersisted(&self, consumer: &ScanConsumer) -> Result<Vec<AcceptedCid>, ChatError> {
        let pending = self.to_read(consumer)?;
        self.metrics.seed_tail_checks.fetch_add(1, Relaxed);
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        self.metrics.seed_scans.fetch_add(1, Relaxed);
        let read = self.read(consumer, pending);
        // Nothing fetched in the background between scans.
        let unassigned = consumer.unassign().map_err(fail);
        let found = read?;
        unassigned?;
        Ok(found)
    }

    /// The partitions that may hold the room's records: its own when the
    /// producer's partitioner is the default, every one otherwise.
    fn partitions(&self, consumer: &ScanConsumer) -> Result<Vec<i32>, ChatError> {
        let topic = &self.settings.topic;
        let metadata = consumer
            .fetch_metadata(Some(topic), self.left()?)
            .map_err(fail)?;
        let all: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if all.is_empty() || !default_partitioner(&self.settings) {
            return Ok(all);
        }
        Ok(vec![partition_of(&self.room, all.len())])
    }

    /// Per partition with unstored records: where to start reading, and
    /// the offset one past its last record (its high watermark now).
    fn to_read(&self, consumer: &ScanConsumer) -> Result<HashMap<i32, (i64, i64)>, ChatError> {
        let topic = &self.settings.topic;
        let partitions = self.partitions(consumer)?;
        let mut wanted = TopicPartitionList::new();
        for p in &partitions {
            wanted.add_partition(topic, *p);
        }
        // While the coordinator loads, ask again for a few seconds, then scan
        // from the start of each partition, which reads more but misses nothing.
        let mut committed = None;
        for _ in 0..COORDINATOR_TRIES {
            match consumer.committed_offsets(wanted.clone(), self.left()?) {
                Ok(c) => {
                    committed = Some(c);
                    break;
                }
                Err(e) => {
                    log::debug!("Committed offsets not available yet: {e}.");
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        let committed = committed.unwrap_or_else(TopicPartitionList::new);
        let mut pending = HashMap::new();
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, self.left()?)
                .map_err(fail)?;
            let start = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o.max(low),
                _ => low,
            };
            if start < high {
                pending.insert(p, (start, high));
            }
        }
        Ok(pending)
    }

    /// Reads each partition of `pending` over its range, keeping the
    /// room's messages.
    fn read(
        &self,
        consumer: &ScanConsumer,
        pending: HashMap<i32, (i64, i64)>,
    ) -> Result<Vec<AcceptedCid>, ChatError> {
        let topic = &self.settings.topic;
        let mut assignment = TopicPartitionList::new();
        for (p, (start, _)) in &pending {
            assignment
                .add_partition_offset(topic, *p, Offset::Offset(*start))
                .map_err(fail)?;
        }
        consumer.assign(&assignment).map_err(fail)?;
        let mut ends: HashMap<i32, i64> = pending.into_iter().map(|(p, (_, e))| (p, e)).collect();
        let mut found = Vec::new();
        while !ends.is_empty() {
            match consumer.poll(self.left()?.min(Duration::from_millis(200))) {
                Some(Ok(record)) => {
                    self.metrics.seed_scan_records.fetch_add(1, Relaxed);
                    if record.key() == Some(self.room.as_bytes()) {
                        if let Some(accepted) = record.payload().and_then(accepted_of) {
                            found.push(accepted);
                        }
                    }
                    let partition = record.partition();
                    if ends
                        .get(&partition)
                        .is_some_and(|end| record.offset() + 1 >= *end)
                    {
                        ends.remove(&partition);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) => return Err(fail(e)),
                None => {}
            }
        }
        Ok(found)
    }
}

/// The accepted cid a stored record stands for, if it is a message.
fn accepted_of(payload: &[u8]) -> Option<AcceptedCid> {
    let m: ChatMessage = serde_json::from_slice(payload).ok()?;
    Some(AcceptedCid {
        user_id: m.user.id,
        cid: m.cid,
        stamp: Stamp {
            seq: m.seq,
            id: m.id,
            ts: m.ts,
        },
    })
}

fn fail(e: KafkaError) -> ChatError {
    ChatError::Unavailable(format!("kafka: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_has_one_partition_below_the_count() {
        for n in [1, 3, 12, 64] {
            for room in ["lobby", "a", "room-with-a-long-name_0123456789"] {
                let p = partition_of(room, n);
                assert!((0..n as i32).contains(&p), "{room} in {n}: {p}");
                assert_eq!(p, partition_of(room, n));
            }
        }
        // librdkafka's rd_crc32 is the IEEE CRC-32, whose check value is this.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }
}
