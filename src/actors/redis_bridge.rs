//! `RedisBridge`: one per node in cluster mode. Subscribes to the channel
//! of each room that has local members (subscribing when a room gets its
//! first local member, unsubscribing after its last) and hands what other
//! nodes publish to the registry: messages as they become durable, presence
//! and typing. Publishes this node's presence and typing, keeps the
//! cluster-wide member lists and the node's set of rooms with local
//! members, heartbeats and sweeps dead nodes.
//!
//! On one Redis server the channels are classic pub/sub on one connection.
//! On a Redis Cluster they are sharded pub/sub: the cluster connection
//! subscribes each channel on the shard that owns its slot and moves the
//! subscription when the slot moves or the shard fails over.
//!
//! Pub/sub is at-most-once. Whenever the relay may have missed something
//! (its connection dropped, a shard went away, a slot moved), it tells the
//! rooms concerned (`RelayDown`, so they give up no missing `seq`), and once
//! it listens again it asks them to backfill from history by `seq`
//! (`Resync`), so a gap in Redis is never a gap for clients. Sessions never
//! wait on any of this.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, PushInfo, PushKind};

use super::messages::{Publish, RelayDown, RelayReports, RemoteEvent, Resync};
use crate::config::RedisSettings;
use crate::metrics::Metrics;
use crate::protocol::User;
use crate::store::channel::RoomEvent;
use crate::store::keys;
use crate::store::redis::{self as store_redis, RedisConn};

/// First and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a room's subscription waits for the node's first pub/sub
/// connection to come up before the room goes on without it (its rooms are
/// subscribed when it comes). After an outage rooms do not wait: they are
/// subscribed and resynced on the reconnect.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

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
    pub event: RoomEvent,
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

/// The node drains: take it off the live nodes now, so that a new process
/// with its id need not wait for the old heartbeat to go stale.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Remove the members of nodes silent for longer than `dead_after`
/// (a scheduled job, on nodes with the sweep role).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SweepDeadNodes {
    pub dead_after: Duration,
}

/// The relay listens again after a gap (internal): on one server, the new
/// pub/sub connection; on a cluster, none (its connection resubscribes by
/// itself).
#[derive(Message)]
#[rtype(result = "()")]
struct Connected {
    sink: Option<PubSubSink>,
    generation: u64,
}

/// The relay may have missed messages of every room (internal): the
/// connection of one server dropped, or one of a cluster's did.
#[derive(Message)]
#[rtype(result = "()")]
struct Disconnected {
    generation: u64,
}

/// What a cluster's push channel says about one room's channel (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct ChannelNews {
    channel: String,
    news: News,
}

enum News {
    /// Subscribed (again): whatever was published before is in history.
    Subscribed,
    /// Unsubscribed by the server: the channel's slot moved to another
    /// shard.
    Dropped,
}

/// The node's set of rooms with local members in Redis
/// (`keys::node_rooms`), which the sweep reads when the node dies. It
/// follows [`Subscribe`] and [`Unsubscribe`]: changes are written one batch
/// at a time, in the order the bridge made them, so a room left and joined
/// again at once ends up in the set. A room's latest change replaces one
/// not yet written, so what waits is bounded by the rooms.
#[derive(Default)]
struct NodeRooms {
    /// Changes not written yet: room, and whether it has local members.
    pending: HashMap<String, bool>,
    /// A batch is being written.
    writing: bool,
}

/// How the relay listens.
enum Listener {
    /// One server: a pub/sub connection, opened again after it drops.
    Single { sink: Option<PubSubSink> },
    /// A cluster: one connection that keeps each sharded subscription on
    /// the shard owning its slot (`None` until it is up).
    Cluster { conn: Option<ClusterConnection> },
}

