//! Where accepted messages live. The node talks to its message log only
//! through [`MessageStore`]: standalone mode fills it with the embedded
//! store; cluster mode fills the same seam with Redis, Kafka and MongoDB.
//!
//! The store sits below the actors: it imports none of them. Where cluster
//! mode needs the durable log, it writes through [`DurableLog`], which the
//! `KafkaSink` actor implements.

pub mod channel;
pub mod cluster;
pub mod embedded;
pub mod kafka;
pub mod kafka_scan;
pub mod keys;
pub mod mongo;
pub mod redis;
pub mod scripts;

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::ChatError;
use crate::protocol::{ChatMessage, User};

/// A message a client asked to post, checked but not yet accepted.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room: String,
    pub user: User,
    pub text: String,
    pub cid: String,
}

/// The answer to an append: the message as stored, and whether an earlier
/// attempt with the same `cid` had already stored it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message: ChatMessage,
    pub duplicate: bool,
}

impl Accepted {
    /// The answer to a repeated `cid` whose earlier attempt was stored.
    pub fn earlier(message: ChatMessage) -> Self {
        Self {
            message,
            duplicate: true,
        }
    }
}

/// A page of history in ascending `seq`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub messages: Vec<ChatMessage>,
    pub has_more: bool,
}

/// The state of one backing dependency, for `/readyz`.
#[derive(Debug, Clone)]
pub struct DependencyStatus {
    pub name: &'static str,
    pub error: Option<String>,
}

/// How long a room holds a message back while a lower seq may still be in
/// flight on another node, before it gives that seq up as failed. The
/// cluster store publishes a message that comes later than this under a
/// new seq, so that no room ever skips it.
pub const HOLD_BACK: Duration = Duration::from_secs(1);

/// Called once per newly stored message, in `seq` order within a room, once
/// the message is durable: this is how the node learns what to deliver.
pub type CommitHook = Box<dyn Fn(ChatMessage) + Send + 'static>;

/// The durable message log of a node.
pub trait MessageStore: Send + Sync + 'static {
    /// Makes a message durable and gives it its `seq` and `id`; a repeated
    /// `(room, user, cid)` returns the earlier message instead.
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, Result<Accepted, ChatError>>;

    /// Up to `limit` messages with `seq > since`, ascending.
    fn after(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ChatError>>;

    /// The `limit` latest messages with `seq < before` (or the latest of all).
    fn before(
        &self,
        room: &str,
        before: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'static, Result<Page, ChatError>>;

    /// The highest `seq` of a room, 0 for an empty room.
    fn last_seq(&self, room: &str) -> BoxFuture<'static, Result<u64, ChatError>>;

    /// When a lower `seq` of the room may still be on its way to the nodes
    /// although higher ones were published (cluster mode, for up to half a
    /// second), the highest `seq` below the first such one. A room that
    /// starts delivering must start there, not at `last_seq`, or it would
    /// drop the missing one when it comes.
    fn open_gap(&self, _room: &str) -> BoxFuture<'static, Result<Option<u64>, ChatError>> {
        Box::pin(async { Ok(None) })
    }

    /// A page of the rooms with messages, by name: up to `limit` of those
    /// whose names sort after `after` (from the first without), each with
    /// its last `seq`.
    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, ChatError>>;

    /// One bounded step of removing the rooms that are gone (cluster mode:
    /// expired from Redis, no member left) from the room list. The embedded
    /// store keeps every room.
    fn sweep_rooms(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// Whether each dependency answers now.
    fn check(&self) -> BoxFuture<'static, Vec<DependencyStatus>>;

    /// Resolves once every append accepted before the call has been answered.
    fn flush(&self) -> BoxFuture<'static, ()>;

    /// Prepares a room's recent history for fast reads if it went cold. The
    /// embedded store is always warm.
    fn warm(&self, _room: &str) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The durable log of cluster mode (Kafka): a message is acked only once
/// the log holds it.
pub trait DurableLog: Send + Sync + 'static {
    /// Makes one message durable; resolves once the log acknowledged it
    /// (acks=all), or with `unavailable`.
    fn write(&self, message: ChatMessage) -> BoxFuture<'static, Result<(), ChatError>>;

    /// Whether the log answers now.
    fn check(&self) -> BoxFuture<'static, Result<(), ChatError>>;

    /// Resolves once every write issued before the call has its answer.
    fn flush(&self) -> BoxFuture<'static, ()>;
}
