//! The v1 client contract on the wire: parsing and checking client frames,
//! and building node frames. Pure functions, so they are easy to test and
//! to fuzz.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ChatError;

/// Version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest `limit` of `history` and of the REST messages page.
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// `limit` when none is given.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Longest idempotency key.
pub const MAX_CID_CHARS: usize = 64;

/// Milliseconds since the Unix epoch, UTC: the clock of `ts`.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A user as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// A stored message: the body of `msg` frames, history entries and REST
/// answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: String,
    pub seq: u64,
    pub id: String,
    pub user: User,
    pub text: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub ts: i64,
    pub cid: String,
}

/// A checked client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOp {
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        text: String,
        cid: String,
    },
    Typing {
        room: String,
    },
    History {
        room: String,
        before: Option<u64>,
        limit: u32,
    },
    Ping {
        t: Option<Value>,
    },
}

impl ClientOp {
    /// The `op` of the frame, used as the `ref` of errors about it.
    pub fn name(&self) -> &'static str {
        match self {
            ClientOp::Join { .. } => "join",
            ClientOp::Leave { .. } => "leave",
            ClientOp::Send { .. } => "send",
            ClientOp::Typing { .. } => "typing",
            ClientOp::History { .. } => "history",
            ClientOp::Ping { .. } => "ping",
        }
    }
}

/// The raw shape of client frames, before the checks serde cannot do.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum RawOp {
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        text: String,
        cid: String,
    },
    Typing {
        room: String,
    },
    History {
        room: String,
        before: Option<u64>,
        limit: Option<u32>,
    },
    Ping {
        t: Option<Value>,
    },
}

/// A refused frame: the error, and the `ref` to answer with when known.
#[derive(Debug, Clone)]
pub struct FrameError {
    pub error: ChatError,
    pub reference: Option<String>,
}

/// Parses and checks one text frame.
pub fn parse_client_frame(text: &str, max_text_chars: usize) -> Result<ClientOp, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
        error: ChatError::bad_request(format!("frame is not valid JSON: {e}")),
        reference: None,
    })?;
    let Value::Object(map) = &value else {
        return Err(FrameError {
            error: ChatError::bad_request("frame must be a JSON object"),
            reference: None,
        });
    };
    let op = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(_) => {
            return Err(FrameError {
                error: ChatError::bad_request("`op` must be a string"),
                reference: None,
            })
        }
        None => {
            return Err(FrameError {
                error: ChatError::bad_request("frame has no `op`"),
                reference: None,
            })
        }
    };
    // Errors about a `send` refer to its cid when the cid itself is usable,
    // so the client can match them to the pending message.
    let reference = match (op.as_str(), map.get("cid")) {
        ("send", Some(Value::String(cid))) if validate_cid(cid).is_ok() => Some(cid.clone()),
        _ if op.len() <= 32 && op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            Some(op.clone())
        }
        _ => None,
    };
    let fail = |error: ChatError| FrameError {
        error,
        reference: reference.clone(),
    };
    let raw: RawOp = serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown variant") {
            fail(ChatError::bad_request(format!("unknown op `{op}`")))
        } else {
            fail(ChatError::bad_request(format!("bad `{op}` frame: {msg}")))
        }
    })?;
    let checked = match raw {
        RawOp::Join { room, since } => ClientOp::Join {
            room: validate_room(room).map_err(fail)?,
            since,
        },
        RawOp::Leave { room } => ClientOp::Leave {
            room: validate_room(room).map_err(fail)?,
        },
        RawOp::Send { room, text, cid } => {
            let room = validate_room(room).map_err(fail)?;
            validate_cid(&cid).map_err(fail)?;
            validate_text(&text, max_text_chars).map_err(fail)?;
            ClientOp::Send { room, text, cid }
        }
        RawOp::Typing { room } => ClientOp::Typing {
            room: validate_room(room).map_err(fail)?,
        },
        RawOp::History {
            room,
            before,
            limit,
        } => ClientOp::History {
            room: validate_room(room).map_err(fail)?,
            before,
            limit: validate_limit(limit).map_err(fail)?,
        },
        RawOp::Ping { t } => ClientOp::Ping { t },
    };
    Ok(checked)
}

/// Room names: 1–64 characters of `a-z 0-9 _ -`.
pub fn validate_room(room: String) -> Result<String, ChatError> {
    let ok = !room.is_empty()
        && room.len() <= 64
        && room
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(room)
    } else {
        Err(ChatError::bad_request(
            "room names are 1-64 characters of a-z, 0-9, _ and -",
        ))
    }
}

