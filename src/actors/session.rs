//! `WsSession`: one per WebSocket connection. Parses and checks client
//! frames, rate-limits them, forwards them to the registry and the store,
//! and writes node frames back; owns its heartbeat.
//!
//! Everything about the transport (actix-web-actors) lives in this file, so
//! that moving to another WebSocket crate touches only it. Frames for the
//! session come through its [`SessionOutbox`], which applies the
//! slow-reader policy; a join's replay is the plain state of
//! [`super::replay`], driven from here, one replay at a time. A client
//! that takes no bytes at all keeps its session parked behind the full
//! socket; the kernel drops such a connection after
//! [`STALLED_SOCKET_TIMEOUT`] (`TCP_USER_TIMEOUT`, set on every accepted
//! socket).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{Codec, Item};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use super::app::AppState;
use super::messages::Shutdown;
use super::outbox::{wire_len, Outbound, SessionOutbox};
use super::registry::{Connect, Disconnect, Join, Leave, Members, Typing};
use super::replay::{Next, Offer, Replay, ReplayQueue, RoomFeed, Upto, Waiting, REPLAY_PAGE};
use crate::error::ChatError;
use crate::limits::{AddressSlot, TokenBucket};
use crate::protocol::{frames, parse_client_frame, ChatMessage, ClientOp, User};
use crate::store::NewMessage;

/// How long a replay waits before checking a busy queue again.
const REPLAY_BACKOFF: Duration = Duration::from_millis(20);

/// Frames refused for the rate limit that a connection gets answered in a
/// burst; the allowance refills at `limits.rate_per_sec`. A client that
/// keeps sending into its empty bucket beyond it is closed with 1008, so
/// a flood never makes the node write more than about one `error` per
/// frame it would have accepted.
const REFUSALS_BURST: u32 = 100;

