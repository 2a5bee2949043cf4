//! `Room`: one per room with members on this node. Keeps the local members,
//! tells them who comes and goes (here and, through the `RedisBridge`, on
//! other nodes), relays typing, and fans each durable message out to them in
//! `seq` order. A room actor holds no message data: it stops when the
//! registry drops it after its last local member leaves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;

use super::messages::RelayDown;
use super::outbox::{MessageBatch, SessionOutbox};
use super::redis_bridge::{Broadcast, RedisBridge, RemoteMembers, Subscribe};
use crate::metrics::Metrics;
use crate::protocol::{frames, User};
use crate::store::channel::RoomEvent;
use crate::store::{MessageStore, HOLD_BACK};
/// Messages read per step when a room backfills after a relay gap.
const BACKFILL_PAGE: usize = 500;
/// Reads a backfill tries, and the pause between them.
const BACKFILL_ATTEMPTS: u32 = 10;
const BACKFILL_RETRY: Duration = Duration::from_millis(500);
/// How long presence changes are gathered before one `presence` frame
/// tells the members about all of them: when many join at once (a node
/// restarts and its clients come back) each member gets a few frames, not
/// one per arrival.
const PRESENCE_WINDOW: Duration = Duration::from_millis(50);

/// Pays for opening a room (see [`JoinRoom`]): false when the user cannot.
pub type OpeningFee = Box<dyn FnOnce() -> bool + Send>;

/// A session joins; answers the members (distinct users) after the join,
/// and the highest seq delivered before it. A join that opens the room (no
/// message yet, and no member here or on any other node) is taken only
/// once `opening_fee` is paid; else it is refused and leaves no trace.
#[derive(Message)]
#[rtype(result = "Joined")]
pub struct JoinRoom {
    pub session_id: u64,
    pub user: User,
    pub outbox: Arc<SessionOutbox>,
    pub opening_fee: OpeningFee,
}

/// The answer to a join.
#[derive(Debug, Default)]
pub struct Joined {
    /// The join would have opened the room, and its fee was not paid: the
    /// session is not a member.
    pub refused: bool,
    pub members: Vec<User>,
    /// The highest seq the room delivered before the session joined
    /// (`None` before it knows where its history ends). Every later
    /// delivery reaches the session; a replay must stop here, because a
    /// lower seq may still be on its way (held back or in flight), and the
    /// session would drop it once it wrote a higher one.
    pub delivered: Option<u64>,
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

/// A member is typing; relayed to the other users' sessions, at most once
/// per `every` for each user.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TypingIn {
    pub session_id: u64,
    pub user: User,
    pub every: Duration,
}

/// Presence or typing from another node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Remote {
    pub event: RoomEvent,
}

/// The relay had a gap: deliver what was stored after the last delivered
/// seq.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Backfill;

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

/// Puts messages from any number of nodes back in `seq` order: a message
/// waits while a lower seq may still be in flight, at most [`HOLD_BACK`];
/// a seq already passed is a duplicate.
#[derive(Default)]
struct SeqGate {
    /// Highest seq delivered; `None` before the first.
    delivered: Option<u64>,
    /// Messages waiting for a lower seq, with when they arrived.
    held: BTreeMap<u64, (Instant, ByteString)>,
}

impl SeqGate {
    /// Takes a message; returns what may be delivered now, in order.
    fn offer(&mut self, seq: u64, frame: ByteString, now: Instant) -> Vec<(u64, ByteString)> {
        match self.delivered {
            Some(d) if seq <= d => Vec::new(),
            Some(d) if seq > d + 1 => {
                self.held.entry(seq).or_insert((now, frame));
                Vec::new()
            }
            _ => {
                self.delivered = Some(seq);
                let mut out = vec![(seq, frame)];
                self.release_contiguous(&mut out);
                out
            }
        }
    }

