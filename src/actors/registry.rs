//! `RoomRegistry`: one per node. Finds or starts the `Room` actor of a room,
//! routes joins, leaves, typing and committed messages to it, and stops it
//! when its last local member leaves. It is also the node's in-process bus:
//! the message store reports every durable message here, in `seq` order.
//! Every room operation passes through this one mailbox, so a room is never
//! stopped while a join for it is on its way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use futures_util::future::join_all;

use super::messages::{Publish, RelayDown, RemoteEvent, Resync, Shutdown};
use super::outbox::SessionOutbox;
use super::redis_bridge::{RedisBridge, Unsubscribe};
use super::room::{
    Backfill, CountUsers, Deliver, GetMembers, JoinRoom, Joined, LeaveRoom, OpeningFee, Remote,
    Room, TypingIn,
};
use crate::metrics::Metrics;
use crate::protocol::{frames, User};
use crate::store::MessageStore;

/// A session opened; it will be told to close when the node drains.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub session_id: u64,
    pub addr: Recipient<Shutdown>,
}

/// A session closed; it leaves every room it was in.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub session_id: u64,
    pub rooms: Vec<String>,
}

/// A session joins a room; answers the room's members after the join, or
/// that it was refused because it would open the room and `opening_fee`
/// was not paid (see [`JoinRoom`]).
#[derive(Message)]
#[rtype(result = "Joined")]
pub struct Join {
    pub session_id: u64,
    pub user: User,
    pub room: String,
    pub outbox: Arc<SessionOutbox>,
    pub opening_fee: OpeningFee,
}

/// A session leaves a room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session_id: u64,
    pub room: String,
}

/// A user is typing in a room; relayed at most once per `every`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    pub session_id: u64,
    pub room: String,
    pub user: User,
    pub every: Duration,
}

/// The members (distinct users) of a room on this node.
#[derive(Message)]
#[rtype(result = "Vec<User>")]
pub struct Members {
    pub room: String,
}

/// Warm the recent-history cache of every room with local members (a
/// scheduled job).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WarmCaches;

/// Cluster mode: relay rooms through this bridge from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachBridge {
    pub bridge: Addr<RedisBridge>,
}

/// A page of the rooms with local members, by name: the first `limit`
/// whose names sort after `after`, and how many distinct users are in each.
/// Only the rooms of the page are asked for their count.
#[derive(Message)]
#[rtype(result = "HashMap<String, usize>")]
pub struct ListRooms {
    pub after: Option<String>,
    pub limit: usize,
}

/// Asks every session to close once its accepted messages are answered;
/// answers how many sessions were asked.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Drain;

struct RoomEntry {
    addr: Addr<Room>,
    /// Local sessions in the room; the room actor stops when it reaches 0.
    sessions: usize,
}

/// The node's directory of rooms and sessions.
pub struct RoomRegistry {
    rooms: HashMap<String, RoomEntry>,
    sessions: HashMap<u64, Recipient<Shutdown>>,
    node_id: String,
    store: Arc<dyn MessageStore>,
    /// Cluster mode only: the relay to the other nodes.
    bridge: Option<Addr<RedisBridge>>,
    /// See [`Room::new`].
    fanout_window: Duration,
    metrics: Arc<Metrics>,
}

impl RoomRegistry {
    pub fn new(
        node_id: String,
        store: Arc<dyn MessageStore>,
        fanout_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            rooms: HashMap::new(),
            sessions: HashMap::new(),
            node_id,
            store,
            bridge: None,
            fanout_window,
            metrics,
        }
    }

    /// The rooms with local members: one, or all for `None`.
    fn entries<'a>(
        &'a self,
        room: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = &'a RoomEntry> + 'a> {
        match room {
            Some(room) => Box::new(self.rooms.get(room).into_iter()),
            None => Box::new(self.rooms.values()),
        }
    }

    fn leave(&mut self, session_id: u64, room: &str) {
        let Some(entry) = self.rooms.get_mut(room) else {
            return;
        };
        entry.addr.do_send(LeaveRoom { session_id });
        entry.sessions = entry.sessions.saturating_sub(1);
        if entry.sessions == 0 {
            // Dropping the last address stops the room once its mailbox,
            // with the leave just sent, is empty.
            self.rooms.remove(room);
            if let Some(bridge) = &self.bridge {
                bridge.do_send(Unsubscribe {
                    room: room.to_string(),
                });
            }
        }
    }
}

impl Actor for RoomRegistry {
    type Context = Context<Self>;
}

impl Handler<Connect> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) {
        self.sessions.insert(msg.session_id, msg.addr);
    }
}

