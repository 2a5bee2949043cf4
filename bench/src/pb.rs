//! Centrifugo's Protobuf client protocol, only the messages the bench uses
//! (field numbers from `client.proto` of centrifugal/protocol).
//!
//! A WebSocket binary frame carries one or more messages, each preceded by
//! its length as a varint: commands from the client, replies from the
//! server. A ping is an empty `Reply`, the pong an empty `Command` (both a
//! single `0x00` length byte when alone in a frame).
//!
//! Replies are turned into short texts shaped like the JSON protocol's
//! replies (`{}`, `{"id":12,"publish":{}}`, `{"push":{…,"pub":{"data":…}}}`),
//! so that one set of predicates reads both protocols. They are meant for
//! those predicates and for reading, not as a faithful JSON transcoding.

use std::fmt::Write as _;

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

/// What a command asks for (`Command` fields 4, 5 and 7).
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// `ConnectRequest`: anonymous, with a client name only.
    Connect { name: &'a str },
    /// `SubscribeRequest`; `recover` with the last `epoch` and `offset` seen
    /// asks for the publications missed since.
    Subscribe {
        channel: &'a str,
        recover: bool,
        epoch: &'a str,
        offset: u64,
    },
    /// `PublishRequest`.
    Publish { channel: &'a str, data: &'a [u8] },
}

/// A frame with one command; `None` is the empty command, the pong.
pub fn command(id: u32, request: Option<Request>) -> Vec<u8> {
    let mut body = Vec::new();
    put_uint(&mut body, 1, id.into());
    match request {
        None => {}
        Some(Request::Connect { name }) => {
            let mut m = Vec::new();
            put_bytes(&mut m, 4, name.as_bytes());
            put_message(&mut body, 4, &m);
        }
        Some(Request::Subscribe {
            channel,
            recover,
            epoch,
            offset,
        }) => {
            let mut m = Vec::new();
            put_bytes(&mut m, 1, channel.as_bytes());
            put_uint(&mut m, 3, recover.into());
            put_bytes(&mut m, 6, epoch.as_bytes());
            put_uint(&mut m, 7, offset);
            put_message(&mut body, 5, &m);
        }
        Some(Request::Publish { channel, data }) => {
            let mut m = Vec::new();
            put_bytes(&mut m, 1, channel.as_bytes());
            put_bytes(&mut m, 2, data);
            put_message(&mut body, 7, &m);
        }
    }
    let mut frame = Vec::with_capacity(body.len() + 2);
    put_varint(&mut frame, body.len() as u64);
    frame.extend_from_slice(&body);
    frame
}

/// The pong a client sends back for a ping: an empty command.
pub fn pong() -> Vec<u8> {
    command(0, None)
}

