//! `WsSession`: one per WebSocket connection. Parses and checks client
//! frames, rate-limits them, forwards them to the registry and the store,
//! and writes node frames back; owns its heartbeat.
//!
//! Everything about the transport (actix-web-actors) lives in this file, so
//! that moving to another WebSocket crate touches only it.
//!
//! ## Slow readers
//! actix stops running a session's actor while its socket cannot take more
//! bytes, so a session cannot police its own queue. Instead every frame for
//! it goes through its [`SessionOutbox`], which counts the bytes queued and
//! not yet taken by the socket: above `outbound_soft_bytes` typing and
//! presence frames are dropped; above `outbound_hard_bytes` nothing more is
//! queued and the session is asked to close with 1008. A client that takes
//! no bytes at all keeps its session parked; the kernel drops such a
//! connection after [`STALLED_SOCKET_TIMEOUT`] (`TCP_USER_TIMEOUT`, set on
//! every accepted socket). Either way the room and every other member go
//! on at full speed, and the cut-off client can resume with `join since`.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{Codec, Item};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;

use super::registry::{Connect, Disconnect, Join, Leave, Members, Typing};
use crate::error::ChatError;
use crate::limits::{AddressSlot, TokenBucket};
use crate::protocol::{frames, parse_client_frame, ChatMessage, ClientOp, User};
use crate::store::NewMessage;
use crate::AppState;

/// Messages read from the store per replay step; the session waits for its
/// queue to drain between steps, so a long replay never floods it.
const REPLAY_PAGE: usize = 500;
/// How long a replay waits before checking a busy queue again.
const REPLAY_BACKOFF: Duration = Duration::from_millis(20);

/// How long a connection may keep bytes its client does not take (no
/// acknowledgement, or a receive window that stays shut) before the kernel
/// drops it. This is what ends a client that never reads: its session is
/// parked behind the full socket and cannot close it itself.
const STALLED_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The node is draining: finish what was accepted, then close.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// A frame for this session, already counted in its outbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Outbound {
    pub frame: ByteString,
    pub kind: FrameKind,
}

/// What an outbound frame is, for the slow-reader policy and the replay
/// bookkeeping.
#[derive(Debug, Clone)]
pub enum FrameKind {
    /// A `msg` frame: never dropped, and held back while its room replays.
    Message { room: Arc<str>, seq: u64 },
    /// Typing and presence: dropped first when the reader is slow.
    Droppable,
}

/// Prepares an accepted connection (from `on_connect`): sets
/// [`STALLED_SOCKET_TIMEOUT`] as its `TCP_USER_TIMEOUT`.
pub fn configure_connection(conn: &dyn std::any::Any) {
    let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(STALLED_SOCKET_TIMEOUT)) {
        log::debug!("Cannot set TCP_USER_TIMEOUT on a connection: {e}.");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (tcp, STALLED_SOCKET_TIMEOUT);
}

/// The shared door to one session: counts the bytes queued for it and
/// applies the slow-reader policy.
pub struct SessionOutbox {
    /// Set when the session starts.
    addr: OnceLock<Recipient<Outbound>>,
    /// Bytes of frames handed to the session and not yet taken by its
    /// socket writer.
    queued: AtomicUsize,
    /// Set once the connection is being cut off.
    closing: AtomicBool,
    /// Set once the session is off the connections gauge: when it is cut
    /// off, or when it stops, whichever comes first.
    uncounted: AtomicBool,
    soft: usize,
    hard: usize,
    app: Arc<AppState>,
}

impl SessionOutbox {
    /// Queues a frame for the session, or applies the slow-reader policy.
    pub fn push(&self, frame: ByteString, kind: FrameKind) {
        let Some(addr) = self.addr.get() else {
            return;
        };
        if self.closing.load(Relaxed) {
            return;
        }
        let size = wire_len(frame.len());
        let queued = self.queued.load(Relaxed);
        if matches!(kind, FrameKind::Droppable) && queued + size > self.soft {
            self.app.metrics.frames_dropped.fetch_add(1, Relaxed);
            return;
        }
        if queued + size > self.hard {
            self.cut_off();
            return;
        }
        self.queued.fetch_add(size, Relaxed);
        if let FrameKind::Message { .. } = kind {
            self.app.metrics.messages_out.fetch_add(1, Relaxed);
        }
        addr.do_send(Outbound { frame, kind });
    }

