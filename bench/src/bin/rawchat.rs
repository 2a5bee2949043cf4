//! The raw baseline, meant as an upper bound for a room broadcast server:
//! tokio, no actors, no auth, no persistence, no sequence numbers. A message
//! is serialised and framed as a WebSocket frame once; every subscriber's
//! writer gets the same shared bytes and writes them to its socket as they
//! are (vectored writes, no per-subscriber encode or copy). tokio-tungstenite
//! only reads what clients send.
//!
//! ```text
//! rawchat [127.0.0.1:8090] [--queue FRAMES] [--window-ms MS]
//! ```
//!
//! Frames (JSON text): `{"op":"join","room":R}` answers `{"op":"joined","room":R}`;
//! `{"op":"send","room":R,"text":T}` sends `{"op":"msg","room":R,"text":T}` to
//! every connection in room R, the sender included when it joined.
//!
//! Each connection's outbound queue holds at most `--queue` frames (4096 by
//! default). A connection whose queue is full is closed with code 1008 and
//! the reason "outbound queue full", as a real server would; it is never
//! skipped silently.
//!
//! A room sends a message that comes after a quiet spell at once, and
//! gathers those that follow within `--window-ms` (10 by default, as
//! ScalableChat's `limits.fanout_window_ms`) to send them together, so that
//! each writer takes them off its queue in one vectored write. With 0 every
//! message is queued at once.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Outbound queue length (frames) per connection unless `--queue` says otherwise.
const DEFAULT_QUEUE: usize = 4096;
/// The least time between two fan-outs of a room, unless `--window-ms` says
/// otherwise.
const DEFAULT_WINDOW: Duration = Duration::from_millis(10);
/// Frames a writer takes off its queue for one vectored write.
const BATCH: usize = 64;
/// Largest upgrade request accepted.
const MAX_REQUEST: usize = 16 * 1024;
/// Time a client has to send its upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a closing connection's writer has to finish before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How much a connection may have pending, and for how long when closing.
#[derive(Clone, Copy)]
struct Limits {
    /// Frames in the outbound queue.
    queue: usize,
    /// Time a closing connection's writer has to finish.
    close_grace: Duration,
    /// The least time between two fan-outs of a room.
    window: Duration,
}
/// Close code for a subscriber that cannot keep up (RFC 6455: policy violation).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_REASON: &str = "outbound queue full";

/// A connection as the rooms see it: its bounded outbound queue of framed
/// bytes, and the flag that closes it when the queue overflows.
#[derive(Clone)]
struct Peer {
    tx: mpsc::Sender<Bytes>,
    overflow: Arc<watch::Sender<bool>>,
}

impl Peer {
    /// Queues one framed message. A full queue marks the connection for
    /// closing (1008) instead of dropping the frame unnoticed. False when the
    /// frame was not queued.
    fn push(&self, frame: Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.overflow.send_replace(true);
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// A room's members, and the messages gathered for its next fan-out.
#[derive(Default)]
struct Room {
    members: HashMap<u64, Peer>,
    pending: Vec<Bytes>,
    /// A fan-out of `pending` is scheduled.
    scheduled: bool,
    last_fanout: Option<Instant>,
}

impl Room {
    /// Queues `frames` to every member.
    fn fan_out(&mut self, frames: &[Bytes]) {
        self.last_fanout = Some(Instant::now());
        for m in self.members.values() {
            for f in frames {
                if !m.push(f.clone()) {
                    break;
                }
            }
        }
    }
}

#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, Room>>,
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `frame` to the members of `name`: at once after a quiet spell,
    /// else with the others that come within the window.
    fn publish(self: &Arc<Self>, name: &str, frame: Bytes, window: Duration) {
        let mut all = self.lock();
        let Some(room) = all.get_mut(name) else {
            return;
        };
        if room.scheduled {
            room.pending.push(frame);
            return;
        }
        let now = Instant::now();
        let due = room.last_fanout.map_or(now, |at| at + window);
        if due <= now {
            room.fan_out(&[frame]);
            return;
        }
        room.pending.push(frame);
        room.scheduled = true;
        let (rooms, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let mut all = rooms.lock();
            if let Some(room) = all.get_mut(&name) {
                room.scheduled = false;
                let frames = std::mem::take(&mut room.pending);
                room.fan_out(&frames);
                if room.members.is_empty() {
                    all.remove(&name);
                }
            }
        });
    }
}