    /// Gives up on missing seqs whose successors waited too long.
    fn expire(&mut self, now: Instant) -> Vec<(u64, ByteString)> {
        let mut out = Vec::new();
        while let Some(entry) = self.held.first_entry() {
            if now.saturating_duration_since(entry.get().0) < HOLD_BACK {
                break;
            }
            let (seq, (_, frame)) = entry.remove_entry();
            self.delivered = Some(seq);
            out.push((seq, frame));
            self.release_contiguous(&mut out);
        }
        out
    }

    fn release_contiguous(&mut self, out: &mut Vec<(u64, ByteString)>) {
        while let Some(d) = self.delivered {
            match self.held.remove(&(d + 1)) {
                Some((_, frame)) => {
                    self.delivered = Some(d + 1);
                    out.push((d + 1, frame));
                }
                None => break,
            }
        }
    }
}

/// When each user's typing was last relayed: a user's typing goes out at
/// most once per interval, over all of the user's sessions here.
#[derive(Default)]
struct TypingThrottle {
    relayed: HashMap<String, Instant>,
}

impl TypingThrottle {
    /// Whether `user_id`'s typing is relayed now; notes it if so.
    fn allow(&mut self, user_id: &str, every: Duration, now: Instant) -> bool {
        if let Some(at) = self.relayed.get(user_id) {
            if now.saturating_duration_since(*at) < every {
                return false;
            }
        }
        self.relayed.insert(user_id.to_string(), now);
        true
    }

    /// The user left the room: nothing to remember.
    fn forget(&mut self, user_id: &str) {
        self.relayed.remove(user_id);
    }
}

/// The live state of one room on this node.
pub struct Room {
    name: Arc<str>,
    node_id: String,
    members: HashMap<u64, Member>,
    /// Sessions per user id: presence changes only on a user's first
    /// session in and last session out.
    users: HashMap<String, usize>,
    /// Users present on other nodes, by (node, user id).
    remote: HashMap<(String, String), User>,
    /// Nodes each user of `remote` is present on.
    remote_nodes: HashMap<String, usize>,
    /// Users whose presence changed since the last `presence` frame, with
    /// whether they were present then.
    presence_changes: HashMap<String, (User, bool)>,
    /// A flush of `presence_changes` is scheduled.
    presence_flush: bool,
    /// Messages released by the gate and not yet sent to the members, in
    /// `seq` order.
    outgoing: Vec<(u64, ByteString)>,
    /// A fan-out of `outgoing` is scheduled.
    fanout_scheduled: bool,
    /// When the last fan-out went out.
    last_fanout: Option<Instant>,
    /// The least time between two fan-outs (see [`Room::new`]).
    fanout_window: Duration,
    typing: TypingThrottle,
    gate: SeqGate,
    /// A backfill is reading the store; another is to follow it.
    backfilling: bool,
    backfill_again: bool,
    /// The relay is down and no backfill has started since (see
    /// [`RelayDown`]).
    relay_down: bool,
    store: Arc<dyn MessageStore>,
    bridge: Option<Addr<RedisBridge>>,
    metrics: Arc<Metrics>,
}