/// The node's relay through Redis pub/sub.
pub struct RedisBridge {
    settings: RedisSettings,
    listener: Listener,
    /// The command connection: presence, heartbeats, the sweep.
    publisher: RedisConn,
    registry: RelayReports,
    node_id: String,
    metrics: Arc<Metrics>,
    /// Rooms with local members: subscribed now or on the next connect.
    rooms: HashSet<String>,
    /// Tells a stale connection's reports from the current one's.
    generation: u64,
    /// On a cluster, the rooms are being subscribed again after a lost
    /// connection (see [`Rejoin`]).
    rejoining: bool,
    node_rooms: NodeRooms,
    /// Subscriptions made before the first pub/sub connection is up:
    /// answered once it is and their rooms are subscribed, so that a room
    /// of a node just started does not tell its first member it has joined
    /// before it can hear the other nodes.
    waiting: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The pub/sub connection has been up once.
    listened: bool,
}

impl RedisBridge {
    pub fn new(
        settings: RedisSettings,
        publisher: RedisConn,
        registry: RelayReports,
        node_id: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let listener = if settings.cluster {
            Listener::Cluster { conn: None }
        } else {
            Listener::Single { sink: None }
        };
        Self {
            settings,
            listener,
            publisher,
            registry,
            node_id,
            metrics,
            rooms: HashSet::new(),
            generation: 0,
            rejoining: false,
            node_rooms: NodeRooms::default(),
            waiting: Vec::new(),
            listened: false,
        }
    }

    /// Whether the pub/sub connection is up.
    fn listening(&self) -> bool {
        match &self.listener {
            Listener::Single { sink, .. } => sink.is_some(),
            Listener::Cluster { conn } => conn.is_some(),
        }
    }