/// 1 to `max` characters of `A-Z a-z 0-9 _ . -`.
fn is_word(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// User names: 1–32 characters of `A-Z a-z 0-9 _ . -`.
pub fn validate_user_name(name: &str) -> Result<(), ChatError> {
    if is_word(name, 32) {
        Ok(())
    } else {
        Err(ChatError::bad_request(
            "names are 1-32 characters of A-Z, a-z, 0-9, _, . and -",
        ))
    }
}

/// User ids, as a token's `sub`: 1–64 characters of `A-Z a-z 0-9 . _ -`
/// (a guest id is a lowercase ULID). No separator may appear in one: the
/// stores key a user's accepted cids as `<user id>:<cid>`, and an id with
/// a `:` could name another user's cid.
pub fn validate_user_id(id: &str) -> Result<(), ChatError> {
    if is_word(id, 64) {
        Ok(())
    } else {
        Err(ChatError::bad_request(
            "user ids are 1-64 characters of A-Z, a-z, 0-9, _, . and -",
        ))
    }
}

/// Idempotency keys: 1–64 characters, no control characters.
pub fn validate_cid(cid: &str) -> Result<(), ChatError> {
    let count = cid.chars().count();
    if count == 0 || count > MAX_CID_CHARS || cid.chars().any(char::is_control) {
        return Err(ChatError::bad_request(
            "cid must be 1-64 characters without control characters",
        ));
    }
    Ok(())
}

/// Message text: 1..=max characters, not only whitespace, and no control
/// characters other than newline and tab.
pub fn validate_text(text: &str, max_chars: usize) -> Result<(), ChatError> {
    let mut count = 0usize;
    let mut visible = false;
    for c in text.chars() {
        count += 1;
        if c.is_control() && c != '\n' && c != '\t' {
            return Err(ChatError::bad_request(
                "text must not contain control characters other than newline and tab",
            ));
        }
        if !c.is_whitespace() {
            visible = true;
        }
    }
    if count > max_chars {
        return Err(ChatError::TooLarge(format!(
            "text is {count} characters; the limit is {max_chars}"
        )));
    }
    if !visible {
        return Err(ChatError::bad_request(
            "text must not be empty or only whitespace",
        ));
    }
    Ok(())
}

/// `limit` of a history page: 1–100, default 50.
pub fn validate_limit(limit: Option<u32>) -> Result<u32, ChatError> {
    match limit {
        None => Ok(DEFAULT_HISTORY_LIMIT),
        Some(l) if (1..=MAX_HISTORY_LIMIT).contains(&l) => Ok(l),
        Some(_) => Err(ChatError::bad_request("limit must be 1-100")),
    }
}

/// Node frames. Each returns the JSON text of one frame.
pub mod frames {
    use super::*;

    #[derive(Serialize)]
    struct Msg<'a> {
        op: &'static str,
        room: &'a str,
        seq: u64,
        id: &'a str,
        user: &'a User,
        text: &'a str,
        ts: i64,
        cid: &'a str,
    }

    /// A `msg` frame; serialised once per message and shared by every
    /// recipient.
    pub fn msg(m: &ChatMessage) -> String {
        serde_json::to_string(&Msg {
            op: "msg",
            room: &m.room,
            seq: m.seq,
            id: &m.id,
            user: &m.user,
            text: &m.text,
            ts: m.ts,
            cid: &m.cid,
        })
        .unwrap_or_default()
    }

    pub fn welcome(user: &User, node: &str, session: &str) -> String {
        json!({"op": "welcome", "user": user, "node": node, "session": session,
               "protocol": PROTOCOL_VERSION})
        .to_string()
    }

    pub fn joined(room: &str, last_seq: u64, members: &[User]) -> String {
        json!({"op": "joined", "room": room, "last_seq": last_seq, "members": members}).to_string()
    }

    pub fn ack(m: &ChatMessage) -> String {
        json!({"op": "ack", "cid": m.cid, "room": m.room, "seq": m.seq, "id": m.id}).to_string()
    }

    pub fn presence(room: &str, joined: &[User], left: &[User]) -> String {
        json!({"op": "presence", "room": room, "joined": joined, "left": left}).to_string()
    }

    pub fn typing(room: &str, user: &User) -> String {
        json!({"op": "typing", "room": room, "user": user}).to_string()
    }

    pub fn history(room: &str, messages: &[ChatMessage], has_more: bool) -> String {
        json!({"op": "history", "room": room, "messages": messages, "has_more": has_more})
            .to_string()
    }

    pub fn pong(t: &Option<Value>) -> String {
        match t {
            Some(t) => json!({"op": "pong", "t": t}).to_string(),
            None => json!({"op": "pong"}).to_string(),
        }
    }

    pub fn error(e: &ChatError, reference: Option<&str>) -> String {
        let mut v = json!({"op": "error", "code": e.code(), "message": e.to_string()});
        if let (Some(r), Value::Object(map)) = (reference, &mut v) {
            map.insert("ref".into(), Value::String(r.to_string()));
        }
        v.to_string()
    }
}