impl Room {
    /// `fanout_window` is the least time between two fan-outs of the room's
    /// messages. A message that comes after a quiet spell goes out at once;
    /// those that follow it within the window are gathered and sent
    /// together, so that under load each member gets several messages in
    /// one mailbox message and one socket write instead of one each:
    /// writing to the sockets is most of a busy node's work (see
    /// BENCHMARKS.md), and the window bounds the latency this adds.
    pub fn new(
        name: String,
        node_id: String,
        store: Arc<dyn MessageStore>,
        bridge: Option<Addr<RedisBridge>>,
        fanout_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.into(),
            node_id,
            members: HashMap::new(),
            users: HashMap::new(),
            remote: HashMap::new(),
            remote_nodes: HashMap::new(),
            presence_changes: HashMap::new(),
            presence_flush: false,
            outgoing: Vec::new(),
            fanout_scheduled: false,
            last_fanout: None,
            fanout_window,
            typing: TypingThrottle::default(),
            gate: SeqGate::default(),
            backfilling: false,
            backfill_again: false,
            relay_down: false,
            store,
            bridge,
            metrics,
        }
    }

    fn member_list(&self) -> Vec<User> {
        let mut seen = HashMap::new();
        for m in self.members.values() {
            seen.entry(m.user.id.as_str()).or_insert(&m.user);
        }
        for user in self.remote.values() {
            seen.entry(user.id.as_str()).or_insert(user);
        }
        let mut list: Vec<User> = seen.into_values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        list
    }

    /// Sends a presence or typing frame to every session but those of
    /// `except_user`.
    fn tell_others(&self, except_user: &str, frame: ByteString) {
        for m in self.members.values() {
            if m.user.id != except_user {
                m.outbox.push_droppable(frame.clone());
            }
        }
    }

    /// Whether a user is in the room here or on another node.
    fn present(&self, user_id: &str) -> bool {
        self.users.contains_key(user_id) || self.remote_nodes.contains_key(user_id)
    }

    fn add_remote(&mut self, node: String, user: User) {
        let id = user.id.clone();
        if self.remote.insert((node, id.clone()), user).is_none() {
            *self.remote_nodes.entry(id).or_insert(0) += 1;
        }
    }

    fn remove_remote(&mut self, node: String, user_id: &str) {
        if self.remote.remove(&(node, user_id.to_string())).is_some() {
            match self.remote_nodes.get_mut(user_id) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.remote_nodes.remove(user_id);
                }
            }
        }
    }

    /// Notes that `user`'s presence may be about to change (call before
    /// the change), and schedules the frame that will tell the members.
    fn presence_may_change(&mut self, user: &User, ctx: &mut Context<Self>) {
        if !self.presence_changes.contains_key(&user.id) {
            let before = self.present(&user.id);
            self.presence_changes
                .insert(user.id.clone(), (user.clone(), before));
        }
        if !self.presence_flush {
            self.presence_flush = true;
            ctx.run_later(PRESENCE_WINDOW, |act, _| act.flush_presence());
        }
    }

    /// Tells the members who came and went since the last frame: one frame
    /// for all of them, and for the sessions of a user in it, the same
    /// without that user. Someone who came and went within the window is
    /// not mentioned.
    fn flush_presence(&mut self) {
        self.presence_flush = false;
        let mut joined = Vec::new();
        let mut left = Vec::new();
        for (id, (user, before)) in std::mem::take(&mut self.presence_changes) {
            match (before, self.present(&id)) {
                (false, true) => joined.push(user),
                (true, false) => left.push(user),
                _ => {}
            }
        }
        if joined.is_empty() && left.is_empty() {
            return;
        }
        let order = |a: &User, b: &User| a.name.cmp(&b.name).then(a.id.cmp(&b.id));
        joined.sort_by(order);
        left.sort_by(order);
        let common: ByteString = frames::presence(&self.name, &joined, &left).into();
        let changed: HashSet<&str> = joined.iter().chain(&left).map(|u| u.id.as_str()).collect();
        let mut own: HashMap<&str, Option<ByteString>> = HashMap::new();
        for m in self.members.values() {
            let frame = if changed.contains(m.user.id.as_str()) {
                let id = m.user.id.as_str();
                own.entry(id)
                    .or_insert_with(|| {
                        let others = |list: &[User]| -> Vec<User> {
                            list.iter().filter(|u| u.id != id).cloned().collect()
                        };
                        let (j, l) = (others(&joined), others(&left));
                        (!j.is_empty() || !l.is_empty())
                            .then(|| frames::presence(&self.name, &j, &l).into())
                    })
                    .clone()
            } else {
                Some(common.clone())
            };
            if let Some(frame) = frame {
                m.outbox.push_droppable(frame);
            }
        }
    }

    fn broadcast(&self, event: RoomEvent) {
        if let Some(bridge) = &self.bridge {
            bridge.do_send(Broadcast {
                room: self.name.to_string(),
                event,
            });
        }
    }

    /// Whether a join now would open the room: it has no message yet, and
    /// no member here or on any other node. Known from the room's own state,
    /// so joining an existing room costs no store read.
    fn opened_by_join(&self) -> bool {
        self.members.is_empty() && self.remote.is_empty() && self.gate.delivered == Some(0)
    }

    /// Sends messages the gate released to every member: at once after a
    /// quiet spell, else together with those that follow within
    /// the room's fan-out window.
    fn fan_out(&mut self, ready: Vec<(u64, ByteString)>, ctx: &mut Context<Self>) {
        if ready.is_empty() {
            return;
        }
        self.outgoing.extend(ready);
        if self.fanout_scheduled {
            return;
        }
        self.fanout_scheduled = true;
        let wait = self
            .last_fanout
            .map(|at| (at + self.fanout_window).saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        // Either way, messages already in the mailbox go out with this one.
        if wait.is_zero() {
            ctx.notify(FanOut);
        } else {
            ctx.notify_later(FanOut, wait);
        }
    }

    /// Reads stored messages after the last delivered seq, a page at a
    /// time, into the gate. While it reads, the gate gives up no missing
    /// seq: the store may hold it.
    fn backfill(&mut self, ctx: &mut Context<Self>) {
        // From here on `backfilling` holds the gate while the store is read.
        self.relay_down = false;
        if self.backfilling {
            // The running one may have read before what is asked for now.
            self.backfill_again = true;
            return;
        }
        if let Some(from) = self.gate.delivered {
            self.backfill_from(from, 1, ctx);
        }
    }

    fn backfill_from(&mut self, from: u64, attempt: u32, ctx: &mut Context<Self>) {
        self.backfilling = true;
        let page = self.store.after(&self.name, from, BACKFILL_PAGE);
        ctx.spawn(page.into_actor(self).map(move |page, act, ctx| {
            match page {
                Ok(page) => {
                    let now = Instant::now();
                    for m in &page {
                        let ready = act.gate.offer(m.seq, frames::msg(m).into(), now);
                        act.fan_out(ready, ctx);
                    }
                    if let (true, Some(last)) = (page.len() == BACKFILL_PAGE, page.last()) {
                        act.backfill_from(last.seq, 1, ctx);
                        return;
                    }
                }
                // Right after a reconnect the store's own connection may
                // not be back yet.
                Err(e) if attempt < BACKFILL_ATTEMPTS => {
                    log::info!("Backfill of {} failed: {e:?}; retrying.", act.name);
                    ctx.run_later(BACKFILL_RETRY, move |act, ctx| {
                        act.backfill_from(from, attempt + 1, ctx);
                    });
                    return;
                }
                Err(e) => log::warn!("Backfill of {} failed {attempt} times: {e:?}.", act.name),
            }
            act.backfilling = false;
            if std::mem::take(&mut act.backfill_again) {
                act.backfill(ctx);
            }
        }));
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.metrics.rooms.fetch_add(1, Relaxed);
        // Before anything else: subscribe, then learn where the room's
        // history ends. Every later message is above that point and will
        // arrive; a lower one arriving late is held back, not lost.
        let room = self.name.to_string();
        let bridge = self.bridge.clone();
        let store = self.store.clone();
        let ready = async move {
            let remote = match bridge {
                Some(bridge) => {
                    let _ = bridge.send(Subscribe { room: room.clone() }).await;
                    bridge
                        .send(RemoteMembers { room: room.clone() })
                        .await
                        .unwrap_or_default()
                }
                None => Vec::new(),
            };
            let gap = store.open_gap(&room).await;
            (remote, store.last_seq(&room).await, gap)
        };
        ctx.wait(ready.into_actor(self).map(|(remote, last, gap), act, ctx| {
            for (node, user) in remote {
                act.add_remote(node, user);
            }
            match (last, gap) {
                // A lower seq may still come: start below it, and take what
                // was published above it (before the subscription) from the
                // store; the gate holds that until the missing one comes.
                (Ok(last), Ok(Some(below))) if below < last => {
                    act.gate.delivered = Some(below);
                    act.backfill(ctx);
                }
                (Ok(last), _) => act.gate.delivered = Some(last),
                (Err(e), _) => log::warn!("Room {} cannot read its last seq: {e:?}.", act.name),
            }
        }));
        // Release held messages whose missing predecessors never came.
        ctx.run_interval(HOLD_BACK / 5, |act, ctx| {
            if !act.gate.held.is_empty() && !act.backfilling && !act.relay_down {
                let ready = act.gate.expire(Instant::now());
                act.fan_out(ready, ctx);
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.metrics.rooms.fetch_sub(1, Relaxed);
    }
}

impl Handler<JoinRoom> for Room {
    type Result = MessageResult<JoinRoom>;
    fn handle(&mut self, msg: JoinRoom, ctx: &mut Context<Self>) -> Self::Result {
        if self.opened_by_join() && !(msg.opening_fee)() {
            return MessageResult(Joined {
                refused: true,
                ..Joined::default()
            });
        }
        if !self.users.contains_key(&msg.user.id) {
            self.presence_may_change(&msg.user, ctx);
        }
        let count = self.users.entry(msg.user.id.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.broadcast(RoomEvent::Presence {
                node: self.node_id.clone(),
                room: self.name.to_string(),
                joined: vec![msg.user.clone()],
                left: Vec::new(),
            });
        }
        self.members.insert(
            msg.session_id,
            Member {
                user: msg.user,
                outbox: msg.outbox,
            },
        );
        MessageResult(Joined {
            refused: false,
            members: self.member_list(),
            delivered: self.gate.delivered,
        })
    }
}

impl Handler<LeaveRoom> for Room {
    type Result = ();
    fn handle(&mut self, msg: LeaveRoom, ctx: &mut Context<Self>) {
        let Some(member) = self.members.remove(&msg.session_id) else {
            return;
        };
        if self.users.get(&member.user.id) == Some(&1) {
            self.presence_may_change(&member.user, ctx);
        }
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
            self.typing.forget(&member.user.id);
            self.broadcast(RoomEvent::Presence {
                node: self.node_id.clone(),
                room: self.name.to_string(),
                joined: Vec::new(),
                left: vec![member.user],
            });
        }
    }
}

impl Handler<Deliver> for Room {
    type Result = ();
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        let ready = self.gate.offer(msg.seq, msg.frame, Instant::now());
        self.fan_out(ready, ctx);
    }
}

/// Sends the gathered messages to the members (see [`Room::fan_out`]).
#[derive(Message)]
#[rtype(result = "()")]
struct FanOut;

impl Handler<FanOut> for Room {
    type Result = ();
    fn handle(&mut self, _: FanOut, _: &mut Context<Self>) {
        self.fanout_scheduled = false;
        self.last_fanout = Some(Instant::now());
        let frames = std::mem::take(&mut self.outgoing);
        if frames.is_empty() {
            return;
        }
        let batch = Arc::new(MessageBatch::new(self.name.clone(), frames));
        for m in self.members.values() {
            m.outbox.push_messages(batch.clone());
        }
    }
}

impl Handler<TypingIn> for Room {
    type Result = ();
    fn handle(&mut self, msg: TypingIn, _: &mut Context<Self>) {
        if !self.members.contains_key(&msg.session_id)
            || !self.typing.allow(&msg.user.id, msg.every, Instant::now())
        {
            return;
        }
        let frame = frames::typing(&self.name, &msg.user);
        self.tell_others(&msg.user.id, frame.into());
        self.broadcast(RoomEvent::Typing {
            node: self.node_id.clone(),
            room: self.name.to_string(),
            user: msg.user,
        });
    }
}

impl Handler<Remote> for Room {
    type Result = ();
    fn handle(&mut self, msg: Remote, ctx: &mut Context<Self>) {
        match msg.event {
            RoomEvent::Presence {
                node, joined, left, ..
            } => {
                // A user counts once, however many nodes they are on: the
                // local members hear only of a first arrival and a last exit.
                for user in joined {
                    self.presence_may_change(&user, ctx);
                    self.add_remote(node.clone(), user);
                }
                for user in left {
                    self.presence_may_change(&user, ctx);
                    self.remove_remote(node.clone(), &user.id);
                }
            }
            RoomEvent::Typing { user, .. } => {
                let frame = frames::typing(&self.name, &user);
                self.tell_others(&user.id, frame.into());
            }
            RoomEvent::Msg { .. } => {}
        }
    }
}

impl Handler<Backfill> for Room {
    type Result = ();
    fn handle(&mut self, _: Backfill, ctx: &mut Context<Self>) {
        self.backfill(ctx);
    }
}

impl Handler<RelayDown> for Room {
    type Result = ();
    fn handle(&mut self, _: RelayDown, _: &mut Context<Self>) {
        self.relay_down = true;
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
        self.member_list().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(out: &[(u64, ByteString)]) -> Vec<u64> {
        out.iter().map(|(s, _)| *s).collect()
    }

    fn f(s: &str) -> ByteString {
        ByteString::from(s.to_string())
    }

    #[test]
    fn in_order_messages_pass_and_duplicates_drop() {
        let mut g = SeqGate::default();
        let t = Instant::now();
        assert_eq!(seqs(&g.offer(5, f("5"), t)), vec![5]);
        assert_eq!(seqs(&g.offer(6, f("6"), t)), vec![6]);
        assert!(g.offer(6, f("6"), t).is_empty());
        assert!(g.offer(3, f("3"), t).is_empty());
    }

    #[test]
    fn a_gap_holds_back_until_filled() {
        let mut g = SeqGate::default();
        let t = Instant::now();
        g.offer(1, f("1"), t);
        assert!(g.offer(3, f("3"), t).is_empty());
        assert!(g.offer(4, f("4"), t).is_empty());
        assert_eq!(seqs(&g.offer(2, f("2"), t)), vec![2, 3, 4]);
        assert!(g.held.is_empty());
    }

    #[test]
    fn a_seq_that_never_comes_is_skipped_after_the_hold() {
        let mut g = SeqGate::default();
        let t = Instant::now();
        g.offer(1, f("1"), t);
        g.offer(3, f("3"), t);
        g.offer(5, f("5"), t + Duration::from_millis(300));
        assert!(g.expire(t + HOLD_BACK / 2).is_empty());
        // 3 waited long enough; 5 has not yet, but 4 is missing too.
        assert_eq!(seqs(&g.expire(t + HOLD_BACK)), vec![3]);
        assert_eq!(
            seqs(&g.expire(t + Duration::from_millis(300) + HOLD_BACK)),
            vec![5]
        );
        // The skipped seq arriving late is not delivered out of order.
        assert!(g.offer(2, f("2"), t + HOLD_BACK * 3).is_empty());
    }

    #[test]
    fn typing_is_relayed_once_per_interval_per_user() {
        let mut typing = TypingThrottle::default();
        let every = Duration::from_secs(3);
        let t = Instant::now();
        assert!(typing.allow("ann", every, t));
        assert!(!typing.allow("ann", every, t + Duration::from_millis(2900)));
        assert!(typing.allow("bob", every, t), "each user on their own");
        assert!(typing.allow("ann", every, t + every));
        typing.forget("ann");
        assert!(!typing.relayed.contains_key("ann"), "forgotten on leave");
        assert!(typing.allow("ann", every, t + every));
    }
}