    /// Subscribes to the channels of every room, then answers the
    /// subscriptions that waited for the connection.
    fn subscribe_all(&mut self) -> futures_util::future::BoxFuture<'static, ()> {
        let channels: Vec<String> = self.rooms.iter().map(|r| keys::channel(r)).collect();
        let subscribing = self.subscribe(channels);
        let waiting = std::mem::take(&mut self.waiting);
        self.listened = true;
        Box::pin(async move {
            subscribing.await;
            for waiter in waiting {
                let _ = waiter.send(());
            }
        })
    }

    /// Notes whether `room` has local members, for the node's room set.
    fn note_room(&mut self, room: &str, present: bool, ctx: &mut Context<Self>) {
        self.node_rooms.pending.insert(room.to_string(), present);
        self.write_node_rooms(ctx);
    }

    /// Writes the pending changes of the node's room set, unless a batch is
    /// on its way; a failed batch is tried again a little later, under any
    /// change made since.
    fn write_node_rooms(&mut self, ctx: &mut Context<Self>) {
        if self.node_rooms.writing || self.node_rooms.pending.is_empty() {
            return;
        }
        self.node_rooms.writing = true;
        let batch = std::mem::take(&mut self.node_rooms.pending);
        let key = keys::node_rooms(&self.node_id);
        let mut pipe = redis::pipe();
        for (room, present) in &batch {
            if *present {
                pipe.sadd(&key, room).ignore();
            } else {
                pipe.srem(&key, room).ignore();
            }
        }
        let mut conn = self.publisher.clone();
        let written = async move { pipe.query_async::<()>(&mut conn).await };
        ctx.spawn(written.into_actor(self).map(move |written, act, ctx| {
            act.node_rooms.writing = false;
            if let Err(e) = written {
                log::warn!("Updating this node's room set failed: {e}; retrying.");
                for (room, present) in batch {
                    act.node_rooms.pending.entry(room).or_insert(present);
                }
                ctx.run_later(BACKOFF_MAX, |act, ctx| act.write_node_rooms(ctx));
                return;
            }
            act.write_node_rooms(ctx);
        }));
    }

    /// How this node publishes to a room's channel.
    fn publish_command(&self) -> &'static str {
        store_redis::Publish::of(&self.settings).command()
    }

    /// Connects in the background, retrying with backoff until it works.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let me = ctx.address();
        let reports = self.registry.clone();
        let node_id = self.node_id.clone();
        match &self.listener {
            Listener::Single { .. } => {
                let settings = self.settings.clone();
                actix::spawn(async move {
                    let pubsub = with_backoff("pub/sub", || {
                        let client = store_redis::single_client(&settings);
                        async move {
                            match client {
                                Ok(client) => client.get_async_pubsub().await,
                                Err(e) => {
                                    Err(redis::RedisError::from(std::io::Error::other(e.detail())))
                                }
                            }
                        }
                    })
                    .await;
                    let (sink, mut stream) = pubsub.split();
                    me.do_send(Connected {
                        sink: Some(sink),
                        generation,
                    });
                    while let Some(msg) = stream.next().await {
                        if let Ok(payload) = msg.get_payload::<String>() {
                            relay(&reports, &node_id, &payload);
                        }
                    }
                    me.do_send(Disconnected { generation });
                });
            }
            Listener::Cluster { .. } => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
                let built = store_redis::cluster_builder(&self.settings).and_then(|builder| {
                    builder
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .push_sender(tx)
                        .build()
                        .map_err(|e| crate::error::ChatError::Unavailable(e.to_string()))
                });
                let client = match built {
                    Ok(client) => client,
                    Err(e) => {
                        log::error!(
                            "Redis Cluster settings are unusable for pub/sub: {}.",
                            e.detail()
                        );
                        return;
                    }
                };
                let connected = me.clone();
                actix::spawn(async move {
                    let conn =
                        with_backoff("cluster pub/sub", || client.get_async_connection()).await;
                    connected.do_send(ClusterUp { conn, generation });
                });
                actix::spawn(async move {
                    while let Some(push) = rx.recv().await {
                        on_push(&me, &reports, &node_id, push, generation);
                    }
                });
            }
        }
    }

    /// Subscribes `channels`, on whichever connection is up; a failure is
    /// logged (the connection's drop, reported on its own, brings a
    /// resubscription).
    fn subscribe(&self, channels: Vec<String>) -> futures_util::future::BoxFuture<'static, ()> {
        let single = match &self.listener {
            Listener::Single { sink, .. } => Some(sink.clone()),
            Listener::Cluster { .. } => None,
        };
        let cluster = match &self.listener {
            Listener::Cluster { conn } => conn.clone(),
            Listener::Single { .. } => None,
        };
        Box::pin(async move {
            if channels.is_empty() {
                return;
            }
            let subscribed = match (single, cluster) {
                (Some(Some(mut sink)), _) => sink.subscribe(&channels).await,
                (_, Some(mut conn)) => conn.ssubscribe(&channels).await,
                _ => Ok(()), // subscribed on the next connect
            };
            if let Err(e) = subscribed {
                log::warn!(
                    "Redis subscribe to {} channels failed: {e}.",
                    channels.len()
                );
            }
        })
    }
}

/// The cluster's pub/sub connection is up (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct ClusterUp {
    conn: ClusterConnection,
    generation: u64,
}

