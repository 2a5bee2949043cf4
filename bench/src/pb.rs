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

/// How a field is shown.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Bool,
    Str,
    /// Application data: JSON goes in as it is, as in the JSON protocol.
    Data,
    /// A message, shown with its own fields (none: named, not detailed).
    Msg(&'static [Field]),
    /// A repeated message, shown as an array after the other fields.
    Many(&'static [Field]),
}

/// A field the text shows: its number, name and kind. Fields not listed
/// are left out.
type Field = (u64, &'static str, Kind);

use Kind::{Bool, Data, Int, Many, Msg, Str};

const NAMED: &[Field] = &[];
const ERROR: &[Field] = &[
    (1, "code", Int),
    (2, "message", Str),
    (3, "temporary", Bool),
];
const PUBLICATION: &[Field] = &[(4, "data", Data), (6, "offset", Int)];
const UNSUBSCRIBE: &[Field] = &[(2, "code", Int), (3, "reason", Str)];
const DISCONNECT: &[Field] = &[(1, "code", Int), (2, "reason", Str), (3, "reconnect", Bool)];
const PUSH: &[Field] = &[
    (1, "id", Int),
    (2, "channel", Str),
    (4, "pub", Msg(PUBLICATION)),
    (5, "join", Msg(NAMED)),
    (6, "leave", Msg(NAMED)),
    (7, "unsubscribe", Msg(UNSUBSCRIBE)),
    (8, "message", Msg(NAMED)),
    (9, "subscribe", Msg(NAMED)),
    (10, "connect", Msg(NAMED)),
    (11, "disconnect", Msg(DISCONNECT)),
    (12, "refresh", Msg(NAMED)),
];
const CONNECT_RESULT: &[Field] = &[
    (1, "client", Str),
    (2, "version", Str),
    (3, "expires", Bool),
    (4, "ttl", Int),
    (7, "ping", Int),
    (8, "pong", Bool),
    (10, "node", Str),
];
/// `SubscribeResult`: its stream position, recovery flags and the
/// publications recovered.
const SUBSCRIBE_RESULT: &[Field] = &[
    (3, "recoverable", Bool),
    (6, "epoch", Str),
    (7, "publications", Many(PUBLICATION)),
    (8, "recovered", Bool),
    (9, "offset", Int),
    (10, "positioned", Bool),
    (12, "was_recovering", Bool),
];
/// `Reply`: id, error, push, and one result per command (the ones the bench
/// never asks for named, not detailed).
const REPLY: &[Field] = &[
    (1, "id", Int),
    (2, "error", Msg(ERROR)),
    (4, "push", Msg(PUSH)),
    (5, "connect", Msg(CONNECT_RESULT)),
    (6, "subscribe", Msg(SUBSCRIBE_RESULT)),
    (7, "unsubscribe", Msg(NAMED)),
    (8, "publish", Msg(NAMED)),
    (9, "presence", Msg(NAMED)),
    (10, "presence_stats", Msg(NAMED)),
    (11, "history", Msg(NAMED)),
    (12, "ping", Msg(NAMED)),
    (13, "rpc", Msg(NAMED)),
    (14, "refresh", Msg(NAMED)),
    (15, "sub_refresh", Msg(NAMED)),
];

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

    /// The fields of `msg` that `schema` lists, between braces: the
    /// repeated ones last, each as an array.
    fn message(&mut self, msg: &[u8], schema: &[Field]) -> Option<()> {
        self.0.push('{');
        if !schema.is_empty() {
            let fs = fields(msg)?;
            for (n, v) in &fs {
                let Some((_, name, kind)) = schema.iter().find(|f| f.0 == *n) else {
                    continue;
                };
                match (*kind, *v) {
                    (Int, Value::Int(i)) => {
                        self.key(name);
                        let _ = write!(self.0, "{i}");
                    }
                    (Bool, Value::Int(b)) => {
                        self.key(name);
                        self.0.push_str(if b != 0 { "true" } else { "false" });
                    }
                    (Str, Value::Bytes(b)) => {
                        self.key(name);
                        self.quoted(&String::from_utf8_lossy(b));
                    }
                    (Data, Value::Bytes(b)) => {
                        self.key(name);
                        match std::str::from_utf8(b) {
                            Ok(s) if s.starts_with('{') || s.starts_with('[') => self.0.push_str(s),
                            _ => self.quoted(&String::from_utf8_lossy(b)),
                        }
                    }
                    (Msg(inner), Value::Bytes(b)) => {
                        self.key(name);
                        self.message(b, inner)?;
                    }
                    _ => {}
                }
            }
            for (number, name, kind) in schema {
                let Many(inner) = *kind else { continue };
                let mut items = fs.iter().filter_map(|(n, v)| match v {
                    Value::Bytes(b) if n == number => Some(*b),
                    _ => None,
                });
                if let Some(first) = items.next() {
                    self.key(name);
                    self.0.push('[');
                    self.message(first, inner)?;
                    for b in items {
                        self.0.push(',');
                        self.message(b, inner)?;
                    }
                    self.0.push(']');
                }
            }
        }
        self.0.push('}');
        Some(())
    }
}

fn reply_text(msg: &[u8]) -> Option<String> {
    let mut o = Out(String::new());
    o.message(msg, REPLY)?;
    Some(o.0)
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
