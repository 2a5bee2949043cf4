//! `RedisBridge`: one per node in cluster mode. Subscribes to the pub/sub
//! channel of each room that has local members (subscribing when a room
//! gets its first local member, unsubscribing after its last) and hands
//! what other nodes publish to the registry: messages as they become
//! durable, presence and typing. Publishes this node's presence and typing.
//!
//! Pub/sub is at-most-once: when the connection drops, the bridge
//! reconnects with backoff, subscribes again, and asks every room to
//! backfill from history by `seq`, so a gap in Redis is never a gap for
//! clients. Sessions never wait on any of this.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::registry::{Publish, RemoteEvent, Resync, RoomRegistry};
use super::room::RelayDown;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, User};
use crate::store::keys;

/// First and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What travels on a room's channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Event {
    /// A durable message.
    Msg { node: String, m: ChatMessage },
    /// Users came or went on `node`.
    Presence {
        node: String,
        room: String,
        joined: Vec<User>,
        left: Vec<User>,
    },
    /// A user on `node` is typing.
    Typing {
        node: String,
        room: String,
        user: User,
    },
}

/// Start relaying a room (it has a local member now); resolves once Redis
/// confirmed the subscription, so a history read after it misses nothing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub room: String,
}

/// Stop relaying a room (its last local member left).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub room: String,
}

/// Publish this node's presence or typing to the other nodes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Broadcast {
    pub room: String,
    pub event: Event,
}

/// The members of a room on the other nodes.
#[derive(Message)]
#[rtype(result = "Vec<(String, User)>")]
pub struct RemoteMembers {
    pub room: String,
}

/// Tell the cluster this node is alive (a scheduled job).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat;

/// Remove the members of nodes silent for longer than `dead_after`
/// (a scheduled job, on nodes with the sweep role).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SweepDeadNodes {
    pub dead_after: Duration,
}

/// The pub/sub connection is up (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct Connected {
    sink: PubSubSink,
    generation: u64,
}

/// The pub/sub connection dropped (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct Disconnected {
    generation: u64,
}

/// The node's relay through Redis pub/sub.
pub struct RedisBridge {
    client: redis::Client,
    publisher: ConnectionManager,
    registry: Addr<RoomRegistry>,
    node_id: String,
    metrics: Arc<Metrics>,
    /// Rooms with local members: subscribed now or on the next connect.
    rooms: HashSet<String>,
    sink: Option<PubSubSink>,
    /// Tells a stale connection's reports from the current one's.
    generation: u64,
}

impl RedisBridge {
    pub fn new(
        client: redis::Client,
        publisher: ConnectionManager,
        registry: Addr<RoomRegistry>,
        node_id: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            publisher,
            registry,
            node_id,
            metrics,
            rooms: HashSet::new(),
            sink: None,
            generation: 0,
        }
    }

    /// Connects in the background, retrying with backoff until it works.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let client = self.client.clone();
        let registry = self.registry.clone();
        let node_id = self.node_id.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let mut backoff = BACKOFF_MIN;
            let pubsub = loop {
                match client.get_async_pubsub().await {
                    Ok(p) => break p,
                    Err(e) => {
                        log::warn!(
                            "Redis pub/sub connection failed: {e}; retrying in {backoff:?}."
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            };
            let (sink, mut stream) = pubsub.split();
            me.do_send(Connected { sink, generation });
            while let Some(msg) = stream.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                match serde_json::from_str::<Event>(&payload) {
                    Ok(Event::Msg { m, .. }) => registry.do_send(Publish { message: m }),
                    Ok(event) => {
                        let from_here = match &event {
                            Event::Presence { node, .. } | Event::Typing { node, .. } => {
                                *node == node_id
                            }
                            Event::Msg { .. } => false,
                        };
                        if !from_here {
                            registry.do_send(RemoteEvent { event });
                        }
                    }
                    Err(e) => log::warn!("Undecodable event on a room channel: {e}."),
                }
            }
            me.do_send(Disconnected { generation });
        });
    }
}

impl Actor for RedisBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.connect(ctx);
    }
}

impl Handler<Connected> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Connected, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        if self.generation > 1 {
            self.metrics.redis_reconnects.fetch_add(1, Relaxed);
        }
        log::info!(
            "Redis pub/sub connected; subscribing {} rooms.",
            self.rooms.len()
        );
        let mut sink = msg.sink.clone();
        self.sink = Some(msg.sink);
        let channels: Vec<String> = self.rooms.iter().map(|r| keys::channel(r)).collect();
        let registry = self.registry.clone();
        ctx.spawn(
            async move {
                if !channels.is_empty() {
                    if let Err(e) = sink.subscribe(&channels).await {
                        log::warn!("Redis re-subscribe failed: {e}.");
                    }
                }
                // Whatever was published while we were away is in history.
                registry.do_send(Resync);
            }
            .into_actor(self),
        );
    }
}

impl Handler<Disconnected> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Disconnected, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        log::warn!("Redis pub/sub connection lost; reconnecting.");
        self.registry.do_send(RelayDown);
        self.sink = None;
        self.connect(ctx);
    }
}

