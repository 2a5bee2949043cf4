//! The WebSocket client of the chat protocol: `TestClient` (one connection,
//! with helpers that send a frame and wait for its answer) and `WsEvent`, what
//! arrived on the socket.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::assert::summarize;

/// How long a single expected frame may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// What arrived on a WebSocket.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    /// A text frame that is not JSON, or a binary frame.
    Other(Message),
    /// A close frame (with its code and reason if any), or the stream ended.
    Closed(Option<CloseFrame<'static>>),
    /// The stream failed (reset and such).
    Error(String),
    Timeout,
}

/// A WebSocket client of the chat protocol.
pub struct TestClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// WebSocket pings received from the server (answered automatically).
    pub pings_seen: u32,
}

impl TestClient {
    /// Wraps an upgraded WebSocket once its first frame, `welcome`, has
    /// arrived within `within`; otherwise what came instead.
    pub async fn welcomed(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        within: Duration,
    ) -> Result<TestClient, WsEvent> {
        let mut client = TestClient {
            ws,
            welcome: Value::Null,
            pings_seen: 0,
        };
        match client.next_event(within).await {
            WsEvent::Json(v) if v["op"] == "welcome" => {
                client.welcome = v;
                Ok(client)
            }
            other => Err(other),
        }
    }

    pub fn session(&self) -> String {
        self.welcome["session"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_raw(Message::Text(v.to_string())).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send_raw(Message::Text(s.to_string())).await;
    }

    pub async fn send_raw(&mut self, m: Message) {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(m))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next event within `dur` (control frames are skipped; pings counted).
    pub async fn next_event(&mut self, dur: Duration) -> WsEvent {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            match next {
                Err(_) => return WsEvent::Timeout,
                Ok(None) => return WsEvent::Closed(None),
                Ok(Some(Err(e))) => return WsEvent::Error(e.to_string()),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Ping(_) => {
                        self.pings_seen += 1;
                        continue;
                    }
                    Message::Pong(_) => continue,
                    Message::Close(frame) => return WsEvent::Closed(frame.map(|f| f.into_owned())),
                    Message::Text(ref t) => match serde_json::from_str::<Value>(t) {
                        Ok(v) => return WsEvent::Json(v),
                        Err(_) => return WsEvent::Other(msg),
                    },
                    other => return WsEvent::Other(other),
                },
            }
        }
    }

    /// The next JSON frame within `dur`, or `None` on timeout; panics on close.
    pub async fn try_recv_json(&mut self, dur: Duration) -> Option<Value> {
        match self.next_event(dur).await {
            WsEvent::Json(v) => Some(v),
            WsEvent::Timeout => None,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next JSON frame (bounded by `RECV_TIMEOUT`).
    pub async fn recv_json(&mut self) -> Value {
        match self.try_recv_json(RECV_TIMEOUT).await {
            Some(v) => v,
            None => panic!("no frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Frames until one with `op`; returns it and the frames skipped before it.
    pub async fn recv_until_collect(&mut self, op: &str) -> (Value, Vec<Value>) {
        self.recv_until_pred(|v| v["op"] == op).await
    }

    /// Frames until one with `op` (others are dropped).
    pub async fn recv_until(&mut self, op: &str) -> Value {
        self.recv_until_collect(op).await.0
    }

    /// Frames until one matches `pred`; returns it and the skipped frames.
    pub async fn recv_until_pred(&mut self, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv_json(left).await {
                Some(v) if pred(&v) => return (v, skipped),
                Some(v) => skipped.push(v),
                None => panic!(
                    "awaited frame did not arrive within {RECV_TIMEOUT:?}; got instead: {}",
                    summarize(&skipped)
                ),
            }
        }
    }

    /// Asserts that no JSON frame arrives within `dur`.
    pub async fn expect_silence(&mut self, dur: Duration, what: &str) {
        if let Some(v) = self.try_recv_json(dur).await {
            panic!("expected no frame ({what}), got {v}");
        }
    }

    /// Reads for `dur` and asserts that no frame with one of `ops` arrives
    /// (other frames, such as presence, are allowed and dropped).
    pub async fn expect_none_of(&mut self, dur: Duration, ops: &[&str], what: &str) {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.try_recv_json(left).await {
                None => return,
                Some(v) => {
                    let op = v["op"].as_str().unwrap_or_default();
                    assert!(!ops.contains(&op), "expected no {ops:?} ({what}), got {v}");
                }
            }
        }
    }

    /// Reads until the connection closes; returns the close frame (if any),
    /// the JSON frames read before it, and whether it ended by an I/O error.
    pub async fn wait_close(&mut self, dur: Duration) -> (Option<CloseFrame<'static>>, Vec<Value>) {
        let deadline = Instant::now() + dur;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                WsEvent::Json(v) => frames.push(v),
                WsEvent::Other(_) => {}
                WsEvent::Closed(f) => return (f, frames),
                WsEvent::Error(e) => panic!(
                    "connection failed before a close frame arrived: {e}; {}",
                    summarize(&frames)
                ),
                WsEvent::Timeout => panic!("connection not closed within {dur:?}"),
            }
        }
    }

    /// Sends `ping` with `t` and waits for the `pong` carrying the same `t`.
    /// Returns the frames that arrived before the pong.
    pub async fn ping(&mut self, t: i64) -> Vec<Value> {
        self.send_json(&json!({ "op": "ping", "t": t })).await;
        let (_, skipped) = self
            .recv_until_pred(|v| v["op"] == "pong" && v["t"] == t)
            .await;
        skipped
    }

    /// `join` and wait for `joined`.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send_json(&json!({ "op": "join", "room": room })).await;
        let (joined, _) = self
            .recv_until_pred(|v| v["op"] == "joined" && v["room"] == room)
            .await;
        joined
    }

    /// `join` with `since`; returns the replayed `msg` frames and `joined`.
    pub async fn join_since(&mut self, room: &str, since: u64) -> (Vec<Value>, Value) {
        self.send_json(&json!({ "op": "join", "room": room, "since": since }))
            .await;
        let (joined, skipped) = self
            .recv_until_pred(|v| v["op"] == "joined" && v["room"] == room)
            .await;
        let msgs = skipped
            .into_iter()
            .filter(|v| v["op"] == "msg" && v["room"] == room)
            .collect();
        (msgs, joined)
    }

    /// `send` and wait for both the `ack` and the echoed `msg` (in any order).
    pub async fn send_msg(&mut self, room: &str, text: &str, cid: &str) -> (Value, Value) {
        self.send_json(&json!({ "op": "send", "room": room, "text": text, "cid": cid }))
            .await;
        let mut ack = None;
        let mut msg = None;
        let deadline = Instant::now() + RECV_TIMEOUT;
        while ack.is_none() || msg.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(v) = self.try_recv_json(left).await else {
                panic!(
                    "send {cid}: no ack and msg within {RECV_TIMEOUT:?} (ack {ack:?}, msg {msg:?})"
                );
            };
            if v["op"] == "error" && v["ref"] == cid {
                panic!("send {cid} refused: {v}");
            }
            if v["op"] == "ack" && v["cid"] == cid && v["room"] == room {
                ack = Some(v);
            } else if v["op"] == "msg"
                && v["cid"] == cid
                && v["room"] == room
                && v["user"]["id"] == self.welcome["user"]["id"]
            {
                msg = Some(v);
            }
        }
        (ack.unwrap(), msg.unwrap())
    }

    /// `send` and wait for the `ack` only.
    pub async fn send_acked(&mut self, room: &str, text: &str, cid: &str) -> Value {
        self.send_json(&json!({ "op": "send", "room": room, "text": text, "cid": cid }))
            .await;
        let (v, _) = self
            .recv_until_pred(|v| {
                (v["op"] == "ack" && v["cid"] == cid) || (v["op"] == "error" && v["ref"] == cid)
            })
            .await;
        assert_eq!(v["op"], "ack", "send {cid}: {v}");
        v
    }

    /// Sends a frame that must be refused; returns the `error` frame and
    /// asserts that nothing was acked or delivered for it before the error.
    pub async fn expect_error(&mut self, frame: Message) -> Value {
        self.send_raw(frame).await;
        let (err, skipped) = self.recv_until_collect("error").await;
        for v in &skipped {
            assert!(
                v["op"] != "ack" && v["op"] != "msg",
                "a refused frame produced {v}"
            );
        }
        err
    }

    /// Sends `n` messages without waiting, then collects their `n` acks
    /// (frames other than acks are dropped). Panics on any refusal.
    pub async fn blast(&mut self, room: &str, prefix: &str, n: usize) -> Vec<Value> {
        for i in 0..n {
            let cid = format!("{prefix}-{i}");
            self.send_json(&json!({
                "op": "send", "room": room, "text": format!("message {cid}"), "cid": cid
            }))
            .await;
        }
        let mut acks = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(v) = self.try_recv_json(left).await else {
                panic!("only {} of {n} acks within 60 s", acks.len());
            };
            match v["op"].as_str() {
                Some("ack") if v["room"] == room => acks.push(v),
                Some("error") => panic!("send refused during blast: {v}"),
                _ => {}
            }
        }
        acks
    }

    /// Sends `history` and returns the `history` answer (or the `error`).
    pub async fn history(&mut self, room: &str, before: Option<u64>, limit: Option<u64>) -> Value {
        let mut frame = json!({ "op": "history", "room": room });
        if let Some(b) = before {
            frame["before"] = json!(b);
        }
        if let Some(l) = limit {
            frame["limit"] = json!(l);
        }
        self.send_json(&frame).await;
        let (v, _) = self
            .recv_until_pred(|v| {
                (v["op"] == "history" && v["room"] == room)
                    || (v["op"] == "error" && v["ref"] == "history")
            })
            .await;
        v
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.ws.close(None)).await;
    }
}