#[derive(Deserialize)]
struct Frame {
    op: String,
    #[serde(default)]
    room: String,
    #[serde(default)]
    text: String,
}

/// What the server sends; fields in the order the protocol has them.
#[derive(Serialize)]
struct Out<'a> {
    op: &'static str,
    room: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

/// One unmasked, final server frame (`opcode` 0x1 text, 0x8 close, …).
fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    Bytes::from(f)
}

fn text_frame(out: &Out<'_>) -> Option<Bytes> {
    serde_json::to_vec(out)
        .ok()
        .map(|json| ws_frame(0x1, &json))
}

/// A close frame; the reason is cut to the 123 bytes a control frame allows.
fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    ws_frame(0x8, &payload)
}

struct Config {
    addr: String,
    queue: usize,
    window: Duration,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut cfg = Config {
        addr: "127.0.0.1:8090".to_string(),
        queue: DEFAULT_QUEUE,
        window: DEFAULT_WINDOW,
    };
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queue" => {
                let v = args.next().ok_or("--queue needs a value")?;
                cfg.queue = match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--queue: bad length {v}")),
                };
            }
            "--window-ms" => {
                let v = args.next().ok_or("--window-ms needs a value")?;
                cfg.window = match v.parse() {
                    Ok(ms) => Duration::from_millis(ms),
                    _ => return Err(format!("--window-ms: bad time {v}")),
                };
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => cfg.addr = a,
        }
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rawchat: {e}\nusage: rawchat [ADDR] [--queue FRAMES] [--window-ms MS]");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(&cfg.addr).await?;
    println!(
        "rawchat listening on {} (outbound queue {} frames, fan-out window {} ms)",
        cfg.addr,
        cfg.queue,
        cfg.window.as_millis()
    );
    let limits = Limits {
        queue: cfg.queue,
        close_grace: CLOSE_GRACE,
        window: cfg.window,
    };
    run(listener, limits).await;
    Ok(())
}

async fn run(listener: TcpListener, limits: Limits) {
    let rooms = Arc::new(Rooms::default());
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(stream, id, rooms.clone(), limits));
    }
}

/// Answers the HTTP upgrade request. Returns what the client sent past it.
async fn handshake(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let (len, accept) = match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => (len, accept_key(&req)),
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            _ => (0, None),
        };
        let Some(accept) = accept else {
            stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Err(io::ErrorKind::InvalidData.into());
        };
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(reply.as_bytes()).await?;
        return Ok(buf.split_off(len));
    }
}

/// The `Sec-WebSocket-Accept` for a valid WebSocket upgrade request.
fn accept_key(req: &httparse::Request<'_, '_>) -> Option<String> {
    if req.method != Some("GET") {
        return None;
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let upgrade = header("upgrade")?;
    if !upgrade
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        || header("sec-websocket-version")? != "13"
    {
        return None;
    }
    Some(derive_accept_key(header("sec-websocket-key")?.as_bytes()))
}

/// The read half as tokio-tungstenite wants a duplex stream: what it writes
/// (pongs, the reply to a close) goes into the connection's outbound queue.
struct Inbound {
    rd: OwnedReadHalf,
    out: Peer,
}

impl AsyncRead for Inbound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for Inbound {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // tungstenite hands over whole frames in one write, so they never
        // interleave with broadcast frames.
        Poll::Ready(if self.out.push(Bytes::copy_from_slice(buf)) {
            Ok(buf.len())
        } else {
            Err(io::ErrorKind::BrokenPipe.into())
        })
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Writes `frames` with as few syscalls as the socket allows, then empties it.
async fn write_frames(wr: &mut OwnedWriteHalf, frames: &mut Vec<Bytes>) -> io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        let mut written = {
            let mut iov = [io::IoSlice::new(&[]); BATCH];
            let mut count = 0;
            for (slot, f) in iov.iter_mut().zip(&frames[first..]) {
                *slot = io::IoSlice::new(f);
                count += 1;
            }
            wr.write_vectored(&iov[..count]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let f = &mut frames[first];
            if written >= f.len() {
                written -= f.len();
                first += 1;
            } else {
                f.advance(written);
                written = 0;
            }
        }
    }
    frames.clear();
    Ok(())
}

/// Resolves once the connection's queue has overflowed (never if every
/// handle on it is gone: then the queue is closed as well).
async fn overflowed(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|full| *full).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drains the outbound queue to the socket until every sender is gone, or
/// sends the 1008 close as soon as the queue has overflowed.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    mut overflow: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            _ = overflowed(&mut overflow) => {
                let _ = wr.write_all(&close_frame(CLOSE_POLICY, CLOSE_REASON)).await;
                break;
            }
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 || write_frames(&mut wr, &mut batch).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}

