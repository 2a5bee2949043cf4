//! `KafkaSink`: one per node in cluster mode. Produces accepted messages to
//! the topic with an idempotent producer (acks=all), key = room so a room's
//! messages keep their order in one partition. librdkafka batches what
//! arrives within `kafka.linger_ms`; each message's delivery report
//! resolves its `Produce`, and only then is the message visible and acked.
//!
//! The cluster store writes through the sink's address as its
//! [`DurableLog`].

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaSettings;
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;
use crate::store::kafka::{
    client_config, client_error, prepare_topic, TopicCheck, METADATA_TIMEOUT,
};
use crate::store::DurableLog;

/// How long past `kafka.message_timeout_ms` a `Produce` waits for its
/// delivery report before it answers `unavailable` anyway. librdkafka
/// looks for timed-out messages once a second, so its own report comes
/// within this.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);

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

/// The node's Kafka producer.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    settings: KafkaSettings,
    metrics: Arc<Metrics>,
    /// What the start-up check found of the topic's durability.
    topic_check: TopicCheck,
}

impl KafkaSink {
    /// Creates the producer, and the topic if it is missing; fails on a
    /// topic that could lose an acked message unless the settings allow it
    /// (see [`prepare_topic`]).
    pub async fn connect(
        settings: &KafkaSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ChatError> {
        let producer = new_producer(settings)?;
        let topic_check = prepare_topic(settings).await?;
        Ok(Self {
            producer,
            topic: settings.topic.clone(),
            settings: settings.clone(),
            metrics,
            topic_check,
        })
    }

    /// The durability of the topic, as the start-up check found it.
    pub fn topic_check(&self) -> &TopicCheck {
        &self.topic_check
    }
}

/// An idempotent producer (acks=all) with the configured batching.
///
/// No record is acked before every in-sync replica has it, and the topic's
/// `min.insync.replicas` (2, checked at start-up) bounds how few those may
/// be. With fewer in sync, Kafka answers NOT_ENOUGH_REPLICAS (or
/// NOT_ENOUGH_REPLICAS_AFTER_APPEND), both retriable: librdkafka retries
/// them until `message.timeout.ms`, then reports the record failed, and
/// the send answers `unavailable`. A delivery report is an ack only when
/// it carries no error, so no such record is ever acked; one appended on
/// the leader before the failure may still reach the log, which the
/// client's retry with the same cid keeps once.
fn new_producer(settings: &KafkaSettings) -> Result<FutureProducer, ChatError> {
    client_config(settings)
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
        .map_err(|e| client_error(settings, "create the producer", &e))
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

impl DurableLog for Addr<KafkaSink> {
    fn write(&self, message: ChatMessage) -> BoxFuture<'static, Result<(), ChatError>> {
        let produced = self.send(Produce { message });
        Box::pin(async move { produced.await.map_err(|_| sink_stopped())? })
    }

    fn check(&self) -> BoxFuture<'static, Result<(), ChatError>> {
        let checked = self.send(CheckKafka);
        Box::pin(async move { checked.await.map_err(|_| sink_stopped())? })
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let flushed = self.send(FlushKafka);
        Box::pin(async move {
            let _ = flushed.await;
        })
    }
}

fn sink_stopped() -> ChatError {
    ChatError::Unavailable("kafka sink stopped".into())
}
