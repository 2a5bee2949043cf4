//! Client frames: arbitrary bytes, read as UTF-8 text (invalid sequences
//! replaced), go through `parse_client_frame`. It must never panic, every
//! frame it accepts must pass the validators on its own, and a frame it
//! accepts must read back the same when encoded again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use scalable_chat::protocol::{
    frames, parse_client_frame, validate_cid, validate_limit, validate_room, validate_text,
    ClientOp,
};
use serde_json::{json, Value};

/// Two text limits: the default and a small one, so both sides of the
/// length check are reached.
const LIMITS: [usize; 2] = [4000, 8];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for max in LIMITS {
        check(&text, max);
    }
});

fn check(text: &str, max: usize) {
    match parse_client_frame(text, max) {
        Ok(op) => {
            check_valid(&op, max);
            if let Some(again) = encode(&op) {
                let back = parse_client_frame(&again, max);
                assert!(
                    matches!(&back, Ok(b) if *b == op),
                    "{op:?} encoded as {again} reads back as {back:?}"
                );
            }
        }
        Err(e) => {
            // The `ref` is either a usable cid or a plain op name.
            if let Some(r) = &e.reference {
                let plain_op = r.len() <= 32
                    && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                assert!(
                    plain_op || validate_cid(r).is_ok(),
                    "unusable ref {r:?} for {text:?}"
                );
            }
            // The error frame is always JSON with the code.
            let frame = frames::error(&e.error, e.reference.as_deref());
            let v: Value = serde_json::from_str(&frame).expect("error frame is JSON");
            assert_eq!(v["code"], e.error.code());
        }
    }
}

fn check_valid(op: &ClientOp, max: usize) {
    let room_ok = |room: &String| validate_room(room.clone()).is_ok();
    match op {
        ClientOp::Join { room, .. } | ClientOp::Leave { room } | ClientOp::Typing { room } => {
            assert!(room_ok(room), "accepted room {room:?}");
        }
        ClientOp::Send { room, text, cid } => {
            assert!(room_ok(room), "accepted room {room:?}");
            assert!(validate_cid(cid).is_ok(), "accepted cid {cid:?}");
            assert!(validate_text(text, max).is_ok(), "accepted text {text:?}");
            assert!(!text.contains('\0') && !cid.contains('\0'));
        }
        ClientOp::History { room, limit, .. } => {
            assert!(room_ok(room), "accepted room {room:?}");
            assert_eq!(validate_limit(Some(*limit)).ok(), Some(*limit));
        }
        ClientOp::Ping { .. } => {}
    }
}

/// The frame a client would send for `op` (`None` for `ping`, whose `t` is
/// any JSON and need not survive a float round trip).
fn encode(op: &ClientOp) -> Option<String> {
    let v = match op {
        ClientOp::Join { room, since } => match since {
            Some(s) => json!({"op": "join", "room": room, "since": s}),
            None => json!({"op": "join", "room": room}),
        },
        ClientOp::Leave { room } => json!({"op": "leave", "room": room}),
        ClientOp::Send { room, text, cid } => {
            json!({"op": "send", "room": room, "text": text, "cid": cid})
        }
        ClientOp::Typing { room } => json!({"op": "typing", "room": room}),
        ClientOp::History {
            room,
            before,
            limit,
        } => json!({"op": "history", "room": room, "before": before, "limit": limit}),
        ClientOp::Ping { .. } => return None,
    };
    Some(v.to_string())
}