    /// Closes a connection that reads too slowly with a 1008 close frame,
    /// written once the client takes the bytes queued before it; a client
    /// that takes none is dropped by the kernel after
    /// [`STALLED_SOCKET_TIMEOUT`].
    fn cut_off(&self) {
        if self.closing.swap(true, Relaxed) {
            return;
        }
        self.app.metrics.slow_closes.fetch_add(1, Relaxed);
        self.uncount();
        log::warn!("Closing a slow reader: its outbound queue is full.");
        if let Some(addr) = self.addr.get() {
            addr.do_send(Outbound {
                frame: ByteString::new(),
                kind: FrameKind::Droppable,
            });
        }
    }

    /// Takes the session off the connections gauge, once.
    fn uncount(&self) {
        if !self.uncounted.swap(true, Relaxed) {
            self.app.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    fn account(&self, size: usize) {
        self.queued.fetch_add(size, Relaxed);
    }

    fn release(&self, size: usize) {
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(size)));
    }
}

/// Bytes a server text frame of `payload` bytes takes on the wire.
fn wire_len(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

/// The response body: the session's encoded frames, counted out of its
/// outbox as the socket writer takes them.
struct CountedBody<S> {
    inner: Pin<Box<S>>,
    outbox: Arc<SessionOutbox>,
}

impl<S> Stream for CountedBody<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            self.outbox.release(bytes.len());
        }
        polled
    }
}

/// Where a joined room stands for this session.
enum RoomState {
    /// Joined; replay under way. Live messages wait here until the replay
    /// has been written, then those not replayed follow it.
    Replaying { held: Vec<(u64, ByteString)> },
    /// Live, with the highest seq written: a live frame at or below it was
    /// already sent by the replay (the store can be ahead of the relay).
    Live { last: u64 },
}

/// A join's replay: the room, where it stops (the highest seq the room had
/// delivered when the session joined; later ones come live) and the members
/// for `joined`.
struct Replay {
    room: String,
    upto: Option<u64>,
    members: Vec<User>,
}

/// A message split in continuation frames, being put together.
struct Partial {
    text: bool,
    data: BytesMut,
}

/// One WebSocket connection.
pub struct WsSession {
    id: u64,
    /// Public session id shown in `welcome`.
    name: String,
    user: User,
    app: Arc<AppState>,
    outbox: Arc<SessionOutbox>,
    /// Anything from the client counts as a sign of life.
    last_heard: Instant,
    rooms: HashMap<String, RoomState>,
    rate: TokenBucket,
    partial: Option<Partial>,
    /// Sends waiting for the store; a draining session closes at zero.
    in_flight: usize,
    /// Bytes of live messages held while rooms replay.
    held_bytes: usize,
    draining: bool,
    /// This connection's place under the per-address cap, given back when
    /// the session is dropped.
    _slot: Option<AddressSlot>,
}

impl WsSession {
    /// Upgrades the request and starts the session for `user`.
    pub fn start(
        app: Arc<AppState>,
        user: User,
        slot: Option<AddressSlot>,
        req: &HttpRequest,
        stream: web::Payload,
    ) -> Result<HttpResponse, ChatError> {
        let mut response = ws::handshake(req).map_err(|e| ChatError::bad_request(e.to_string()))?;
        let limits = &app.settings.limits;
        let outbox = Arc::new(SessionOutbox {
            addr: OnceLock::new(),
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            uncounted: AtomicBool::new(false),
            soft: limits.outbound_soft_bytes,
            hard: limits.outbound_hard_bytes,
            app: app.clone(),
        });
        let session = WsSession {
            id: app.next_session_id(),
            name: ulid::Ulid::new().to_string(),
            user,
            rate: TokenBucket::new(limits.rate_per_sec, limits.rate_burst, Instant::now()),
            outbox: outbox.clone(),
            last_heard: Instant::now(),
            rooms: HashMap::new(),
            partial: None,
            in_flight: 0,
            held_bytes: 0,
            draining: false,
            _slot: slot,
            app: app.clone(),
        };
        let codec = Codec::new().max_size(limits.max_frame_bytes);
        let body = WebsocketContext::with_codec(session, stream, codec);
        Ok(response.streaming(CountedBody {
            inner: Box::pin(body),
            outbox,
        }))
    }