/// Calls `attempt` until it works, waiting from [`BACKOFF_MIN`], doubling
/// up to [`BACKOFF_MAX`].
async fn with_backoff<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(e) => {
                log::warn!("Redis {what} connection failed: {e}; retrying in {backoff:?}.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Hands one event from a room's channel to the registry: every message,
/// and the presence and typing of other nodes.
fn relay(reports: &RelayReports, node_id: &str, payload: &str) {
    match serde_json::from_str::<RoomEvent>(payload) {
        Ok(RoomEvent::Msg { m, .. }) => reports.publish.do_send(Publish { message: m }),
        Ok(event) if event.from_node() == Some(node_id) => {}
        Ok(event) => reports.remote.do_send(RemoteEvent { event }),
        Err(e) => log::warn!("Undecodable event on a room channel: {e}."),
    }
}

/// Sorts one push of a cluster connection: a message goes to the rooms,
/// news of a subscription or a lost connection to the bridge.
fn on_push(
    me: &Addr<RedisBridge>,
    reports: &RelayReports,
    node_id: &str,
    push: PushInfo,
    generation: u64,
) {
    let text = |i: usize| match push.data.get(i) {
        Some(v) => redis::from_redis_value_ref::<String>(v).ok(),
        None => None,
    };
    match push.kind {
        PushKind::SMessage => {
            if let Some(payload) = text(1) {
                relay(reports, node_id, &payload);
            }
        }
        PushKind::SSubscribe => {
            if let Some(channel) = text(0) {
                me.do_send(ChannelNews {
                    channel,
                    news: News::Subscribed,
                });
            }
        }
        PushKind::SUnsubscribe => {
            if let Some(channel) = text(0) {
                me.do_send(ChannelNews {
                    channel,
                    news: News::Dropped,
                });
            }
        }
        PushKind::Disconnection => me.do_send(Disconnected { generation }),
        _ => {}
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
        if let Listener::Single { sink, .. } = &mut self.listener {
            *sink = msg.sink;
        }
        let subscribing = self.subscribe_all();
        let registry = self.registry.clone();
        ctx.spawn(
            async move {
                subscribing.await;
                // Whatever was published while we were away is in history.
                registry.resync.do_send(Resync { room: None });
            }
            .into_actor(self),
        );
    }
}

impl Handler<ClusterUp> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: ClusterUp, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        log::info!(
            "Redis Cluster pub/sub connected; subscribing {} rooms.",
            self.rooms.len()
        );
        self.listener = Listener::Cluster {
            conn: Some(msg.conn),
        };
        ctx.spawn(self.subscribe_all().into_actor(self));
    }
}

impl Handler<Disconnected> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Disconnected, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        self.registry.down.do_send(RelayDown { room: None });
        match &mut self.listener {
            Listener::Single { sink, .. } => {
                log::warn!("Redis pub/sub connection lost; reconnecting.");
                *sink = None;
                self.connect(ctx);
            }
            Listener::Cluster { conn } => {
                log::warn!("A Redis Cluster pub/sub connection was lost.");
                self.metrics.redis_reconnects.fetch_add(1, Relaxed);
                if conn.is_some() && !self.rejoining {
                    self.rejoining = true;
                    ctx.notify_later(
                        Rejoin {
                            backoff: BACKOFF_MIN,
                        },
                        BACKOFF_MIN,
                    );
                }
            }
        }
    }
}

/// Subscribe every room again after a lost cluster connection, then ask
/// all of them to backfill (internal). The connection resubscribes by
/// itself once it knows where each slot lives now, but it learns that only
/// when a command routed by slot fails; after a master fails over, nothing
/// else it carries is (a `PING` goes to the masters it already knows), so
/// its subscriptions would wait on the lost master's return. An
/// `SSUBSCRIBE` per room is routed by the room's slot: it lands on the
/// shard's master, or makes the connection refresh its slot map and move
/// every subscription there. Retried with backoff until each one is
/// confirmed.
#[derive(Message)]
#[rtype(result = "()")]
struct Rejoin {
    backoff: Duration,
}

impl Handler<Rejoin> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Rejoin, ctx: &mut Context<Self>) {
        let Listener::Cluster { conn: Some(conn) } = &self.listener else {
            self.rejoining = false;
            return;
        };
        let subscribing = self.rooms.iter().map(|room| {
            let mut conn = conn.clone();
            let channel = keys::channel(room);
            async move { conn.ssubscribe(&channel).await.is_ok() }
        });
        let subscribing = futures_util::future::join_all(subscribing);
        ctx.spawn(subscribing.into_actor(self).map(move |done, act, ctx| {
            if done.iter().all(|ok| *ok) {
                act.rejoining = false;
                act.registry.resync.do_send(Resync { room: None });
            } else {
                let backoff = (msg.backoff * 2).min(BACKOFF_MAX);
                ctx.notify_later(Rejoin { backoff }, msg.backoff);
            }
        }));
    }
}