impl Handler<Subscribe> for RedisBridge {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        let sink = match (self.rooms.insert(msg.room.clone()), &self.sink) {
            (true, Some(sink)) => Some(sink.clone()),
            // Subscribed already, or on the next connect.
            _ => None,
        };
        let channel = keys::channel(&msg.room);
        Box::pin(async move {
            if let Some(mut sink) = sink {
                if let Err(e) = sink.subscribe(&channel).await {
                    log::warn!("Redis subscribe to {channel} failed: {e}.");
                }
            }
        })
    }
}

impl Handler<Unsubscribe> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        if !self.rooms.remove(&msg.room) {
            return;
        }
        if let Some(mut sink) = self.sink.clone() {
            let channel = keys::channel(&msg.room);
            ctx.spawn(
                async move {
                    let _ = sink.unsubscribe(&channel).await;
                }
                .into_actor(self),
            );
        }
    }
}

impl Handler<RemoteMembers> for RedisBridge {
    type Result = ResponseFuture<Vec<(String, User)>>;
    fn handle(&mut self, msg: RemoteMembers, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.publisher.clone();
        let node_prefix = format!("{}|", self.node_id);
        Box::pin(async move {
            let all: redis::RedisResult<Vec<(String, String)>> =
                conn.hgetall(keys::members(&msg.room)).await;
            let all = all.unwrap_or_else(|e| {
                log::warn!("Reading the members of {} failed: {e}.", msg.room);
                Vec::new()
            });
            all.into_iter()
                .filter(|(field, _)| !field.starts_with(&node_prefix))
                .filter_map(|(field, value)| {
                    let node = field.split('|').next()?.to_string();
                    Some((node, serde_json::from_str(&value).ok()?))
                })
                .collect()
        })
    }
}

impl Handler<Heartbeat> for RedisBridge {
    type Result = ();
    fn handle(&mut self, _: Heartbeat, ctx: &mut Context<Self>) {
        let mut conn = self.publisher.clone();
        let node = self.node_id.clone();
        ctx.spawn(
            async move {
                let beat: redis::RedisResult<()> = conn
                    .zadd(keys::NODES, &node, crate::protocol::now_ms())
                    .await;
                if let Err(e) = beat {
                    log::warn!("Node heartbeat failed: {e}.");
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<SweepDeadNodes> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: SweepDeadNodes, ctx: &mut Context<Self>) {
        let mut conn = self.publisher.clone();
        let cutoff = crate::protocol::now_ms() - msg.dead_after.as_millis() as i64;
        ctx.spawn(
            async move {
                if let Err(e) = sweep(&mut conn, cutoff).await {
                    log::warn!("Sweeping dead nodes failed: {e}.");
                }
            }
            .into_actor(self),
        );
    }
}

/// Removes every member of the nodes whose last heartbeat is older than
/// `cutoff`, and tells the rooms they left.
async fn sweep(conn: &mut ConnectionManager, cutoff: i64) -> redis::RedisResult<()> {
    let dead: Vec<String> = conn.zrangebyscore(keys::NODES, "-inf", cutoff).await?;
    for node in dead {
        let rooms: Vec<String> = conn.smembers(keys::node_rooms(&node)).await?;
        let prefix = format!("{node}|");
        for room in rooms {
            let members = keys::members(&room);
            let all: Vec<(String, String)> = conn.hgetall(&members).await?;
            let mut left = Vec::new();
            for (field, value) in all {
                if field.starts_with(&prefix) {
                    let _: () = conn.hdel(&members, &field).await?;
                    if let Ok(user) = serde_json::from_str::<User>(&value) {
                        left.push(user);
                    }
                }
            }
            if !left.is_empty() {
                let event = Event::Presence {
                    node: node.clone(),
                    room: room.clone(),
                    joined: Vec::new(),
                    left,
                };
                if let Ok(payload) = serde_json::to_string(&event) {
                    let _: () = conn.publish(keys::channel(&room), payload).await?;
                }
            }
        }
        let _: () = conn.del(keys::node_rooms(&node)).await?;
        let _: () = conn.zrem(keys::NODES, &node).await?;
        log::info!("Node {node} stopped sending heartbeats; its members were removed.");
    }
    Ok(())
}

impl Handler<Broadcast> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Broadcast, ctx: &mut Context<Self>) {
        let Ok(payload) = serde_json::to_string(&msg.event) else {
            return;
        };
        let mut conn = self.publisher.clone();
        let channel = keys::channel(&msg.room);
        let mut pipe = redis::pipe();
        if let Event::Presence { joined, left, .. } = &msg.event {
            // The cluster-wide member list: one field per user and node.
            let members = keys::members(&msg.room);
            for user in joined {
                let field = format!("{}|{}", self.node_id, user.id);
                let value = serde_json::to_string(user).unwrap_or_default();
                pipe.hset(&members, field, value).ignore();
            }
            for user in left {
                pipe.hdel(&members, format!("{}|{}", self.node_id, user.id))
                    .ignore();
            }
            if !joined.is_empty() {
                pipe.sadd(keys::node_rooms(&self.node_id), &msg.room)
                    .ignore();
            }
        }
        pipe.publish(&channel, payload).ignore();
        ctx.spawn(
            async move {
                let sent: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
                if let Err(e) = sent {
                    log::debug!("Publishing to {channel} failed: {e}.");
                }
            }
            .into_actor(self),
        );
    }
}