    /// Writes a frame the session itself produced.
    fn emit(&self, ctx: &mut WebsocketContext<Self>, frame: String) {
        self.outbox.account(wire_len(frame.len()));
        ctx.text(frame);
    }

    fn emit_error(
        &self,
        ctx: &mut WebsocketContext<Self>,
        error: &ChatError,
        reference: Option<&str>,
    ) {
        self.app.metrics.error(error);
        self.emit(ctx, frames::error(error, reference));
    }

    fn close(&mut self, ctx: &mut WebsocketContext<Self>, code: CloseCode, reason: &str) {
        ctx.close(Some(CloseReason {
            code,
            description: Some(reason.into()),
        }));
        ctx.stop();
    }

    fn heartbeat(&mut self, ctx: &mut WebsocketContext<Self>) {
        let limits = &self.app.settings.limits;
        let timeout = Duration::from_secs(limits.client_timeout_secs);
        if self.last_heard.elapsed() > timeout {
            log::debug!("Session {} timed out.", self.id);
            self.close(ctx, CloseCode::Away, "no sign of life from the client");
            return;
        }
        self.outbox.account(2);
        ctx.ping(b"");
    }

    fn on_text(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        let limits = &self.app.settings.limits;
        let parsed = parse_client_frame(text, limits.max_text_chars);
        let is_ping = matches!(parsed, Ok(ClientOp::Ping { .. }));
        // `send`, `typing` and `history` also cost a token of the user's
        // bucket, shared by all of the user's connections to this node.
        let per_user = matches!(
            parsed,
            Ok(ClientOp::Send { .. } | ClientOp::Typing { .. } | ClientOp::History { .. })
        );
        let now = Instant::now();
        if !is_ping
            && (!self.rate.take(now) || (per_user && !self.app.user_rates.take(&self.user.id, now)))
        {
            let reference = match &parsed {
                Ok(ClientOp::Send { cid, .. }) => Some(cid.as_str()),
                Ok(op) => Some(op.name()),
                Err(e) => e.reference.as_deref(),
            };
            self.emit_error(ctx, &ChatError::RateLimited, reference);
            return;
        }
        match parsed {
            Ok(op) => self.on_op(op, ctx),
            Err(e) => self.emit_error(ctx, &e.error, e.reference.as_deref()),
        }
    }

    fn on_op(&mut self, op: ClientOp, ctx: &mut WebsocketContext<Self>) {
        match op {
            ClientOp::Join { room, since } => self.join(room, since, ctx),
            ClientOp::Leave { room } => {
                let Some(state) = self.rooms.remove(&room) else {
                    return self.emit_error(ctx, &ChatError::NotJoined, Some("leave"));
                };
                if let RoomState::Replaying { held } = state {
                    let bytes: usize = held.iter().map(|(_, f)| wire_len(f.len())).sum();
                    self.held_bytes = self.held_bytes.saturating_sub(bytes);
                }
                self.app.registry.do_send(Leave {
                    session_id: self.id,
                    room,
                });
            }
            ClientOp::Send { room, text, cid } => {
                if !self.rooms.contains_key(&room) {
                    return self.emit_error(ctx, &ChatError::NotJoined, Some(&cid));
                }
                if self.draining {
                    let e = ChatError::Unavailable("the node is shutting down".into());
                    return self.emit_error(ctx, &e, Some(&cid));
                }
                self.send(room, text, cid, ctx);
            }
            ClientOp::Typing { room } => {
                if !self.rooms.contains_key(&room) {
                    return self.emit_error(ctx, &ChatError::NotJoined, Some("typing"));
                }
                self.app.registry.do_send(Typing {
                    session_id: self.id,
                    room,
                    user: self.user.clone(),
                });
            }
            ClientOp::History {
                room,
                before,
                limit,
            } => {
                if !self.rooms.contains_key(&room) {
                    return self.emit_error(ctx, &ChatError::NotJoined, Some("history"));
                }
                let page = self.app.store.before(&room, before, limit);
                ctx.spawn(page.into_actor(self).map(move |page, act, ctx| match page {
                    Ok(page) => {
                        let frame = frames::history(&room, &page.messages, page.has_more);
                        act.emit(ctx, frame);
                    }
                    Err(e) => act.emit_error(ctx, &e, Some("history")),
                }));
            }
            ClientOp::Ping { t } => self.emit(ctx, frames::pong(&t)),
        }
    }

