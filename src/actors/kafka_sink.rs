//! `KafkaSink`: one per node in cluster mode. Produces accepted messages to
//! the topic with an idempotent producer (acks=all), key = room so a room's
//! messages keep their order in one partition. librdkafka batches what
//! arrives within `kafka.linger_ms`; each message's delivery report
//! resolves its `Produce`, and only then is the message visible and acked.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaSettings;
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;

/// How long a metadata request may take (readiness, topic creation).
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

/// How long past `kafka.message_timeout_ms` a `Produce` waits for its
/// delivery report before it answers `unavailable` anyway. librdkafka
/// looks for timed-out messages once a second, so its own report comes
/// within this.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);

/// Longest time a scan for a room's unpersisted max seq may take, all of
/// it (metadata, committed offsets, watermarks, reading); past it the seed
/// is refused. Sends of the room wait on the scan.
const SCAN_LIMIT: Duration = Duration::from_secs(5);

/// How long a failed scan's error answers further scans of the same room.
/// The sends that found a room unseeded queue for its seeding one at a
/// time; each would otherwise scan again, and with Kafka away each scan
/// fails only after a timeout, so the last of the queue waited for all of
/// them in turn.
const SCAN_FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Make one message durable in the log; resolves on its delivery report.
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct Produce {
    pub message: ChatMessage,
}

/// Whether the brokers answer a metadata request.
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct CheckKafka;

/// Resolves when every message produced so far has its delivery report.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushKafka;

/// The highest seq of a room among the records the persist group has not
/// stored yet: what MongoDB will hold but may not hold now. Used to seed a
/// room's seq when Redis lost it.
#[derive(Message)]
#[rtype(result = "Result<u64, ChatError>")]
pub struct UnpersistedMaxSeq {
    pub room: String,
}

/// The node's Kafka producer.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    settings: KafkaSettings,
    metrics: Arc<Metrics>,
    /// Per room, the last scan that failed: when, and its error.
    failed_scans: Arc<std::sync::Mutex<HashMap<String, (Instant, ChatError)>>>,
}

impl KafkaSink {
    /// Creates the producer and the topic if it is missing.
    pub async fn connect(
        settings: &KafkaSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ChatError> {
        let producer = new_producer(settings)?;
        ensure_topic(settings).await?;
        Ok(Self {
            producer,
            topic: settings.topic.clone(),
            settings: settings.clone(),
            metrics,
            failed_scans: Arc::default(),
        })
    }
}

/// An idempotent producer (acks=all) with the configured batching.
fn new_producer(settings: &KafkaSettings) -> Result<FutureProducer, ChatError> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", settings.linger_ms.to_string())
        .set("socket.nagle.disable", "true")
        .set(
            "message.timeout.ms",
            settings.message_timeout_ms.to_string(),
        )
        .set("client.id", "scalable-chat")
        .create()
        .map_err(|e| ChatError::Unavailable(format!("kafka producer: {e}")))
}

/// Creates the topic with the configured partitions unless it exists.
async fn ensure_topic(settings: &KafkaSettings) -> Result<(), ChatError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()
        .map_err(|e| ChatError::Unavailable(format!("kafka admin: {e}")))?;
    let topic = NewTopic::new(
        &settings.topic,
        settings.partitions,
        TopicReplication::Fixed(settings.replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| ChatError::Unavailable(format!("kafka: cannot create the topic: {e}")))?;
    for result in results {
        match result {
            Ok(name) => log::info!(
                "Created Kafka topic {name} with {} partitions.",
                settings.partitions
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(ChatError::Unavailable(format!(
                    "kafka: cannot create topic {name}: {code}"
                )))
            }
        }
    }
    Ok(())
}

impl Actor for KafkaSink {
    type Context = Context<Self>;
}

impl Handler<Produce> for KafkaSink {
    type Result = ResponseFuture<Result<(), ChatError>>;

