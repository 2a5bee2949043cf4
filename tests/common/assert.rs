//! Assertions and summaries over what the node answers: the shape of a
//! message, ULIDs, seq lists, acks by `cid`, a short description of frames
//! for failure messages, and the clock that timestamps are checked against.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A short description of a list of frames (long texts shortened).
pub fn summarize(frames: &[Value]) -> String {
    let mut out = format!("{} frames", frames.len());
    let show = |v: &Value| {
        let s = v.to_string();
        if s.len() > 300 {
            format!("{}…", &s[..s.floor_char_boundary(300)])
        } else {
            s
        }
    };
    if let Some(first) = frames.first() {
        let _ = write!(out, ", first {}", show(first));
    }
    if frames.len() > 1 {
        let _ = write!(out, ", last {}", show(&frames[frames.len() - 1]));
    }
    out
}

/// Asserts the shape of a `msg` body (a frame or a history item).
pub fn assert_msg_shape(m: &Value) {
    assert!(m["room"].is_string(), "room in {m}");
    assert!(m["seq"].is_u64(), "seq in {m}");
    assert_ulid(&m["id"]);
    assert!(m["user"]["id"].is_string(), "user.id in {m}");
    assert!(m["user"]["name"].is_string(), "user.name in {m}");
    assert!(m["text"].is_string(), "text in {m}");
    assert!(m["ts"].is_i64() || m["ts"].is_u64(), "ts in {m}");
    assert!(m["cid"].is_string(), "cid in {m}");
}

const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Asserts `v` is a ULID string and returns its millisecond timestamp.
pub fn assert_ulid(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {v}"));
    assert_eq!(s.len(), 26, "ULID length of {s}");
    let mut ms: u64 = 0;
    for (i, c) in s.chars().enumerate() {
        let digit = CROCKFORD
            .find(c.to_ascii_uppercase())
            .unwrap_or_else(|| panic!("{s} is not Crockford base32"));
        if i < 10 {
            ms = ms * 32 + digit as u64;
        }
    }
    ms
}

/// The seqs of the messages of a `history` frame or REST answer, in order.
pub fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("messages not a list: {messages}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Asserts strictly increasing.
pub fn assert_strictly_increasing(seqs: &[u64], what: &str) {
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "{what}: seq not strictly increasing: {seqs:?}");
    }
}

/// A map cid -> (seq, id) built from acks.
pub fn ack_map(acks: &[Value]) -> BTreeMap<String, (u64, String)> {
    let mut map = BTreeMap::new();
    for a in acks {
        let cid = a["cid"].as_str().unwrap().to_string();
        let seq = a["seq"].as_u64().unwrap();
        let id = a["id"].as_str().unwrap().to_string();
        assert!(
            map.insert(cid.clone(), (seq, id)).is_none(),
            "two acks for {cid}"
        );
    }
    map
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