    fn send(&mut self, room: String, text: String, cid: String, ctx: &mut WebsocketContext<Self>) {
        let received = Instant::now();
        self.in_flight += 1;
        let append = self.app.store.append(NewMessage {
            room,
            user: self.user.clone(),
            text,
            cid: cid.clone(),
        });
        ctx.spawn(append.into_actor(self).map(move |result, act, ctx| {
            act.in_flight -= 1;
            match result {
                Ok(accepted) => {
                    if !accepted.duplicate {
                        act.app.metrics.messages_in.fetch_add(1, Relaxed);
                    }
                    act.app.metrics.ack_latency(received.elapsed());
                    act.emit(ctx, frames::ack(&accepted.message));
                }
                Err(e) => {
                    log::warn!("Message refused: {e:?}.");
                    act.emit_error(ctx, &e, Some(&cid));
                }
            }
            if act.draining && act.in_flight == 0 {
                act.close(ctx, CloseCode::Away, "the node is shutting down");
            }
        }));
    }

    fn join(&mut self, room: String, since: Option<u64>, ctx: &mut WebsocketContext<Self>) {
        let max_rooms = self.app.settings.limits.max_rooms_per_session;
        let joined = self.rooms.len();
        match self.rooms.get_mut(&room) {
            Some(state) => {
                // Joined already: replay again if asked, up to what was
                // written live, then `joined`.
                let upto = match *state {
                    RoomState::Live { last } => Some(last),
                    RoomState::Replaying { .. } => None,
                };
                if upto.is_some() {
                    *state = RoomState::Replaying { held: Vec::new() };
                }
                let members = self.app.registry.send(Members { room: room.clone() });
                ctx.wait(members.into_actor(self).map(move |members, act, ctx| {
                    let plan = Replay {
                        room,
                        upto,
                        members: members.unwrap_or_default(),
                    };
                    act.replay(plan, since.unwrap_or(0), since.is_some(), ctx);
                }));
            }
            None if joined >= max_rooms => {
                let e = ChatError::Forbidden(format!("at most {max_rooms} rooms per connection"));
                self.emit_error(ctx, &e, Some("join"));
            }
            None => {
                self.rooms
                    .insert(room.clone(), RoomState::Replaying { held: Vec::new() });
                let join = self.app.registry.send(Join {
                    session_id: self.id,
                    user: self.user.clone(),
                    room: room.clone(),
                    outbox: self.outbox.clone(),
                });
                // Wait: frames after this join must see it done.
                ctx.wait(join.into_actor(self).map(move |joined, act, ctx| {
                    let joined = joined.unwrap_or_default();
                    let plan = Replay {
                        room,
                        upto: joined.delivered,
                        members: joined.members,
                    };
                    act.replay(plan, since.unwrap_or(0), since.is_some(), ctx);
                }));
            }
        }
    }

    /// Writes every stored message after `cursor` up to `plan.upto` (when
    /// `replay` is asked), a page at a time, then `joined`, then the live
    /// messages held meanwhile that the replay did not cover.
    fn replay(
        &mut self,
        plan: Replay,
        cursor: u64,
        replay: bool,
        ctx: &mut WebsocketContext<Self>,
    ) {
        if !replay {
            let last = self.app.store.last_seq(&plan.room);
            ctx.spawn(last.into_actor(self).map(move |last, act, ctx| match last {
                Ok(last_seq) => act.finish_join(&plan.room, 0, last_seq, &plan.members, ctx),
                Err(e) => act.fail_join(&plan.room, &e, ctx),
            }));
            return;
        }
        if plan.upto.is_some_and(|upto| cursor >= upto) {
            self.write_replay(plan, VecDeque::new(), false, cursor, ctx);
            return;
        }
        let page = self.app.store.after(&plan.room, cursor, REPLAY_PAGE);
        ctx.spawn(page.into_actor(self).map(move |page, act, ctx| match page {
            Ok(mut page) => {
                let mut full = page.len() == REPLAY_PAGE;
                if let Some(upto) = plan.upto {
                    let fetched = page.len();
                    page.retain(|m| m.seq <= upto);
                    full &= page.len() == fetched;
                }
                act.write_replay(plan, page.into(), full, cursor, ctx);
            }
            Err(e) => act.fail_join(&plan.room, &e, ctx),
        }));
    }