    fn handle(&mut self, msg: Produce, _: &mut Context<Self>) -> Self::Result {
        // An idempotent producer that hit a fatal error (its sequence state
        // broken by an outage) refuses everything from then on: replace it.
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            log::error!("Kafka producer failed for good ({code}: {reason}); starting a new one.");
            match new_producer(&self.settings) {
                Ok(p) => {
                    // Dropping a producer purges and flushes it, and joins
                    // its threads: not on the thread that answers sends.
                    let old = std::mem::replace(&mut self.producer, p);
                    tokio::task::spawn_blocking(move || drop(old));
                }
                Err(e) => return Box::pin(async move { Err(e) }),
            }
        }
        let payload = match serde_json::to_vec(&msg.message) {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Err(ChatError::Internal(e.to_string())) }),
        };
        let record = FutureRecord::to(&self.topic)
            .key(msg.message.room.as_str())
            .payload(&payload);
        let delivery = self.producer.send_result(record).map_err(|(e, _)| e);
        let metrics = self.metrics.clone();
        metrics.producer_queue.fetch_add(1, Relaxed);
        // The answer comes with the delivery report, or `unavailable` once
        // the message timeout is over whatever holds the report back. Such
        // a message may still reach the log, like one librdkafka times out
        // in flight: the client's retry with its cid keeps it once.
        let limit = Duration::from_millis(self.settings.message_timeout_ms) + DELIVERY_GRACE;
        Box::pin(async move {
            let result = match delivery {
                Err(e) => Err(ChatError::Unavailable(format!("kafka: {e}"))),
                Ok(report) => match tokio::time::timeout(limit, report).await {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err((e, _)))) => Err(ChatError::Unavailable(format!("kafka: {e}"))),
                    Ok(Err(_)) => Err(ChatError::Unavailable("kafka producer stopped".into())),
                    Err(_) => Err(ChatError::Unavailable(format!(
                        "kafka: no delivery report within {} ms",
                        limit.as_millis()
                    ))),
                },
            };
            metrics.producer_queue.fetch_sub(1, Relaxed);
            result
        })
    }
}

impl Handler<CheckKafka> for KafkaSink {
    type Result = ResponseFuture<Result<(), ChatError>>;

    fn handle(&mut self, _: CheckKafka, _: &mut Context<Self>) -> Self::Result {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        Box::pin(async move {
            let probe = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                    .map(|_| ())
            })
            .await;
            match probe {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ChatError::Unavailable(format!("kafka: {e}"))),
                Err(e) => Err(ChatError::Internal(e.to_string())),
            }
        })
    }
}

impl Handler<FlushKafka> for KafkaSink {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: FlushKafka, _: &mut Context<Self>) -> Self::Result {
        let producer = self.producer.clone();
        Box::pin(async move {
            let _ =
                tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        })
    }
}

impl Handler<UnpersistedMaxSeq> for KafkaSink {
    type Result = ResponseFuture<Result<u64, ChatError>>;

    fn handle(&mut self, msg: UnpersistedMaxSeq, _: &mut Context<Self>) -> Self::Result {
        let failed_scans = self.failed_scans.clone();
        if let Ok(mut failed) = failed_scans.lock() {
            failed.retain(|_, (at, _)| at.elapsed() < SCAN_FAILURE_MEMORY);
            if let Some((_, e)) = failed.get(&msg.room) {
                let e = e.clone();
                return Box::pin(async move { Err(e) });
            }
        }
        let settings = self.settings.clone();
        Box::pin(async move {
            let room = msg.room.clone();
            let result = tokio::task::spawn_blocking(move || unpersisted_max_seq(&settings, &room))
                .await
                .map_err(|e| ChatError::Internal(e.to_string()))?;
            if let (Err(e), Ok(mut failed)) = (&result, failed_scans.lock()) {
                failed.insert(msg.room, (Instant::now(), e.clone()));
            }
            result
        })
    }
}

/// The scan's consumer: reaching the end of a partition is how the scan
/// knows it is done, not an error worth a log line.
struct ScanContext;

impl rdkafka::ClientContext for ScanContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_)) {
            log::warn!("Kafka scan: {error}: {reason}.");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ScanContext {}

/// Reads every partition from the persist group's committed offset to its
/// end (its high watermark when the scan starts) and returns the highest seq
/// of `room` found there (0 if none).
///
/// The scan stops at the watermarks read before it starts rather than at the
/// partitions' current end: while other nodes keep producing to the room's
/// partition, the current end moves on and the scan would chase it for
/// seconds, every send of the room waiting on it. What is produced after
/// the watermarks were read took its seq from the Redis being seeded, which
/// the seed never lowers.
fn unpersisted_max_seq(settings: &KafkaSettings, room: &str) -> Result<u64, ChatError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message as _, Offset, TopicPartitionList};

    /// Attempts at reading the group's committed offsets.
    const COORDINATOR_TRIES: usize = 15;
    let fail = |e: rdkafka::error::KafkaError| ChatError::Unavailable(format!("kafka: {e}"));
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
    let consumer: BaseConsumer<ScanContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create_with_context(ScanContext)
        .map_err(fail)?;
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
    // The group coordinator may still be loading (a broker just started):
    // ask again for a few seconds, then scan from the start of each
    // partition, which reads more but misses nothing.
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
        return Ok(0);
    }
    consumer.assign(&assignment).map_err(fail)?;
    let mut max = 0;
    while !pending.is_empty() {
        match consumer.poll(left()?.min(Duration::from_millis(200))) {
            Some(Ok(record)) => {
                if record.key() == Some(room.as_bytes()) {
                    let stored = record.payload().map(serde_json::from_slice::<ChatMessage>);
                    if let Some(Ok(m)) = stored {
                        max = max.max(m.seq);
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
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(fail(e)),
            None => {}
        }
    }
    Ok(max)
}
