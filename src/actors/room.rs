//! `Room`: one per room with members on this node. Keeps the local members,
//! tells them who comes and goes, relays typing, and fans each durable
//! message out to them in `seq` order. A room actor holds no message data:
//! it stops when the registry drops it after its last member leaves.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use super::session::{FrameKind, SessionOutbox};
use crate::metrics::Metrics;
use crate::protocol::{frames, User};

/// A session joins; answers the members (distinct users) after the join.
#[derive(Message)]
#[rtype(result = "Vec<User>")]
pub struct JoinRoom {
    pub session_id: u64,
    pub user: User,
    pub outbox: Arc<SessionOutbox>,
}

/// A session leaves (or disconnected).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveRoom {
    pub session_id: u64,
}

/// A durable message, already serialised as a `msg` frame.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub seq: u64,
    pub frame: ByteString,
}

/// A member is typing; relayed to the other users' sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TypingIn {
    pub session_id: u64,
    pub user: User,
}

/// The distinct users in the room.
#[derive(Message)]
#[rtype(result = "Vec<User>")]
pub struct GetMembers;

/// How many distinct users are in the room.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountUsers;

struct Member {
    user: User,
    outbox: Arc<SessionOutbox>,
}

/// The live state of one room on this node.
pub struct Room {
    name: Arc<str>,
    members: HashMap<u64, Member>,
    /// Sessions per user id: presence changes only on a user's first
    /// session in and last session out.
    users: HashMap<String, usize>,
    /// Highest seq delivered; a message at or below it is a duplicate.
    delivered: u64,
    metrics: Arc<Metrics>,
}

impl Room {
    pub fn new(name: String, metrics: Arc<Metrics>) -> Self {
        Self {
            name: name.into(),
            members: HashMap::new(),
            users: HashMap::new(),
            delivered: 0,
            metrics,
        }
    }

    fn member_list(&self) -> Vec<User> {
        let mut seen = HashMap::new();
        for m in self.members.values() {
            seen.entry(m.user.id.as_str()).or_insert(&m.user);
        }
        let mut list: Vec<User> = seen.into_values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        list
    }

    /// Sends a presence or typing frame to every session but `except`'s
    /// user.
    fn tell_others(&self, except_user: &str, frame: ByteString) {
        for m in self.members.values() {
            if m.user.id != except_user {
                m.outbox.push(frame.clone(), FrameKind::Droppable);
            }
        }
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.metrics.rooms.fetch_add(1, Relaxed);
        log::debug!("Room {} started.", self.name);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.metrics.rooms.fetch_sub(1, Relaxed);
        log::debug!("Room {} stopped.", self.name);
    }
}

impl Handler<JoinRoom> for Room {
    type Result = MessageResult<JoinRoom>;
    fn handle(&mut self, msg: JoinRoom, _: &mut Context<Self>) -> Self::Result {
        let count = self.users.entry(msg.user.id.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            let frame = frames::presence(&self.name, std::slice::from_ref(&msg.user), &[]);
            self.tell_others(&msg.user.id, frame.into());
        }
        self.members.insert(
            msg.session_id,
            Member {
                user: msg.user,
                outbox: msg.outbox,
            },
        );
        MessageResult(self.member_list())
    }
}

impl Handler<LeaveRoom> for Room {
    type Result = ();
    fn handle(&mut self, msg: LeaveRoom, _: &mut Context<Self>) {
        let Some(member) = self.members.remove(&msg.session_id) else {
            return;
        };
        let last = match self.users.get_mut(&member.user.id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.users.remove(&member.user.id);
                true
            }
        };
        if last {
            let frame = frames::presence(&self.name, &[], std::slice::from_ref(&member.user));
            self.tell_others(&member.user.id, frame.into());
        }
    }
}

impl Handler<Deliver> for Room {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        if msg.seq <= self.delivered {
            return;
        }
        self.delivered = msg.seq;
        for m in self.members.values() {
            m.outbox.push(
                msg.frame.clone(),
                FrameKind::Message {
                    room: self.name.clone(),
                    seq: msg.seq,
                },
            );
        }
    }
}

impl Handler<TypingIn> for Room {
    type Result = ();
    fn handle(&mut self, msg: TypingIn, _: &mut Context<Self>) {
        if !self.members.contains_key(&msg.session_id) {
            return;
        }
        let frame = frames::typing(&self.name, &msg.user);
        self.tell_others(&msg.user.id, frame.into());
    }
}

impl Handler<GetMembers> for Room {
    type Result = MessageResult<GetMembers>;
    fn handle(&mut self, _: GetMembers, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.member_list())
    }
}

impl Handler<CountUsers> for Room {
    type Result = usize;
    fn handle(&mut self, _: CountUsers, _: &mut Context<Self>) -> usize {
        self.users.len()
    }
}