#[cfg(test)]
impl ChatMessage {
    /// A message of room `r` by user `u` with this `seq`, for unit tests.
    pub(crate) fn sample(seq: u64) -> Self {
        ChatMessage {
            room: "r".into(),
            seq,
            id: format!("id{seq}"),
            user: User {
                id: "u".into(),
                name: "n".into(),
            },
            text: "t".into(),
            ts: 0,
            cid: format!("c{seq}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(s: &str) -> Result<ClientOp, FrameError> {
        parse_client_frame(s, 10)
    }

    fn code(s: &str) -> (&'static str, Option<String>) {
        let e = parse(s).unwrap_err();
        (e.error.code(), e.reference)
    }

    #[test]
    fn every_op_parses() {
        assert_eq!(
            parse(r#"{"op":"join","room":"a-1","since":3}"#).unwrap(),
            ClientOp::Join {
                room: "a-1".into(),
                since: Some(3)
            }
        );
        assert_eq!(
            parse(r#"{"op":"leave","room":"a"}"#).unwrap(),
            ClientOp::Leave { room: "a".into() }
        );
        assert_eq!(
            parse(r#"{"op":"send","room":"a","text":"hi\n\tthere","cid":"c1","extra":1}"#).unwrap(),
            ClientOp::Send {
                room: "a".into(),
                text: "hi\n\tthere".into(),
                cid: "c1".into()
            }
        );
        assert_eq!(
            parse(r#"{"op":"typing","room":"a"}"#).unwrap(),
            ClientOp::Typing { room: "a".into() }
        );
        assert_eq!(
            parse(r#"{"op":"history","room":"a"}"#).unwrap(),
            ClientOp::History {
                room: "a".into(),
                before: None,
                limit: 50
            }
        );
        assert_eq!(
            parse(r#"{"op":"ping","t":{"x":1}}"#).unwrap(),
            ClientOp::Ping {
                t: Some(json!({"x":1}))
            }
        );
    }

    #[test]
    fn malformed_frames_are_bad_requests() {
        for s in [
            "nope",
            "[1,2]",
            "3",
            "{}",
            r#"{"op":5}"#,
            r#"{"op":"fly"}"#,
            r#"{"op":"join"}"#,
            r#"{"op":"join","room":5}"#,
            r#"{"op":"join","room":"a","since":-1}"#,
            r#"{"op":"join","room":"Abc"}"#,
            r#"{"op":"join","room":""}"#,
            r#"{"op":"send","room":"a","text":"","cid":"c"}"#,
            r#"{"op":"send","room":"a","text":" \n\t ","cid":"c"}"#,
            r#"{"op":"send","room":"a","text":"a\u0000b","cid":"c"}"#,
            r#"{"op":"send","room":"a","text":"a\u001bb","cid":"c"}"#,
            r#"{"op":"send","room":"a","text":"ok","cid":""}"#,
            r#"{"op":"send","room":"a","text":"ok"}"#,
            r#"{"op":"history","room":"a","limit":0}"#,
            r#"{"op":"history","room":"a","limit":101}"#,
        ] {
            assert_eq!(code(s).0, "bad_request", "{s}");
        }
        let long_room = format!(r#"{{"op":"join","room":"{}"}}"#, "a".repeat(65));
        assert_eq!(code(&long_room).0, "bad_request");
        let long_cid = format!(
            r#"{{"op":"send","room":"a","text":"x","cid":"{}"}}"#,
            "c".repeat(65)
        );
        assert_eq!(code(&long_cid), ("bad_request", Some("send".into())));
    }

    #[test]
    fn references_name_the_cid_or_the_op() {
        assert_eq!(
            code(r#"{"op":"send","room":"a","text":"","cid":"c9"}"#),
            ("bad_request", Some("c9".into()))
        );
        assert_eq!(
            code(r#"{"op":"history","room":"A"}"#),
            ("bad_request", Some("history".into()))
        );
        assert_eq!(code("[]"), ("bad_request", None));
    }

    #[test]
    fn text_limit_counts_characters_not_bytes() {
        let ten = "é".repeat(10);
        assert!(validate_text(&ten, 10).is_ok());
        let e = validate_text(&"é".repeat(11), 10).unwrap_err();
        assert_eq!(e.code(), "too_large");
        let frame = format!(
            r#"{{"op":"send","room":"a","text":"{}","cid":"k"}}"#,
            "x".repeat(11)
        );
        assert_eq!(code(&frame), ("too_large", Some("k".into())));
    }

    #[test]
    fn names() {
        assert!(validate_user_name("Al.ice_-9").is_ok());
        for bad in ["", "a b", "ålice", &"a".repeat(33)] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_are_json_with_op() {
        let m = ChatMessage {
            room: "r".into(),
            seq: 2,
            id: "01J".into(),
            user: User {
                id: "u".into(),
                name: "n".into(),
            },
            text: "<b>\"hi\"</b>".into(),
            ts: 5,
            cid: "c".into(),
        };
        let v: Value = serde_json::from_str(&frames::msg(&m)).unwrap();
        assert_eq!(v["op"], "msg");
        assert_eq!(v["text"], "<b>\"hi\"</b>");
        let back: ChatMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
        let e: Value =
            serde_json::from_str(&frames::error(&ChatError::NotJoined, Some("c"))).unwrap();
        assert_eq!(e["code"], "not_joined");
        assert_eq!(e["ref"], "c");
    }
}