/// How long a connection may keep bytes its client does not take (no
/// acknowledgement, or a receive window that stays shut) before the kernel
/// drops it. This is what ends a client that never reads: its session is
/// parked behind the full socket and cannot close it itself.
const STALLED_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Charges `user_id` for opening a new room: `limits.room_create_cost`
/// tokens of the user's bucket, on top of the frame's own, and one of the
/// user's new rooms for the hour (`limits.new_rooms_per_hour`). Takes
/// nothing when either is short, and says how long until both would do.
pub fn pay_for_new_room(app: &AppState, user_id: &str) -> Result<(), Duration> {
    let now = Instant::now();
    let cost = f64::from(app.settings.limits.room_create_cost);
    app.user_rates.take_cost(user_id, cost, now)?;
    app.new_rooms.take_cost(user_id, 1.0, now).inspect_err(|_| {
        app.user_rates.give_back(user_id, cost);
    })
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
    rooms: HashMap<String, RoomFeed>,
    /// Joins waiting for their replay; one runs at a time.
    replays: ReplayQueue,
    rate: TokenBucket,
    /// Answers left for frames refused for the rate limit (see
    /// [`REFUSALS_BURST`]).
    refusals: TokenBucket,
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
        let outbox = Arc::new(SessionOutbox::new(
            limits.outbound_soft_bytes,
            limits.outbound_hard_bytes,
            app.metrics.clone(),
        ));
        let session = WsSession {
            id: app.next_session_id(),
            name: ulid::Ulid::new().to_string(),
            user,
            rate: TokenBucket::new(limits.rate_per_sec, limits.rate_burst, Instant::now()),
            refusals: TokenBucket::new(limits.rate_per_sec, REFUSALS_BURST, Instant::now()),
            replays: ReplayQueue::default(),
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

    /// Takes what a frame costs: `cost` tokens of the connection's bucket,
    /// and with `per_user` one of the user's. False when either is empty.
    fn charge(&mut self, cost: f64, per_user: bool) -> bool {
        let now = Instant::now();
        self.rate.take_cost(cost, now).is_ok()
            && (!per_user || self.app.user_rates.take(&self.user.id, now))
    }

    /// Answers a frame refused for the rate limit with `rate_limited`, or
    /// closes the connection (1008) when it has had all the answers it may
    /// get: it keeps sending into an empty bucket.
    fn refuse_rate(&mut self, ctx: &mut WebsocketContext<Self>, reference: Option<&str>) {
        if self.refusals.take(Instant::now()) {
            return self.emit_error(ctx, &ChatError::RateLimited, reference);
        }
        log::debug!("Session {} keeps sending over its rate limit.", self.id);
        self.close(ctx, CloseCode::Policy, "rate limit exceeded");
    }

    fn on_text(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        let limits = &self.app.settings.limits;
        let parsed = parse_client_frame(text, limits.max_text_chars);
        let cost = match parsed {
            Ok(ClientOp::Ping { .. }) => limits.ping_cost,
            _ => 1.0,
        };
        // `send`, `typing` and `history` also cost a token of the user's
        // bucket, shared by all of the user's connections to this node.
        let per_user = matches!(
            parsed,
            Ok(ClientOp::Send { .. } | ClientOp::Typing { .. } | ClientOp::History { .. })
        );
        if !self.charge(cost, per_user) {
            let reference = match &parsed {
                Ok(ClientOp::Send { cid, .. }) => Some(cid.as_str()),
                Ok(op) => Some(op.name()),
                Err(e) => e.reference.as_deref(),
            };
            return self.refuse_rate(ctx, reference);
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
                if !self.rooms.contains_key(&room) {
                    return self.emit_error(ctx, &ChatError::NotJoined, Some("leave"));
                }
                self.drop_room(&room, ctx);
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
                let every = self.app.settings.limits.typing_interval_ms;
                self.app.registry.do_send(Typing {
                    session_id: self.id,
                    room,
                    user: self.user.clone(),
                    every: Duration::from_millis(every),
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
        match self.rooms.get(&room) {
            Some(_) => {
                // Joined already: replay again if asked, up to what was
                // written live when its turn comes, then `joined`.
                let members = self.app.registry.send(Members { room: room.clone() });
                ctx.wait(members.into_actor(self).map(move |members, act, ctx| {
                    act.queue_replay(
                        Waiting {
                            room,
                            since,
                            upto: Upto::WrittenLive,
                            members: members.unwrap_or_default(),
                        },
                        ctx,
                    );
                }));
            }
            None if joined >= max_rooms => {
                let e = ChatError::Forbidden(format!("at most {max_rooms} rooms per connection"));
                self.emit_error(ctx, &e, Some("join"));
            }
            None => {
                self.rooms.insert(room.clone(), RoomFeed::replaying());
                let (app, user_id) = (self.app.clone(), self.user.id.clone());
                let join = self.app.registry.send(Join {
                    session_id: self.id,
                    user: self.user.clone(),
                    room: room.clone(),
                    outbox: self.outbox.clone(),
                    opening_fee: Box::new(move || pay_for_new_room(&app, &user_id).is_ok()),
                });
                // Wait: frames after this join must see it done.
                ctx.wait(join.into_actor(self).map(move |joined, act, ctx| {
                    let joined = joined.unwrap_or_default();
                    if joined.refused {
                        act.drop_room(&room, ctx);
                        return act.emit_error(ctx, &ChatError::RateLimited, Some("join"));
                    }
                    act.queue_replay(
                        Waiting {
                            room,
                            since,
                            upto: Upto::Joined(joined.delivered),
                            members: joined.members,
                        },
                        ctx,
                    );
                }));
            }
        }
    }

    /// Queues a join's replay behind those of earlier joins.
    fn queue_replay(&mut self, join: Waiting, ctx: &mut WebsocketContext<Self>) {
        self.replays.push(join);
        self.next_replay(ctx);
    }

    /// Starts the next waiting replay, unless one is running.
    fn next_replay(&mut self, ctx: &mut WebsocketContext<Self>) {
        while let Some((ticket, join)) = self.replays.start_next() {
            let Some(feed) = self.rooms.get_mut(&join.room) else {
                self.replays.finish(ticket); // left meanwhile
                continue;
            };
            let upto = match join.upto {
                Upto::Joined(delivered) => delivered,
                Upto::WrittenLive => feed.replay_again(),
            };
            let replay = Replay::new(ticket, join.room, join.since, upto, join.members);
            return self.replay(replay, ctx);
        }
    }

    /// The replay ended (written, failed, or its room left): the next one
    /// may start.
    fn end_replay(&mut self, replay: &Replay, ctx: &mut WebsocketContext<Self>) {
        self.replays.finish(replay.ticket);
        self.next_replay(ctx);
    }

    /// Leaves a room: drops its feed, its held frames and its replays, and
    /// tells the registry.
    fn drop_room(&mut self, room: &str, ctx: &mut WebsocketContext<Self>) {
        if let Some(feed) = self.rooms.remove(room) {
            self.unhold(&feed);
        }
        self.app.registry.do_send(Leave {
            session_id: self.id,
            room: room.to_string(),
        });
        self.replays.forget(room);
        self.next_replay(ctx);
    }

    /// Takes a join's replay its next step: a page read from the store, or
    /// `joined`.
    fn replay(&mut self, replay: Replay, ctx: &mut WebsocketContext<Self>) {
        match replay.next() {
            Next::Read { after } => {
                let page = self.app.store.after(&replay.room, after, REPLAY_PAGE);
                ctx.spawn(page.into_actor(self).map(move |page, act, ctx| {
                    if !act.replays.is_current(replay.ticket) {
                        return; // its room was left
                    }
                    match page {
                        Ok(page) => {
                            let (page, more) = replay.take_page(page);
                            act.write_replay(replay, page, more, ctx);
                        }
                        Err(e) => act.fail_join(&replay.room, &e, ctx),
                    }
                }));
            }
            Next::Join { replayed_to } => self.say_joined(replay, replayed_to, ctx),
        }
    }

    /// Writes replayed messages while the socket keeps up (the queue stays
    /// under the soft limit), waiting for it to drain when it does not.
    fn write_replay(
        &mut self,
        mut replay: Replay,
        mut page: VecDeque<ChatMessage>,
        more: bool,
        ctx: &mut WebsocketContext<Self>,
    ) {
        if !self.replays.is_current(replay.ticket) {
            return; // its room was left
        }
        while self.outbox.has_room() {
            let Some(m) = page.pop_front() else {
                break;
            };
            replay.wrote(m.seq);
            self.app.metrics.messages_out.fetch_add(1, Relaxed);
            self.emit(ctx, frames::msg(&m));
        }
        if !page.is_empty() {
            ctx.run_later(REPLAY_BACKOFF, move |act, ctx| {
                act.write_replay(replay, page, more, ctx);
            });
            return;
        }
        match replay.after_page(more) {
            Next::Read { .. } => self.replay(replay, ctx),
            Next::Join { replayed_to } => self.say_joined(replay, replayed_to, ctx),
        }
    }

    /// Reads the room's last seq, then says `joined`. Without a replay a
    /// failed read fails the join; after one, the replay's end stands in.
    fn say_joined(
        &mut self,
        replay: Replay,
        replayed_to: Option<u64>,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let last = self.app.store.last_seq(&replay.room);
        ctx.spawn(last.into_actor(self).map(move |last, act, ctx| {
            if !act.replays.is_current(replay.ticket) {
                return; // its room was left
            }
            match (last, replayed_to) {
                (Ok(last_seq), _) => {
                    act.finish_join(replay, replayed_to.unwrap_or(0), last_seq, ctx)
                }
                (Err(_), Some(cursor)) => act.finish_join(replay, cursor, cursor, ctx),
                (Err(e), None) => act.fail_join(&replay.room, &e, ctx),
            }
        }));
    }

    /// Writes `joined`, then the live messages held meanwhile that the
    /// replay did not cover; then the next replay may start.
    fn finish_join(
        &mut self,
        replay: Replay,
        replayed_to: u64,
        last_seq: u64,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let Some(mut feed) = self.rooms.remove(&replay.room) else {
            return self.end_replay(&replay, ctx); // left meanwhile
        };
        self.unhold(&feed);
        let held = feed.go_live(replayed_to);
        self.rooms.insert(replay.room.clone(), feed);
        let members = if replay.members.is_empty() {
            vec![self.user.clone()]
        } else {
            replay.members
        };
        self.emit(ctx, frames::joined(&replay.room, last_seq, &members));
        for frame in held {
            self.outbox.account(wire_len(frame.len()));
            ctx.text(frame);
        }
        self.replays.finish(replay.ticket);
        self.next_replay(ctx);
    }

    fn fail_join(&mut self, room: &str, e: &ChatError, ctx: &mut WebsocketContext<Self>) {
        log::warn!("Join of {room} failed: {e:?}.");
        self.drop_room(room, ctx);
        self.emit_error(ctx, e, Some("join"));
    }

    /// Uncounts the frames a room held for its replay.
    fn unhold(&mut self, feed: &RoomFeed) {
        let bytes: usize = feed.held().iter().map(|(_, f)| wire_len(f.len())).sum();
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
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
            return self.refuse_garbage(ctx, &e);
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
                        self.refuse_garbage(ctx, &e);
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
        self.refuse_garbage(ctx, &e);
    }

    /// Refuses a message that is no frame at all (binary, not UTF-8, a
    /// stray continuation): it costs a token like any other, so that
    /// garbage cannot be sent faster than frames.
    fn refuse_garbage(&mut self, ctx: &mut WebsocketContext<Self>, e: &ChatError) {
        if !self.charge(1.0, false) {
            return self.refuse_rate(ctx, None);
        }
        self.emit_error(ctx, e, None);
    }

    /// Answers a WebSocket Ping with a Pong, for `limits.ping_cost` tokens;
    /// with an empty bucket there is no Pong.
    fn on_ping(&mut self, payload: &[u8], ctx: &mut WebsocketContext<Self>) {
        if !self.charge(self.app.settings.limits.ping_cost, false) {
            return self.refuse_rate(ctx, None);
        }
        self.outbox.account(wire_len(payload.len()));
        ctx.pong(payload);
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
        self.outbox.attach(ctx.address().recipient());
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
        self.outbox.close();
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
        if self.outbox.is_closing() {
            if let Outbound::CutOff = msg {
                self.close(ctx, CloseCode::Policy, "slow reader: outbound queue full");
            }
            return;
        }
        let batch = match msg {
            Outbound::Droppable(frame) => return ctx.text(frame),
            Outbound::Messages(batch) => batch,
            Outbound::CutOff => return,
        };
        let Some(feed) = self.rooms.get_mut(&*batch.room) else {
            return self.outbox.release(batch.wire_len());
        };
        let mut held = false;
        for (seq, frame) in &batch.frames {
            let size = wire_len(frame.len());
            match feed.offer(*seq, frame.clone()) {
                Offer::Write(frame) => ctx.text(frame),
                Offer::Stale => self.outbox.release(size),
                Offer::Held => {
                    // Held frames wait outside the queue (so the replay can
                    // drain it), but within the same hard bound.
                    self.outbox.release(size);
                    self.held_bytes += size;
                    held = true;
                }
            }
        }
        if held && self.held_bytes > self.outbox.hard_limit() {
            self.app.metrics.slow_closes.fetch_add(1, Relaxed);
            self.close(ctx, CloseCode::Policy, "slow reader: too far behind");
        }
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
            ws::Message::Ping(payload) => self.on_ping(&payload, ctx),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}