    /// Writes replayed messages while the socket keeps up (the queue stays
    /// under the soft limit), waiting for it to drain when it does not.
    fn write_replay(
        &mut self,
        plan: Replay,
        mut page: VecDeque<ChatMessage>,
        full: bool,
        mut cursor: u64,
        ctx: &mut WebsocketContext<Self>,
    ) {
        if !self.rooms.contains_key(&plan.room) {
            return; // left meanwhile
        }
        while self.outbox.queued.load(Relaxed) <= self.outbox.soft {
            let Some(m) = page.pop_front() else {
                break;
            };
            cursor = m.seq;
            self.app.metrics.messages_out.fetch_add(1, Relaxed);
            self.emit(ctx, frames::msg(&m));
        }
        if !page.is_empty() {
            ctx.run_later(REPLAY_BACKOFF, move |act, ctx| {
                act.write_replay(plan, page, full, cursor, ctx);
            });
        } else if full {
            self.replay(plan, cursor, true, ctx);
        } else {
            let last = self.app.store.last_seq(&plan.room);
            ctx.spawn(last.into_actor(self).map(move |last, act, ctx| {
                let last_seq = last.unwrap_or(cursor);
                act.finish_join(&plan.room, cursor, last_seq, &plan.members, ctx);
            }));
        }
    }

    fn finish_join(
        &mut self,
        room: &str,
        replayed_to: u64,
        last_seq: u64,
        members: &[User],
        ctx: &mut WebsocketContext<Self>,
    ) {
        let Some(state) = self.rooms.get_mut(room) else {
            return; // left meanwhile
        };
        let held = match std::mem::replace(state, RoomState::Live { last: replayed_to }) {
            RoomState::Replaying { held } => held,
            RoomState::Live { .. } => Vec::new(),
        };
        self.held_bytes = 0;
        let members = if members.is_empty() {
            vec![self.user.clone()]
        } else {
            members.to_vec()
        };
        self.emit(ctx, frames::joined(room, last_seq, &members));
        let mut last = replayed_to;
        for (seq, frame) in held {
            if seq > last {
                last = seq;
                self.outbox.account(wire_len(frame.len()));
                ctx.text(frame);
            }
        }
        if let Some(state) = self.rooms.get_mut(room) {
            *state = RoomState::Live { last };
        }
    }

    fn fail_join(&mut self, room: &str, e: &ChatError, ctx: &mut WebsocketContext<Self>) {
        log::warn!("Join of {room} failed: {e:?}.");
        if let Some(RoomState::Replaying { held }) = self.rooms.remove(room) {
            let bytes: usize = held.iter().map(|(_, f)| wire_len(f.len())).sum();
            self.held_bytes = self.held_bytes.saturating_sub(bytes);
        }
        self.app.registry.do_send(Leave {
            session_id: self.id,
            room: room.to_string(),
        });
        self.emit_error(ctx, e, Some("join"));
    }

