//! The seeding scan: a room's messages among the Kafka records the persist
//! group has not stored in MongoDB yet. When Redis has no seq for a room (a
//! new room, or Redis lost its data), the room's seq must start above
//! everything durable, and the cids it had accepted must be known again:
//! these records are durable but not yet in MongoDB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::kafka::{client_config, client_error, METADATA_TIMEOUT};
use super::scripts::{AcceptedCid, Stamp};
use crate::config::KafkaSettings;
use crate::error::ChatError;
use crate::protocol::ChatMessage;

/// Longest time one scan may take, all of it (metadata, committed offsets,
/// watermarks, reading); past it the seed is refused. The sends of the room
/// wait on the scan.
const SCAN_LIMIT: Duration = Duration::from_secs(5);

/// How long a failed scan's error answers further scans of the same room.
/// The sends that find a room unseeded queue for its seeding one at a time;
/// with Kafka away each scan fails only after a timeout, so without this
/// the last send of the queue would wait for all of them in turn.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Attempts at reading the group's committed offsets: the group
/// coordinator may still be loading when a broker has just started.
const COORDINATOR_TRIES: usize = 15;

/// Scans the unpersisted tail of the log, remembering recent failures.
pub struct TailScan {
    settings: KafkaSettings,
    /// Per room, the last scan that failed: when, and its error.
    failed: Arc<Mutex<HashMap<String, (Instant, ChatError)>>>,
}

impl TailScan {
    pub fn new(settings: KafkaSettings) -> Self {
        Self {
            settings,
            failed: Arc::default(),
        }
    }

    /// What `room` accepted among the records not yet stored by the persist
    /// group, in log order. Runs on a blocking thread.
    pub async fn unpersisted(&self, room: &str) -> Result<Vec<AcceptedCid>, ChatError> {
        if let Ok(mut failed) = self.failed.lock() {
            failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
            if let Some((_, e)) = failed.get(room) {
                return Err(e.clone());
            }
        }
        let settings = self.settings.clone();
        let scanned = room.to_string();
        let result = tokio::task::spawn_blocking(move || unpersisted(&settings, &scanned))
            .await
            .map_err(|e| ChatError::Internal(e.to_string()))?;
        if let (Err(e), Ok(mut failed)) = (&result, self.failed.lock()) {
            failed.insert(room.to_string(), (Instant::now(), e.clone()));
        }
        result
    }
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

/// Reads every partition from the persist group's committed offset to its
/// high watermark as read when the scan starts, and returns the messages of
/// `room` found there.
///
/// The scan stops at those watermarks rather than at the partitions'
/// current end: while other nodes keep producing to the room's partition
/// the end moves on, and every send of the room would wait while the scan
/// chased it. What is produced after the watermarks were read took its seq
/// from the Redis being seeded, which the seed never lowers.
fn unpersisted(settings: &KafkaSettings, room: &str) -> Result<Vec<AcceptedCid>, ChatError> {
    let fail = |e: KafkaError| ChatError::Unavailable(format!("kafka: {e}"));
    let deadline = Instant::now() + SCAN_LIMIT;
    let too_long =
        || ChatError::Unavailable("kafka: the unpersisted backlog cannot be scanned now".into());
    // Each request may take what is left of the scan's time, at most
    // METADATA_TIMEOUT.
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then(|| left.min(METADATA_TIMEOUT))
            .ok_or_else(too_long)
    };
    let consumer: BaseConsumer<ScanContext> = client_config(settings)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create_with_context(ScanContext)
        .map_err(|e| client_error(settings, "create the scan's consumer", &e))?;
    let metadata = consumer
        .fetch_metadata(Some(&settings.topic), left()?)
        .map_err(fail)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(&settings.topic, *p);
    }
    // While the coordinator loads, ask again for a few seconds, then scan
    // from the start of each partition, which reads more but misses nothing.
    let mut committed = None;
    for _ in 0..COORDINATOR_TRIES {
        match consumer.committed_offsets(wanted.clone(), left()?) {
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
    let mut assignment = TopicPartitionList::new();
    // Per partition still to read: the offset one past its last record.
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&settings.topic, *p, left()?)
            .map_err(fail)?;
        let start = match committed
            .find_partition(&settings.topic, *p)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        if start < high {
            assignment
                .add_partition_offset(&settings.topic, *p, Offset::Offset(start))
                .map_err(fail)?;
            pending.insert(*p, high);
        }
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment).map_err(fail)?;
    let mut found = Vec::new();
    while !pending.is_empty() {
        match consumer.poll(left()?.min(Duration::from_millis(200))) {
            Some(Ok(record)) => {
                if record.key() == Some(room.as_bytes()) {
                    let stored = record.payload().map(serde_json::from_slice::<ChatMessage>);
                    if let Some(Ok(m)) = stored {
                        found.push(AcceptedCid {
                            user_id: m.user.id,
                            cid: m.cid,
                            stamp: Stamp {
                                seq: m.seq,
                                id: m.id,
                                ts: m.ts,
                            },
                        });
                    }
                }
                let partition = record.partition();
                if pending
                    .get(&partition)
                    .is_some_and(|end| record.offset() + 1 >= *end)
                {
                    pending.remove(&partition);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(fail(e)),
            None => {}
        }
    }
    Ok(found)
}