impl Handler<Disconnect> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.sessions.remove(&msg.session_id);
        for room in &msg.rooms {
            self.leave(msg.session_id, room);
        }
    }
}

impl Handler<Join> for RoomRegistry {
    type Result = ResponseFuture<Joined>;
    fn handle(&mut self, msg: Join, _: &mut Context<Self>) -> Self::Result {
        let entry = self.rooms.entry(msg.room.clone()).or_insert_with(|| {
            let room = Room::new(
                msg.room.clone(),
                self.node_id.clone(),
                self.store.clone(),
                self.bridge.clone(),
                self.fanout_window,
                self.metrics.clone(),
            );
            RoomEntry {
                addr: room.start(),
                sessions: 0,
            }
        });
        entry.sessions += 1;
        // `send` enqueues now, so the join is ahead of any later message.
        // A new room answers once it is subscribed and knows where its
        // history ends, so the session's replay after it misses nothing.
        // A refused join counts here until the session's `Leave`, which
        // drops the room again if no one else came.
        let reply = entry.addr.send(JoinRoom {
            session_id: msg.session_id,
            user: msg.user,
            outbox: msg.outbox,
            opening_fee: msg.opening_fee,
        });
        Box::pin(async move { reply.await.unwrap_or_default() })
    }
}

impl Handler<Leave> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        self.leave(msg.session_id, &msg.room);
    }
}

impl Handler<Typing> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) {
        if let Some(entry) = self.rooms.get(&msg.room) {
            entry.addr.do_send(TypingIn {
                session_id: msg.session_id,
                user: msg.user,
                every: msg.every,
            });
        }
    }
}

impl Handler<Publish> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        // No local member: nothing to deliver here.
        if let Some(entry) = self.rooms.get(&msg.message.room) {
            // Serialised once; every member shares the same bytes.
            let frame = ByteString::from(frames::msg(&msg.message));
            entry.addr.do_send(Deliver {
                seq: msg.message.seq,
                frame,
            });
        }
    }
}

impl Handler<Members> for RoomRegistry {
    type Result = ResponseFuture<Vec<User>>;
    fn handle(&mut self, msg: Members, _: &mut Context<Self>) -> Self::Result {
        let ask = self.rooms.get(&msg.room).map(|e| e.addr.send(GetMembers));
        Box::pin(async move {
            match ask {
                Some(ask) => ask.await.unwrap_or_default(),
                None => Vec::new(),
            }
        })
    }
}

impl Handler<RemoteEvent> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: RemoteEvent, _: &mut Context<Self>) {
        if let Some(entry) = self.rooms.get(msg.event.room()) {
            entry.addr.do_send(Remote { event: msg.event });
        }
    }
}

impl Handler<RelayDown> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: RelayDown, _: &mut Context<Self>) {
        for entry in self.entries(msg.room.as_deref()) {
            entry.addr.do_send(RelayDown {
                room: msg.room.clone(),
            });
        }
    }
}

impl Handler<Resync> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: Resync, _: &mut Context<Self>) {
        for entry in self.entries(msg.room.as_deref()) {
            entry.addr.do_send(Backfill);
        }
    }
}

impl Handler<WarmCaches> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, _: WarmCaches, ctx: &mut Context<Self>) {
        let warming: Vec<_> = self
            .rooms
            .keys()
            .map(|room| self.store.warm(room))
            .collect();
        ctx.spawn(
            async move {
                join_all(warming).await;
            }
            .into_actor(self),
        );
    }
}

impl Handler<AttachBridge> for RoomRegistry {
    type Result = ();
    fn handle(&mut self, msg: AttachBridge, _: &mut Context<Self>) {
        self.bridge = Some(msg.bridge);
    }
}

impl Handler<ListRooms> for RoomRegistry {
    type Result = ResponseFuture<HashMap<String, usize>>;
    fn handle(&mut self, msg: ListRooms, _: &mut Context<Self>) -> Self::Result {
        let mut page: Vec<(&String, &RoomEntry)> = self
            .rooms
            .iter()
            .filter(|(name, _)| msg.after.as_ref().is_none_or(|a| *name > a))
            .collect();
        page.sort_unstable_by_key(|(name, _)| *name);
        page.truncate(msg.limit);
        let asks: Vec<_> = page
            .into_iter()
            .map(|(name, e)| {
                let name = name.clone();
                let ask = e.addr.send(CountUsers);
                async move { (name, ask.await.unwrap_or(0)) }
            })
            .collect();
        Box::pin(async move { join_all(asks).await.into_iter().collect() })
    }
}

impl Handler<Drain> for RoomRegistry {
    type Result = usize;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> usize {
        for addr in self.sessions.values() {
            addr.do_send(Shutdown);
        }
        self.sessions.len()
    }
}