impl Handler<ChannelNews> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: ChannelNews, ctx: &mut Context<Self>) {
        let Some(room) = keys::room_of_channel(&msg.channel) else {
            return;
        };
        if !self.rooms.contains(room) {
            return; // unsubscribed on purpose
        }
        let room = room.to_string();
        match msg.news {
            News::Subscribed => self.registry.resync.do_send(Resync { room: Some(room) }),
            News::Dropped => {
                // The slot moved: subscribe again, on its new owner.
                log::info!("Room {room}: its channel moved to another shard; subscribing there.");
                self.registry.down.do_send(RelayDown { room: Some(room) });
                ctx.spawn(self.subscribe(vec![msg.channel]).into_actor(self));
            }
        }
    }
}

impl Handler<Subscribe> for RedisBridge {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> Self::Result {
        if !self.rooms.insert(msg.room.clone()) {
            // Subscribed already, or on the next connect.
            return Box::pin(async {});
        }
        self.note_room(&msg.room, true, ctx);
        if !self.listening() && !self.listened {
            // Subscribed when the first connection comes up.
            let (done, subscribed) = tokio::sync::oneshot::channel();
            self.waiting.push(done);
            return Box::pin(async move {
                let _ = tokio::time::timeout(SUBSCRIBE_WAIT, subscribed).await;
            });
        }
        self.subscribe(vec![keys::channel(&msg.room)])
    }
}

impl Handler<Unsubscribe> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        if !self.rooms.remove(&msg.room) {
            return;
        }
        self.note_room(&msg.room, false, ctx);
        let channel = keys::channel(&msg.room);
        let unsubscribing: futures_util::future::BoxFuture<'static, ()> = match &self.listener {
            Listener::Single {
                sink: Some(sink), ..
            } => {
                let mut sink = sink.clone();
                Box::pin(async move {
                    let _ = sink.unsubscribe(&channel).await;
                })
            }
            Listener::Cluster { conn: Some(conn) } => {
                let mut conn = conn.clone();
                Box::pin(async move {
                    let _ = conn.sunsubscribe(&channel).await;
                })
            }
            _ => return,
        };
        ctx.spawn(unsubscribing.into_actor(self));
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

impl Handler<Retire> for RedisBridge {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Retire, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.publisher.clone();
        let node = self.node_id.clone();
        Box::pin(async move {
            let retired: redis::RedisResult<()> = conn.zrem(keys::NODES, &node).await;
            if let Err(e) = retired {
                log::warn!("Taking node {node} off the live nodes failed: {e}.");
            }
        })
    }
}

impl Handler<SweepDeadNodes> for RedisBridge {
    type Result = ();
    fn handle(&mut self, msg: SweepDeadNodes, ctx: &mut Context<Self>) {
        let mut conn = self.publisher.clone();
        let cutoff = crate::protocol::now_ms() - msg.dead_after.as_millis() as i64;
        let publish = self.publish_command();
        ctx.spawn(
            async move {
                if let Err(e) = sweep(&mut conn, cutoff, publish).await {
                    log::warn!("Sweeping dead nodes failed: {e}.");
                }
            }
            .into_actor(self),
        );
    }
}

/// Removes every member of the nodes whose last heartbeat is older than
/// `cutoff`, and tells the rooms they left.
async fn sweep(conn: &mut RedisConn, cutoff: i64, publish: &str) -> redis::RedisResult<()> {
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
                let event = RoomEvent::Presence {
                    node: node.clone(),
                    room: room.clone(),
                    joined: Vec::new(),
                    left,
                };
                if let Ok(payload) = serde_json::to_string(&event) {
                    let _: () = redis::cmd(publish)
                        .arg(keys::channel(&room))
                        .arg(payload)
                        .query_async(conn)
                        .await?;
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
        // The room's member list and its channel share the room's slot, so
        // they go in one pipeline; the node's own room set follows
        // `Subscribe` and `Unsubscribe`.
        let mut pipe = redis::pipe();
        if let RoomEvent::Presence { joined, left, .. } = &msg.event {
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
        }
        pipe.cmd(self.publish_command())
            .arg(&channel)
            .arg(payload)
            .ignore();
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
