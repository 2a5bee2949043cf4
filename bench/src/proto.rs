//! The three wire protocols (plus the raw baseline's subset of ours),
//! Centrifugo's in both its encodings, JSON and Protobuf.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// The Protobuf encoding lives next to this file, whichever crate includes it.
#[path = "pb.rs"]
mod pb;

pub type Ws = WebSocketStream<TcpStream>;
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Marker in front of the send time (µs since the epoch) in every message text.
pub const MARK: &str = "@@T";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// ScalableChat, docs/PROTOCOL.md.
    Ours,
    /// The raw tokio baseline (`rawchat`): join/send/msg without auth.
    Raw,
    /// Socket.IO v4 (Engine.IO 4) over a plain WebSocket.
    SocketIo,
    /// Centrifugo's bidirectional JSON protocol.
    Centrifugo,
    /// Centrifugo's bidirectional Protobuf protocol (binary frames), the one
    /// its SDKs use by default where they can.
    CentrifugoPb,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "ours" => Some(Proto::Ours),
            "raw" => Some(Proto::Raw),
            "socketio" => Some(Proto::SocketIo),
            "centrifugo" => Some(Proto::Centrifugo),
            "centrifugo-pb" => Some(Proto::CentrifugoPb),
            _ => None,
        }
    }

    fn path(self, token: &str) -> String {
        match self {
            Proto::Ours => format!("/ws?token={token}"),
            Proto::Raw => "/ws".to_string(),
            Proto::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_string(),
            Proto::Centrifugo | Proto::CentrifugoPb => "/connection/websocket".to_string(),
        }
    }

    /// The WebSocket subprotocol to ask for: Centrifugo picks its Protobuf
    /// protocol by the `centrifuge-protobuf` subprotocol, as its SDKs ask.
    fn subprotocol(self) -> Option<&'static str> {
        match self {
            Proto::CentrifugoPb => Some("centrifuge-protobuf"),
            _ => None,
        }
    }

    /// Centrifugo's channel for a room.
    fn channel(room: &str) -> String {
        format!("bench:{room}")
    }

    /// The frame that publishes `text` to `room`; `n` numbers it.
    pub fn publish(self, room: &str, text: &str, n: u64) -> Message {
        match self {
            Proto::CentrifugoPb => {
                // The same JSON data as the JSON protocol publishes.
                let data = format!(r#"{{"text":"{text}"}}"#);
                let channel = Proto::channel(room);
                // Ids are uint32 here, and 0 would make the command a pong:
                // n + 10 as in JSON, wrapping within 1..=u32::MAX.
                let id = ((n + 9) % u64::from(u32::MAX)) as u32 + 1;
                Message::binary(pb::command(
                    id,
                    Some(pb::Request::Publish {
                        channel: &channel,
                        data: data.as_bytes(),
                    }),
                ))
            }
            _ => Message::text(self.publish_text(room, text, n)),
        }
    }

    fn publish_text(self, room: &str, text: &str, n: u64) -> String {
        match self {
            Proto::Ours => {
                format!(r#"{{"op":"send","room":"{room}","text":"{text}","cid":"c{n}"}}"#)
            }
            Proto::Raw => format!(r#"{{"op":"send","room":"{room}","text":"{text}"}}"#),
            Proto::SocketIo => format!(r#"42["send","{room}","{text}"]"#),
            Proto::Centrifugo | Proto::CentrifugoPb => format!(
                r#"{{"id":{},"publish":{{"channel":"bench:{room}","data":{{"text":"{text}"}}}}}}"#,
                n + 10
            ),
        }
    }

    /// The replies one WebSocket message carries, as text. Centrifugo's
    /// JSON transport packs several replies (pings, publish answers,
    /// publications) into one frame, one per line; its Protobuf transport
    /// packs them length-prefixed into a binary frame, and each is turned
    /// into the text its JSON twin would be (see `pb`). Every other
    /// protocol sends one per frame. Control frames carry none.
    /// Text frames are read in place: nothing is allocated per frame.
    pub fn replies(self, m: &Message) -> impl Iterator<Item = Cow<'_, str>> {
        let (text, decoded) = match m {
            Message::Text(t) => (Some(t.as_str()), Vec::new()),
            Message::Binary(b) if self == Proto::CentrifugoPb => (None, pb::replies(b)),
            _ => (None, Vec::new()),
        };
        text.into_iter()
            .flat_map(move |t| self.text_replies(t))
            .map(Cow::Borrowed)
            .chain(decoded.into_iter().map(Cow::Owned))
    }

    fn text_replies(self, frame: &str) -> impl Iterator<Item = &str> {
        let packed = matches!(self, Proto::Centrifugo | Proto::CentrifugoPb);
        let mut whole = Some(frame).filter(|_| !packed);
        let mut lines = frame.split('\n').filter(move |r| packed && !r.is_empty());
        std::iter::from_fn(move || whole.take().or_else(|| lines.next()))
    }

    /// The answer a client owes to a server heartbeat reply, if `reply` is one.
    pub fn heartbeat_reply(self, reply: &str) -> Option<Message> {
        match self {
            Proto::SocketIo if reply == "2" => Some(Message::text("3")),
            Proto::Centrifugo if reply == "{}" => Some(Message::text("{}")),
            Proto::CentrifugoPb if reply == "{}" => Some(Message::binary(pb::pong())),
            _ => None,
        }
    }

    /// Whether a frame tells that a publish was accepted (ours: `ack`).
    pub fn is_ack(self, frame: &str) -> bool {
        match self {
            Proto::Ours => frame.starts_with(r#"{"op":"ack""#),
            Proto::Centrifugo | Proto::CentrifugoPb => frame.contains(r#""publish":{}"#),
            _ => false,
        }
    }

    /// Whether a frame reports a refusal.
    pub fn is_error(self, frame: &str) -> bool {
        match self {
            Proto::Ours | Proto::Raw => frame.starts_with(r#"{"op":"error""#),
            Proto::Centrifugo | Proto::CentrifugoPb => frame.contains(r#""error":{"#),
            Proto::SocketIo => frame.starts_with("44"),
        }
    }
}

/// One target server: its address and protocol.
#[derive(Clone, Debug)]
pub struct Target {
    pub proto: Proto,
    pub addr: SocketAddr,
}

/// The source address of client `i`: 127.0.0.2 ..= 127.0.0.250.
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 249) as u8)
}

async fn tcp(ip: Ipv4Addr, addr: SocketAddr) -> Result<TcpStream, Error> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(ip.into(), 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A small HTTP/1.1 exchange; returns the response body.
pub async fn http(
    ip: Ipv4Addr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<String, Error> {
    let mut s = tcp(ip, addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {}", text.lines().next().unwrap_or("")).into());
    }
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

async fn guest_token(ip: Ipv4Addr, addr: SocketAddr, name: &str) -> Result<String, Error> {
    let body = http(
        ip,
        addr,
        "POST",
        "/api/v1/auth/guest",
        &format!(r#"{{"name":"{name}"}}"#),
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "no token in the guest answer".into())
}

/// Reads text frames until one satisfies `done`, answering heartbeats.
async fn until(ws: &mut Ws, proto: Proto, done: impl Fn(&str) -> bool) -> Result<String, Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await?;
        match next {
            Some(Ok(m)) => {
                for r in proto.replies(&m) {
                    if let Some(answer) = proto.heartbeat_reply(&r) {
                        ws.send(answer).await?;
                    } else if proto.is_error(&r) {
                        return Err(format!("refused: {r}").into());
                    } else if done(&r) {
                        return Ok(r.into_owned());
                    }
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err("closed during the handshake".into()),
        }
    }
}

/// Signs client `i` in (ours: a guest token; the others need none).
pub async fn sign_in(t: &Target, i: usize) -> Result<String, Error> {
    match t.proto {
        Proto::Ours => guest_token(source_ip(i), t.addr, &format!("b{i}")).await,
        _ => Ok(String::new()),
    }
}

/// Opens client `i` and joins it to `room` (when given).
pub async fn open(t: &Target, i: usize, room: Option<&str>) -> Result<Ws, Error> {
    let token = sign_in(t, i).await?;
    let mut ws = connect(t, i, &token).await?;
    let p = t.proto;
    if let Some(room) = room {
        match p {
            Proto::Ours | Proto::Raw => {
                ws.send(Message::text(format!(r#"{{"op":"join","room":"{room}"}}"#)))
                    .await?;
                until(&mut ws, p, |f| f.starts_with(r#"{"op":"joined""#)).await?;
            }
            Proto::SocketIo => {
                ws.send(Message::text(format!(r#"421["join","{room}"]"#)))
                    .await?;
                until(&mut ws, p, |f| f.starts_with("431")).await?;
            }
            Proto::Centrifugo => {
                ws.send(Message::text(format!(
                    r#"{{"id":2,"subscribe":{{"channel":"bench:{room}"}}}}"#
                )))
                .await?;
                until(&mut ws, p, |f| f.contains(r#""id":2"#)).await?;
            }
            Proto::CentrifugoPb => {
                let channel = Proto::channel(room);
                let subscribe = pb::Request::Subscribe {
                    channel: &channel,
                    recover: false,
                    epoch: "",
                    offset: 0,
                };
                ws.send(Message::binary(pb::command(2, Some(subscribe))))
                    .await?;
                until(&mut ws, p, |f| f.starts_with(r#"{"id":2,"subscribe""#)).await?;
            }
        }
    }
    Ok(ws)
}

/// Opens the WebSocket of client `i`, signed in with `token`, up to the
/// server's greeting (ours: `welcome`; Centrifugo: the connect reply).
pub async fn connect(t: &Target, i: usize, token: &str) -> Result<Ws, Error> {
    let stream = tcp(source_ip(i), t.addr).await?;
    let url = format!("ws://{}{}", t.addr, t.proto.path(token));
    let mut request = url.into_client_request()?;
    if let Some(sub) = t.proto.subprotocol() {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(sub));
    }
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let p = t.proto;
    match p {
        Proto::Ours => {
            until(&mut ws, p, |f| f.starts_with(r#"{"op":"welcome""#)).await?;
        }
        Proto::Raw => {}
        Proto::SocketIo => {
            until(&mut ws, p, |f| f.starts_with("0{")).await?;
            ws.send(Message::text("40")).await?;
            until(&mut ws, p, |f| f.starts_with("40")).await?;
        }
        Proto::Centrifugo => {
            ws.send(Message::text(r#"{"id":1,"connect":{"name":"chatbench"}}"#))
                .await?;
            until(&mut ws, p, |f| f.contains(r#""id":1"#)).await?;
        }
        Proto::CentrifugoPb => {
            let connect = pb::Request::Connect { name: "chatbench" };
            ws.send(Message::binary(pb::command(1, Some(connect))))
                .await?;
            until(&mut ws, p, |f| f.starts_with(r#"{"id":1,"connect""#)).await?;
        }
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centrifugo_frames_are_split_into_their_replies() {
        let frame = "{}\n{\"id\":12,\"publish\":{}}\n{\"push\":{\"pub\":{}}}";
        let m = Message::text(frame);
        let replies: Vec<Cow<str>> = Proto::Centrifugo.replies(&m).collect();
        assert_eq!(
            replies,
            ["{}", r#"{"id":12,"publish":{}}"#, r#"{"push":{"pub":{}}}"#]
        );
        let p = Proto::Centrifugo;
        assert_eq!(
            replies
                .iter()
                .filter(|r| p.heartbeat_reply(r).is_some())
                .count(),
            1
        );
        assert_eq!(replies.iter().filter(|r| p.is_ack(r)).count(), 1);
        assert_eq!(
            Proto::Centrifugo
                .replies(&Message::text("{}"))
                .collect::<Vec<_>>(),
            ["{}"]
        );
    }

    #[test]
    fn centrifugo_protobuf_frames_meet_the_same_predicates() {
        let p = Proto::CentrifugoPb;
        assert_eq!(Proto::parse("centrifugo-pb"), Some(p));
        // A ping, a publish result, an error, a publication: one frame.
        let mut frame = vec![0];
        frame.extend([4, 0x08, 11, 0x42, 0]);
        frame.extend([9, 0x08, 12, 0x12, 5, 0x08, 103, 0x12, 1, b'x']);
        let data = br#"{"text":"@@T1000@@x"}"#;
        let mut publication = vec![0x22, data.len() as u8];
        publication.extend(data);
        let mut push = vec![0x22, publication.len() as u8];
        push.extend(&publication);
        frame.extend([push.len() as u8 + 2, 0x22, push.len() as u8]);
        frame.extend(&push);
        let m = Message::binary(frame);
        let replies: Vec<_> = p.replies(&m).collect();
        assert_eq!(replies.len(), 4);
        let pongs: Vec<Message> = replies
            .iter()
            .filter_map(|r| p.heartbeat_reply(r))
            .collect();
        assert_eq!(pongs, [Message::binary(vec![0])]);
        assert_eq!(replies.iter().filter(|r| p.is_ack(r)).count(), 1);
        assert_eq!(replies.iter().filter(|r| p.is_error(r)).count(), 1);
        let stats = crate::stats::Stats::new();
        for r in &replies {
            stats.on_frame(r, 3000);
        }
        assert_eq!(
            stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn centrifugo_protobuf_publishes_the_json_variants_data() {
        let m = Proto::CentrifugoPb.publish("fan", "@@T5@@xx", 1);
        let Message::Binary(b) = m else {
            panic!("a binary frame");
        };
        let json = Proto::Centrifugo.publish_text("fan", "@@T5@@xx", 1);
        let data = br#"{"text":"@@T5@@xx"}"#;
        assert!(json.contains(std::str::from_utf8(data).unwrap_or_default()));
        assert!(b.windows(data.len()).any(|w| w == data));
        assert!(b.windows(9).any(|w| w == b"bench:fan"));
        // Command id 11, as the JSON variant numbers it.
        assert!(json.starts_with(r#"{"id":11,"#));
        assert_eq!(&b[1..3], [0x08, 11]);
        // Never id 0 (a pong, which gets no reply), even where n + 10
        // overflows uint32.
        for n in [u64::from(u32::MAX) - 10, u64::from(u32::MAX) - 9] {
            let Message::Binary(b) = Proto::CentrifugoPb.publish("fan", "x", n) else {
                panic!("a binary frame");
            };
            assert_eq!(b[1], 0x08, "the id field is there, so not 0");
        }
    }

    #[test]
    fn other_frames_are_one_reply_each() {
        let frame = "{\"op\":\"msg\",\"text\":\"a\\nb\"}";
        for p in [Proto::Ours, Proto::Raw, Proto::SocketIo] {
            assert_eq!(
                p.replies(&Message::text(frame)).collect::<Vec<_>>(),
                [frame]
            );
        }
    }
}