/// Every reply in a binary frame, as text. A frame that does not decode
/// ends with an error reply saying so, after the replies read before it.
pub fn replies(frame: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut r = Reader::new(frame);
    while !r.done() {
        let reply = r.len_delimited().and_then(reply_text);
        match reply {
            Some(text) => out.push(text),
            None => {
                out.push(
                    r#"{"error":{"code":0,"message":"chatbench: undecodable Protobuf frame"}}"#
                        .to_string(),
                );
                break;
            }
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

/// A scalar field; proto3 leaves zero values out.
fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    if v != 0 {
        put_key(out, field, VARINT);
        put_varint(out, v);
    }
}

/// A string or bytes field; proto3 leaves empty ones out.
fn put_bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    if !v.is_empty() {
        put_message(out, field, v);
    }
}

/// A message field: present even when empty (that presence is the request).
fn put_message(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// One field's value as read from the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
    /// A fixed-size value (wire types 1 and 5): none of ours.
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    /// The next field of a message: its number and value.
    fn field(&mut self) -> Option<(u64, Value<'a>)> {
        let key = self.varint()?;
        let value = match key & 7 {
            VARINT => Value::Int(self.varint()?),
            LEN => Value::Bytes(self.len_delimited()?),
            I64 => self.take(8).map(|_| Value::Fixed)?,
            I32 => self.take(4).map(|_| Value::Fixed)?,
            _ => return None,
        };
        Some((key >> 3, value))
    }
}

/// Every field of `msg`, or `None` when it does not decode.
fn fields(msg: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut r = Reader::new(msg);
    let mut out = Vec::new();
    while !r.done() {
        out.push(r.field()?);
    }
    Some(out)
}

/// Text output, written in the order the fields come.
struct Out(String);

impl Out {
    fn key(&mut self, name: &str) {
        if !self.0.ends_with('{') && !self.0.ends_with('[') {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
    }

    fn int(&mut self, name: &str, v: u64) {
        self.key(name);
        let _ = write!(self.0, "{v}");
    }

    fn bool(&mut self, name: &str, v: u64) {
        self.key(name);
        self.0.push_str(if v != 0 { "true" } else { "false" });
    }

    fn str(&mut self, name: &str, v: &[u8]) {
        self.key(name);
        self.quoted(&String::from_utf8_lossy(v));
    }

    fn quoted(&mut self, s: &str) {
        self.0.push('"');
        for c in s.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
    }

    /// Application data: JSON (what the bench publishes) goes in as it is,
    /// as in the JSON protocol; anything else as a string.
    fn data(&mut self, name: &str, v: &[u8]) {
        match std::str::from_utf8(v) {
            Ok(s) if s.starts_with('{') || s.starts_with('[') => {
                self.key(name);
                self.0.push_str(s);
            }
            _ => self.str(name, v),
        }
    }

    fn open(&mut self, name: &str) {
        self.key(name);
        self.0.push('{');
    }

    fn close(&mut self) {
        self.0.push('}');
    }
}

const RESULTS: [&str; 16] = [
    "",
    "",
    "",
    "",
    "",
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "rpc",
    "refresh",
    "sub_refresh",
];

const PUSHES: [&str; 13] = [
    "",
    "",
    "",
    "",
    "pub",
    "join",
    "leave",
    "unsubscribe",
    "message",
    "subscribe",
    "connect",
    "disconnect",
    "refresh",
];

fn reply_text(msg: &[u8]) -> Option<String> {
    let mut o = Out(String::from("{"));
    for (n, v) in fields(msg)? {
        match (n, v) {
            (1, Value::Int(id)) => o.int("id", id),
            (2, Value::Bytes(m)) => {
                o.open("error");
                error(&mut o, m)?;
                o.close();
            }
            (4, Value::Bytes(m)) => {
                o.open("push");
                push(&mut o, m)?;
                o.close();
            }
            (5, Value::Bytes(m)) => {
                o.open("connect");
                connect_result(&mut o, m)?;
                o.close();
            }
            (6, Value::Bytes(m)) => {
                o.open("subscribe");
                subscribe_result(&mut o, m)?;
                o.close();
            }
            (n, Value::Bytes(_)) if (n as usize) < RESULTS.len() && n >= 5 => {
                // The results the bench never asks for: named, not detailed.
                o.open(RESULTS[n as usize]);
                o.close();
            }
            _ => {}
        }
    }
    o.close();
    Some(o.0)
}

/// `Error`: code 1, message 2, temporary 3.
fn error(o: &mut Out, m: &[u8]) -> Option<()> {
    for (n, v) in fields(m)? {
        match (n, v) {
            (1, Value::Int(c)) => o.int("code", c),
            (2, Value::Bytes(s)) => o.str("message", s),
            (3, Value::Int(b)) => o.bool("temporary", b),
            _ => {}
        }
    }
    Some(())
}

fn push(o: &mut Out, m: &[u8]) -> Option<()> {
    for (n, v) in fields(m)? {
        match (n, v) {
            (1, Value::Int(id)) => o.int("id", id),
            (2, Value::Bytes(s)) => o.str("channel", s),
            (4, Value::Bytes(p)) => {
                o.open("pub");
                publication(o, p)?;
                o.close();
            }
            (7, Value::Bytes(u)) => {
                // Unsubscribe: code 2, reason 3.
                o.open("unsubscribe");
                for (n, v) in fields(u)? {
                    match (n, v) {
                        (2, Value::Int(c)) => o.int("code", c),
                        (3, Value::Bytes(s)) => o.str("reason", s),
                        _ => {}
                    }
                }
                o.close();
            }
            (11, Value::Bytes(d)) => {
                // Disconnect: code 1, reason 2, reconnect 3.
                o.open("disconnect");
                for (n, v) in fields(d)? {
                    match (n, v) {
                        (1, Value::Int(c)) => o.int("code", c),
                        (2, Value::Bytes(s)) => o.str("reason", s),
                        (3, Value::Int(b)) => o.bool("reconnect", b),
                        _ => {}
                    }
                }
                o.close();
            }
            (n, Value::Bytes(_)) if (n as usize) < PUSHES.len() && n >= 4 => {
                o.open(PUSHES[n as usize]);
                o.close();
            }
            _ => {}
        }
    }
    Some(())
}

/// `Publication`: data 4, offset 6 (the rest is not shown).
fn publication(o: &mut Out, m: &[u8]) -> Option<()> {
    for (n, v) in fields(m)? {
        match (n, v) {
            (4, Value::Bytes(d)) => o.data("data", d),
            (6, Value::Int(off)) => o.int("offset", off),
            _ => {}
        }
    }
    Some(())
}

fn connect_result(o: &mut Out, m: &[u8]) -> Option<()> {
    for (n, v) in fields(m)? {
        match (n, v) {
            (1, Value::Bytes(s)) => o.str("client", s),
            (2, Value::Bytes(s)) => o.str("version", s),
            (3, Value::Int(b)) => o.bool("expires", b),
            (4, Value::Int(t)) => o.int("ttl", t),
            (7, Value::Int(p)) => o.int("ping", p),
            (8, Value::Int(b)) => o.bool("pong", b),
            (10, Value::Bytes(s)) => o.str("node", s),
            _ => {}
        }
    }
    Some(())
}

/// `SubscribeResult`: its stream position, recovery flags and the
/// publications recovered (field 7, repeated).
fn subscribe_result(o: &mut Out, m: &[u8]) -> Option<()> {
    let mut pubs = Vec::new();
    for (n, v) in fields(m)? {
        match (n, v) {
            (3, Value::Int(b)) => o.bool("recoverable", b),
            (6, Value::Bytes(s)) => o.str("epoch", s),
            (7, Value::Bytes(p)) => pubs.push(p),
            (8, Value::Int(b)) => o.bool("recovered", b),
            (9, Value::Int(off)) => o.int("offset", off),
            (10, Value::Int(b)) => o.bool("positioned", b),
            (12, Value::Int(b)) => o.bool("was_recovering", b),
            _ => {}
        }
    }
    if !pubs.is_empty() {
        o.key("publications");
        o.0.push('[');
        for (i, p) in pubs.into_iter().enumerate() {
            if i > 0 {
                o.0.push(',');
            }
            o.0.push('{');
            publication(o, p)?;
            o.close();
        }
        o.0.push(']');
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
            .collect()
    }

    /// The one message of a one-command frame, as fields.
    fn only_message(frame: &[u8]) -> Vec<(u64, Value<'_>)> {
        let mut r = Reader::new(frame);
        let body = r.len_delimited().unwrap_or_default();
        assert!(r.done(), "one message in the frame");
        fields(body).unwrap_or_default()
    }

    fn bytes_of<'a>(fs: &[(u64, Value<'a>)], field: u64) -> &'a [u8] {
        fs.iter()
            .find_map(|(n, v)| match v {
                Value::Bytes(b) if *n == field => Some(*b),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn int_of(fs: &[(u64, Value<'_>)], field: u64) -> Option<u64> {
        fs.iter().find_map(|(n, v)| match v {
            Value::Int(i) if *n == field => Some(*i),
            _ => None,
        })
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX.into(),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint(), Some(v));
            assert!(r.done());
        }
        assert_eq!(Reader::new(&[0x80, 0x80]).varint(), None, "truncated");
        assert_eq!(Reader::new(&[0xff; 11]).varint(), None, "too long");
    }

    #[test]
    fn commands_encode_as_client_proto_says() {
        // Command{id 1, connect{name}}: what the SDKs send first.
        let c = command(1, Some(Request::Connect { name: "chatbench" }));
        assert_eq!(
            c,
            hex("0f0801220b2209636861746265 6e6368"
                .replace(' ', "")
                .as_str())
        );
        let fs = only_message(&c);
        assert_eq!(int_of(&fs, 1), Some(1));
        assert_eq!(
            bytes_of(&fields(bytes_of(&fs, 4)).unwrap_or_default(), 4),
            b"chatbench"
        );

        let data = br#"{"text":"hi"}"#;
        let p = command(
            12,
            Some(Request::Publish {
                channel: "bench:fan",
                data,
            }),
        );
        let fs = only_message(&p);
        assert_eq!(int_of(&fs, 1), Some(12));
        let req = fields(bytes_of(&fs, 7)).unwrap_or_default();
        assert_eq!(bytes_of(&req, 1), b"bench:fan");
        assert_eq!(bytes_of(&req, 2), data);

        let s = command(
            2,
            Some(Request::Subscribe {
                channel: "bench:r1",
                recover: true,
                epoch: "abcd",
                offset: 300,
            }),
        );
        let fs = only_message(&s);
        let req = fields(bytes_of(&fs, 5)).unwrap_or_default();
        assert_eq!(bytes_of(&req, 1), b"bench:r1");
        assert_eq!(int_of(&req, 3), Some(1));
        assert_eq!(bytes_of(&req, 6), b"abcd");
        assert_eq!(int_of(&req, 7), Some(300));

        // A plain subscribe leaves the recovery fields out.
        let plain = command(
            2,
            Some(Request::Subscribe {
                channel: "bench:r1",
                recover: false,
                epoch: "",
                offset: 0,
            }),
        );
        assert_eq!(
            plain,
            hex("0e0802 2a0a 0a0862656e63683a7231".replace(' ', "").as_str())
        );

        // The pong: an empty command, one zero length byte.
        assert_eq!(pong(), [0]);
    }

    #[test]
    fn replies_of_frames_captured_from_centrifugo() {
        // To a publisher: two publish results and an error (102, unknown
        // channel), in one frame.
        let f = hex(concat!(
            "04080b4200",
            "04080c4200",
            "17080d12130866120f756e6b6e6f776e206368616e6e656c"
        ));
        assert_eq!(
            replies(&f),
            [
                r#"{"id":11,"publish":{}}"#,
                r#"{"id":12,"publish":{}}"#,
                r#"{"id":13,"error":{"code":102,"message":"unknown channel"}}"#,
            ]
        );
        // To a subscriber: two publications (with the publisher's client
        // info, not shown) in one frame.
        let one = concat!(
            "5a2258120962656e63683a66616e224b2221",
            "7b2274657874223a2240405431373030303030303030303030303030404078227d",
            "2a26122431626362616166632d343839612d343662652d626233612d663530376435336162623631"
        );
        let f = hex(&format!("{one}{one}"));
        let text =
            r#"{"push":{"channel":"bench:fan","pub":{"data":{"text":"@@T1700000000000000@@x"}}}}"#;
        assert_eq!(replies(&f), [text, text]);
        // The connect result, and the subscribe result (empty).
        let f = hex(concat!(
            "3908012a350a2464393661646666652d393861332d343962362d623233612d",
            "6563383762653661306265311209302e302e30204f535338194001"
        ));
        assert_eq!(
            replies(&f),
            [concat!(
                r#"{"id":1,"connect":{"client":"d96adffe-98a3-49b6-b23a-ec87be6a0be1","#,
                r#""version":"0.0.0 OSS","ping":25,"pong":true}}"#
            )]
        );
        assert_eq!(replies(&hex("0408023200")), [r#"{"id":2,"subscribe":{}}"#]);
        // A ping: an empty reply, alone or among others.
        assert_eq!(replies(&[0]), ["{}"]);
        assert_eq!(
            replies(&hex("0004080b4200")),
            ["{}", r#"{"id":11,"publish":{}}"#]
        );
    }

    /// A `Reply` as the server would encode it, for the round trips.
    fn reply(id: u32, field: u64, body: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        put_uint(&mut r, 1, id.into());
        put_message(&mut r, field, body);
        let mut f = Vec::new();
        put_varint(&mut f, r.len() as u64);
        f.extend_from_slice(&r);
        f
    }

    fn publication(data: &[u8], offset: u64) -> Vec<u8> {
        let mut p = Vec::new();
        put_bytes(&mut p, 4, data);
        put_uint(&mut p, 6, offset);
        p
    }

    #[test]
    fn recovery_and_disconnects_read_back() {
        let mut sub = Vec::new();
        put_uint(&mut sub, 3, 1);
        put_bytes(&mut sub, 6, b"ep1");
        put_message(&mut sub, 7, &publication(br#"{"text":"@@T1@@"}"#, 41));
        put_message(&mut sub, 7, &publication(br#"{"text":"@@T2@@"}"#, 42));
        put_uint(&mut sub, 8, 1);
        put_uint(&mut sub, 9, 42);
        put_uint(&mut sub, 10, 1);
        put_uint(&mut sub, 12, 1);
        let mut push = Vec::new();
        put_bytes(&mut push, 2, b"bench:r\"1");
        put_message(&mut push, 4, &publication(b"\x00binary", 43));
        let mut disconnect = Vec::new();
        put_uint(&mut disconnect, 1, 3012);
        put_bytes(&mut disconnect, 2, b"no pong");
        let mut dpush = Vec::new();
        put_message(&mut dpush, 11, &disconnect);
        let mut frame = reply(2, 6, &sub);
        frame.extend(reply(0, 4, &push));
        frame.extend(reply(0, 4, &dpush));
        frame.extend(reply(7, 12, &[]));
        assert_eq!(
            replies(&frame),
            [
                concat!(
                    r#"{"id":2,"subscribe":{"recoverable":true,"epoch":"ep1","recovered":true,"#,
                    r#""offset":42,"positioned":true,"was_recovering":true,"publications":["#,
                    r#"{"data":{"text":"@@T1@@"},"offset":41},{"data":{"text":"@@T2@@"},"offset":42}]}}"#
                ),
                r#"{"push":{"channel":"bench:r\"1","pub":{"data":"\u0000binary","offset":43}}}"#,
                r#"{"push":{"disconnect":{"code":3012,"reason":"no pong"}}}"#,
                r#"{"id":7,"ping":{}}"#,
            ]
        );
    }

    #[test]
    fn broken_frames_end_in_an_error() {
        let mut f = hex("04080b4200");
        f.extend(hex("0a0801")); // says 10 bytes, holds 2
        assert_eq!(
            replies(&f),
            [
                r#"{"id":11,"publish":{}}"#,
                r#"{"error":{"code":0,"message":"chatbench: undecodable Protobuf frame"}}"#,
            ]
        );
        // A field of an unknown wire type.
        assert_eq!(replies(&hex("010f")).len(), 1);
        assert!(replies(&hex("010f"))[0].contains(r#""error":{"#));
    }
}