async fn serve(mut stream: TcpStream, id: u64, rooms: Arc<Rooms>, limits: Limits) {
    let _ = stream.set_nodelay(true);
    let Ok(Ok(early)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream)).await
    else {
        return;
    };
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(limits.queue);
    let (overflow_tx, mut overflow) = watch::channel(false);
    let peer = Peer {
        tx,
        overflow: Arc::new(overflow_tx),
    };
    let mut writer = tokio::spawn(write_loop(wr, rx, overflow.clone()));
    let inbound = Inbound {
        rd,
        out: peer.clone(),
    };
    let mut ws = WebSocketStream::from_partially_read(inbound, early, Role::Server, None).await;
    let mut joined: Vec<String> = Vec::new();
    loop {
        let msg = tokio::select! {
            biased;
            _ = overflowed(&mut overflow) => break,
            m = ws.next() => m,
        };
        let Some(Ok(msg)) = msg else {
            break;
        };
        let Message::Text(text) = msg else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame.op.as_str() {
            "join" => {
                rooms
                    .lock()
                    .entry(frame.room.clone())
                    .or_default()
                    .members
                    .insert(id, peer.clone());
                let reply = Out {
                    op: "joined",
                    room: &frame.room,
                    text: None,
                };
                if let Some(f) = text_frame(&reply) {
                    peer.push(f);
                }
                joined.push(frame.room);
            }
            "send" => {
                let out = Out {
                    op: "msg",
                    room: &frame.room,
                    text: Some(&frame.text),
                };
                let Some(f) = text_frame(&out) else {
                    continue;
                };
                // try_send never waits: pushing under the lock is cheaper
                // than cloning the member list.
                rooms.publish(&frame.room, f, limits.window);
            }
            _ => {}
        }
    }
    {
        let mut all = rooms.lock();
        for room in joined {
            if let Some(r) = all.get_mut(&room) {
                r.members.remove(&id);
                if r.members.is_empty() && !r.scheduled {
                    all.remove(&room);
                }
            }
        }
    }
    // The writer ends once the last sender is gone (it drains the queue
    // first), or at once after an overflow; one stuck on a peer that does not
    // read is dropped after a grace period.
    drop(ws);
    drop(peer);
    if tokio::time::timeout(limits.close_grace, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use std::io::Cursor;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    type Client = WebSocketStream<TcpStream>;

    #[test]
    fn frames_parse_as_websocket_frames() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let f = ws_frame(0x1, &payload);
            let mut cur = Cursor::new(&f[..]);
            let Ok(Some((header, n))) = FrameHeader::parse(&mut cur) else {
                panic!("no frame header for length {len}");
            };
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert_eq!(n, len as u64);
            assert_eq!(cur.position() as usize + len, f.len());
            assert_eq!(&f[f.len() - len..], &payload[..]);
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let f = close_frame(CLOSE_POLICY, &"é".repeat(100));
        assert_eq!(f[1] as usize, f.len() - 2);
        assert!(f.len() - 2 <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| parse_args(v.iter().map(|s| s.to_string()));
        let c = a(&[]).unwrap();
        assert_eq!(
            (c.addr.as_str(), c.queue),
            ("127.0.0.1:8090", DEFAULT_QUEUE)
        );
        let c = a(&["127.0.0.1:1", "--queue", "8"]).unwrap();
        assert_eq!((c.addr.as_str(), c.queue), ("127.0.0.1:1", 8));
        assert!(a(&["--queue", "0"]).is_err());
        assert!(a(&["--queue"]).is_err());
        assert!(a(&["--nope"]).is_err());
    }

    async fn start(queue: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A long grace: the slow client below starts reading only once
        // everything was published.
        let close_grace = Duration::from_secs(60);
        let window = DEFAULT_WINDOW;
        tokio::spawn(run(
            listener,
            Limits {
                queue,
                close_grace,
                window,
            },
        ));
        addr
    }

    async fn connect(addr: std::net::SocketAddr, recv_buffer: Option<u32>) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(addr).await.unwrap();
        let url = format!("ws://{addr}/");
        tokio_tungstenite::client_async(url, stream)
            .await
            .unwrap()
            .0
    }

    async fn next_text(ws: &mut Client) -> String {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn join(ws: &mut Client, room: &str) {
        let req = format!(r#"{{"op":"join","room":"{room}"}}"#);
        ws.send(Message::text(req)).await.unwrap();
        assert_eq!(
            next_text(ws).await,
            format!(r#"{{"op":"joined","room":"{room}"}}"#)
        );
    }

    #[tokio::test]
    async fn broadcast_reaches_every_member_the_sender_included() {
        let addr = start(DEFAULT_QUEUE).await;
        let mut a = connect(addr, None).await;
        let mut b = connect(addr, None).await;
        let mut other = connect(addr, None).await;
        join(&mut a, "r").await;
        join(&mut b, "r").await;
        join(&mut other, "s").await;
        let send = r#"{"op":"send","room":"r","text":"hi \"there\""}"#;
        a.send(Message::text(send)).await.unwrap();
        let want = r#"{"op":"msg","room":"r","text":"hi \"there\""}"#;
        assert_eq!(next_text(&mut a).await, want);
        assert_eq!(next_text(&mut b).await, want);
        // Pings are answered through the outbound queue.
        other.send(Message::Ping(b"p".to_vec())).await.unwrap();
        match other.next().await {
            Some(Ok(Message::Pong(p))) => assert_eq!(p, b"p"),
            m => panic!("expected a pong, got {m:?}"),
        }
        // A client's close is answered, then the connection ends.
        b.close(None).await.unwrap();
        while let Some(Ok(m)) = b.next().await {
            assert!(matches!(m, Message::Close(_)), "unexpected {m:?}");
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_closed_with_1008() {
        let addr = start(4).await;
        let mut slow = connect(addr, Some(4096)).await;
        let mut fast = connect(addr, None).await;
        let mut publisher = connect(addr, None).await;
        join(&mut slow, "r").await;
        join(&mut fast, "r").await;
        // Far more than the socket buffers and a queue of 4 frames hold.
        let count = 400;
        let text = "x".repeat(64 * 1024);
        let send = format!(r#"{{"op":"send","room":"r","text":"{text}"}}"#);
        // In step with the fast member, whose queue never holds more than one.
        for _ in 0..count {
            publisher.send(Message::text(send.clone())).await.unwrap();
            next_text(&mut fast).await;
        }
        let mut got = 0;
        let close = loop {
            match slow.next().await {
                Some(Ok(Message::Text(_))) => got += 1,
                Some(Ok(Message::Close(f))) => break f,
                m => panic!("expected messages then a close, got {m:?}"),
            }
        };
        let close = close.expect("a close code");
        assert_eq!(close.code, CloseCode::Policy);
        assert_eq!(close.reason, CLOSE_REASON);
        assert!(got < count, "all {got} messages arrived before the close");
    }
}