    fn on_continuation(&mut self, item: Item, ctx: &mut WebsocketContext<Self>) {
        let max = self.app.settings.limits.max_frame_bytes;
        let (text, chunk, last) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        if let Some(text) = text {
            self.partial = Some(Partial {
                text,
                data: BytesMut::new(),
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            let e = ChatError::bad_request("continuation frame without a first frame");
            return self.emit_error(ctx, &e, None);
        };
        if partial.data.len() + chunk.len() > max {
            self.partial = None;
            return self.refuse_oversize(ctx);
        }
        partial.data.extend_from_slice(&chunk);
        if last {
            if let Some(done) = self.partial.take() {
                if !done.text {
                    return self.refuse_binary(ctx);
                }
                match std::str::from_utf8(&done.data) {
                    Ok(text) => {
                        let text = text.to_owned();
                        self.on_text(&text, ctx);
                    }
                    Err(_) => {
                        let e = ChatError::bad_request("text is not valid UTF-8");
                        self.emit_error(ctx, &e, None);
                    }
                }
            }
        }
    }

    fn refuse_oversize(&mut self, ctx: &mut WebsocketContext<Self>) {
        let max = self.app.settings.limits.max_frame_bytes;
        let e = ChatError::TooLarge(format!("frames are limited to {max} bytes"));
        self.emit_error(ctx, &e, None);
        self.close(ctx, CloseCode::Size, "frame too large");
    }

    fn refuse_binary(&mut self, ctx: &mut WebsocketContext<Self>) {
        let e = ChatError::bad_request("binary frames are not supported: send JSON text");
        self.emit_error(ctx, &e, None);
    }
}

impl Actor for WsSession {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        log::debug!(
            "Session {} opened for user {} ({}).",
            self.id,
            self.user.id,
            self.user.name
        );
        self.app.metrics.connections.fetch_add(1, Relaxed);
        let _ = self.outbox.addr.set(ctx.address().recipient());
        self.app.registry.do_send(Connect {
            session_id: self.id,
            addr: ctx.address().recipient(),
        });
        let every = Duration::from_secs(self.app.settings.limits.heartbeat_interval_secs);
        ctx.run_interval(every, Self::heartbeat);
        let welcome = frames::welcome(&self.user, &self.app.settings.node.id, &self.name);
        self.emit(ctx, welcome);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.outbox.closing.store(true, Relaxed);
        self.app.registry.do_send(Disconnect {
            session_id: self.id,
            rooms: self.rooms.drain().map(|(room, _)| room).collect(),
        });
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        log::debug!("Session {} closed.", self.id);
        self.outbox.uncount();
    }
}

impl Handler<Outbound> for WsSession {
    type Result = ();
    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        if self.outbox.closing.load(Relaxed) {
            if msg.frame.is_empty() {
                // The outbox cut this session off.
                self.close(ctx, CloseCode::Policy, "slow reader: outbound queue full");
            }
            return;
        }
        if let FrameKind::Message { room, seq } = &msg.kind {
            let size = wire_len(msg.frame.len());
            match self.rooms.get_mut(&**room) {
                Some(RoomState::Replaying { held }) => {
                    // Held frames wait outside the queue (so the replay can
                    // drain it), but within the same hard bound.
                    held.push((*seq, msg.frame));
                    self.outbox.release(size);
                    self.held_bytes += size;
                    if self.held_bytes > self.outbox.hard {
                        self.app.metrics.slow_closes.fetch_add(1, Relaxed);
                        self.close(ctx, CloseCode::Policy, "slow reader: too far behind");
                    }
                    return;
                }
                Some(RoomState::Live { last }) => {
                    if *seq <= *last {
                        return self.outbox.release(size);
                    }
                    *last = *seq;
                }
                None => return self.outbox.release(size),
            }
        }
        ctx.text(msg.frame);
    }
}

impl Handler<Shutdown> for WsSession {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.draining = true;
        if self.in_flight == 0 {
            self.close(ctx, CloseCode::Away, "the node is shutting down");
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        let msg = match item {
            Ok(msg) => msg,
            Err(ws::ProtocolError::Overflow) => return self.refuse_oversize(ctx),
            Err(e) => {
                log::debug!("Session {} protocol error: {e}.", self.id);
                return self.close(ctx, CloseCode::Protocol, "protocol error");
            }
        };
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => self.refuse_binary(ctx),
            ws::Message::Continuation(item) => self.on_continuation(item, ctx),
            ws::Message::Ping(payload) => {
                self.outbox.account(wire_len(payload.len()));
                ctx.pong(&payload);
            }
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_length_counts_the_header() {
        assert_eq!(wire_len(0), 2);
        assert_eq!(wire_len(125), 127);
        assert_eq!(wire_len(126), 130);
        assert_eq!(wire_len(70_000), 70_010);
    }
}
