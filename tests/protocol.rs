//! The client contract: identity, every WebSocket op and error code,
//! idempotency, ordering, replay, the REST API, health and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SHORT: Duration = Duration::from_millis(700);

fn user_ref(u: &Value) -> Value {
    json!({ "id": u["id"], "name": u["name"] })
}

fn assert_error(v: &Value, code: &str, what: &str) {
    assert_eq!(v["op"], "error", "{what}: {v}");
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"].is_string(),
        "{what}: error without message: {v}"
    );
}

async fn assert_http_error(resp: reqwest::Response, status: u16, code: &str, what: &str) {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: error body is not JSON: {text:?}"));
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

// ---------------------------------------------------------------- identity

#[tokio::test]
async fn guest_token_accepts_valid_names() {
    let node = TestNode::start_default().await;
    for name in ["alice", "A", "Az09_.-", &"x".repeat(32)] {
        let (token, user) = node.guest(name).await;
        let client = node.connect(&token).await;
        assert_eq!(
            client.welcome["user"],
            user_ref(&user),
            "welcome for {name}"
        );
    }
}

#[tokio::test]
async fn guest_token_refuses_bad_names_and_bad_json() {
    let node = TestNode::start_default().await;
    let long = "x".repeat(33);
    for name in [
        "", &long, "a b", " alice", "alice\n", "héllo", "名前", "a/b", "a@b", "a+b",
    ] {
        let resp = node
            .http()
            .post(node.url("/api/v1/auth/guest"))
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_http_error(resp, 400, "bad_request", &format!("name {name:?}")).await;
    }
    for body in [
        "{",
        "not json",
        "[]",
        "{}",
        r#"{"name": 5}"#,
        r#"{"name": null}"#,
        "",
    ] {
        let resp = node
            .http()
            .post(node.url("/api/v1/auth/guest"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_http_error(resp, 400, "bad_request", &format!("body {body:?}")).await;
    }
}

#[tokio::test]
async fn welcome_frame_has_protocol_user_node_session() {
    let node = TestNode::start_default().await;
    let (token, user) = node.guest("wendy").await;
    let a = node.connect(&token).await;
    let b = node.connect(&token).await;
    for c in [&a, &b] {
        let w = &c.welcome;
        assert_eq!(w["op"], "welcome");
        assert_eq!(w["protocol"], 1, "{w}");
        assert_eq!(w["user"], user_ref(&user), "{w}");
        assert_eq!(w["node"], "test-1", "{w}");
        assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
    }
    assert_ne!(
        a.session(),
        b.session(),
        "two connections share a session id"
    );
}

// ---------------------------------------------------------------- ops

#[tokio::test]
async fn join_answers_joined_with_last_seq_and_members() {
    let node = TestNode::start_default().await;
    let (mut a, ua, _) = node.user("ann").await;
    let (mut b, ub, _) = node.user("bob").await;

    let joined = a.join("lobby").await;
    assert!(joined["last_seq"].is_u64(), "{joined}");
    let empty_seq = joined["last_seq"].as_u64().unwrap();
    assert_eq!(joined["members"], json!([user_ref(&ua)]), "{joined}");

    let (ack, _) = a.send_msg("lobby", "one", "c1").await;
    let (ack2, _) = a.send_msg("lobby", "two", "c2").await;
    assert!(ack["seq"].as_u64().unwrap() > empty_seq);

    let joined_b = b.join("lobby").await;
    assert_eq!(joined_b["last_seq"], ack2["seq"], "{joined_b}");
    let members: BTreeSet<String> = joined_b["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["id"].is_string() && m["name"].is_string(), "{m}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    let expected: BTreeSet<String> = [&ua, &ub]
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, expected, "{joined_b}");

    // Joining again is idempotent: `joined` again, the same room state.
    let again = b.join("lobby").await;
    assert_eq!(again["last_seq"], ack2["seq"]);
    assert_eq!(again["members"].as_array().unwrap().len(), 2, "{again}");

    // Room names: 64 characters and every allowed character class.
    a.join(&"r".repeat(64)).await;
    a.join("a-z_0-9").await;
}

#[tokio::test]
async fn send_is_acked_and_echoed_with_all_fields() {
    let node = TestNode::start_default().await;
    let (mut a, ua, _) = node.user("ann").await;
    a.join("lobby").await;
    let before = now_ms();
    let (ack, msg) = a.send_msg("lobby", "hello world", "cid-1").await;
    let after = now_ms();

    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["cid"], "cid-1");
    assert_eq!(ack["room"], "lobby");
    assert!(ack["seq"].is_u64(), "{ack}");
    assert_ulid(&ack["id"]);

    assert_msg_shape(&msg);
    assert_eq!(msg["room"], "lobby");
    assert_eq!(msg["seq"], ack["seq"]);
    assert_eq!(msg["id"], ack["id"]);
    assert_eq!(msg["user"], user_ref(&ua));
    assert_eq!(msg["text"], "hello world");
    assert_eq!(msg["cid"], "cid-1");
    let ts = msg["ts"].as_i64().unwrap();
    assert!(
        ts >= before - 2000 && ts <= after + 2000,
        "ts {ts} not within [{before}, {after}] (ms since epoch, UTC)"
    );
    let id_ms = assert_ulid(&msg["id"]) as i64;
    assert!(
        (id_ms - ts).abs() < 5000,
        "ULID time {id_ms} far from ts {ts}"
    );

    // Later messages: larger seq, unique ids whose time never goes back.
    let mut last_seq = ack["seq"].as_u64().unwrap();
    let mut last_id = ack["id"].as_str().unwrap().to_string();
    let mut ids = BTreeSet::from([last_id.clone()]);
    for i in 0..20 {
        let (ack, _) = a
            .send_msg("lobby", &format!("m{i}"), &format!("seq-{i}"))
            .await;
        let seq = ack["seq"].as_u64().unwrap();
        let id = ack["id"].as_str().unwrap().to_string();
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        assert!(
            id[..10] >= last_id[..10],
            "ULID time went back: {id} after {last_id}"
        );
        assert!(ids.insert(id.clone()), "id {id} reused");
        last_seq = seq;
        last_id = id;
    }
    // Allowed text: newline and tab, non-ASCII, exactly the limit in characters.
    a.send_msg("lobby", "line one\nline two\ttabbed", "nl")
        .await;
    let (_, m) = a.send_msg("lobby", &"é".repeat(4000), "4000-e").await;
    assert_eq!(m["text"].as_str().unwrap().chars().count(), 4000);
    let (_, m) = a.send_msg("lobby", &"😀".repeat(4000), "4000-emoji").await;
    assert_eq!(m["text"].as_str().unwrap().chars().count(), 4000);
    a.send_msg("lobby", "x", &"c".repeat(64)).await;
}

#[tokio::test]
async fn two_clients_see_each_others_messages() {
    let node = TestNode::start_default().await;
    let (mut a, ua, _) = node.user("ann").await;
    let (mut b, ub, _) = node.user("bob").await;
    a.join("lobby").await;
    b.join("lobby").await;

    let (ack, _) = a.send_msg("lobby", "hi bob", "a1").await;
    let got = b.recv_until("msg").await;
    assert_eq!(got["id"], ack["id"]);
    assert_eq!(got["seq"], ack["seq"]);
    assert_eq!(got["user"], user_ref(&ua));
    assert_eq!(got["text"], "hi bob");
    assert_eq!(got["cid"], "a1");

    let (ack, _) = b.send_msg("lobby", "hi ann", "b1").await;
    let got = a.recv_until("msg").await;
    assert_eq!(got["id"], ack["id"]);
    assert_eq!(got["user"], user_ref(&ub));
    assert_eq!(got["text"], "hi ann");

    // A member of another room gets nothing.
    let (mut c, _, _) = node.user("cat").await;
    c.join("elsewhere").await;
    a.send_msg("lobby", "not for cat", "a2").await;
    c.expect_none_of(SHORT, &["msg"], "message of another room")
        .await;
}

/// A room sends a message that comes after a quiet spell at once, and the
/// ones that follow it within `limits.fanout_window_ms` together once the
/// window has passed, in `seq` order.
#[tokio::test]
async fn messages_that_follow_closely_go_out_together_after_the_window() {
    const WINDOW: Duration = Duration::from_millis(1000);
    const BURST: u64 = 5;
    let node = TestNode::start(NodeOpts {
        fanout_window_ms: WINDOW.as_millis() as u64,
        ..NodeOpts::default()
    })
    .await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("window").await;
    b.join("window").await;

    let sent = std::time::Instant::now();
    a.send_json(&json!({"op": "send", "room": "window", "text": "first", "cid": "w0"}))
        .await;
    let first = b.recv_until("msg").await;
    let first_at = std::time::Instant::now();
    assert_eq!(first["text"], "first");
    assert!(
        first_at - sent < WINDOW / 2,
        "a message after a quiet spell waited {:?}",
        first_at - sent
    );

    for i in 1..=BURST {
        a.send_json(&json!({"op": "send", "room": "window", "text": format!("m{i}"), "cid": format!("w{i}")}))
            .await;
    }
    let mut arrivals = Vec::new();
    let mut seqs = Vec::new();
    while seqs.len() < BURST as usize {
        let m = b.recv_until("msg").await;
        arrivals.push(std::time::Instant::now());
        seqs.push(m["seq"].as_u64().unwrap());
    }
    let start = first["seq"].as_u64().unwrap();
    assert_eq!(seqs, (start + 1..=start + BURST).collect::<Vec<_>>());
    // The first fan-out went out before `first` arrived, so the next one is
    // a window after it at the earliest.
    let waited = arrivals[0] - first_at;
    assert!(
        waited >= WINDOW * 4 / 5,
        "messages right after another went out {waited:?} later, within the window"
    );
    assert!(
        arrivals[BURST as usize - 1] - arrivals[0] < WINDOW / 2,
        "the burst did not go out together"
    );
}

#[tokio::test]
async fn presence_on_join_leave_and_disconnect() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    let (token_b, ub) = node.guest("bob").await;
    a.join("lobby").await;

    let mut b1 = node.connect(&token_b).await;
    b1.join("lobby").await;
    let p = a.recv_until("presence").await;
    assert_eq!(p["room"], "lobby", "{p}");
    assert_eq!(p["joined"], json!([user_ref(&ub)]), "{p}");
    assert_eq!(p["left"], json!([]), "{p}");

    // A second session of the same user is not a new member.
    let mut b2 = node.connect(&token_b).await;
    b2.join("lobby").await;
    a.expect_silence(SHORT, "second session of a present user")
        .await;
    b2.send_json(&json!({"op": "leave", "room": "lobby"})).await;
    b2.ping(1).await;
    a.expect_silence(SHORT, "one of two sessions left").await;

    // The last session leaving is.
    b1.send_json(&json!({"op": "leave", "room": "lobby"})).await;
    let p = a.recv_until("presence").await;
    assert_eq!(p["room"], "lobby", "{p}");
    assert_eq!(p["joined"], json!([]), "{p}");
    assert_eq!(p["left"], json!([user_ref(&ub)]), "{p}");

    // Back, then the connection drops without a close handshake.
    b1.join("lobby").await;
    let p = a.recv_until("presence").await;
    assert_eq!(p["joined"], json!([user_ref(&ub)]), "{p}");
    drop(b1);
    let p = a.recv_until("presence").await;
    assert_eq!(p["left"], json!([user_ref(&ub)]), "{p}");

    // A clean close counts too.
    b2.join("lobby").await;
    let p = a.recv_until("presence").await;
    assert_eq!(p["joined"], json!([user_ref(&ub)]), "{p}");
    b2.close().await;
    let p = a.recv_until("presence").await;
    assert_eq!(p["left"], json!([user_ref(&ub)]), "{p}");
}

/// Many arrivals at once are told in a few `presence` frames, not one per
/// arrival; every arrival is told, and nobody is told about themselves.
#[tokio::test]
async fn presence_of_many_arrivals_is_gathered() {
    const N: usize = 20;
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("crowd").await;
    let mut crowd = Vec::new();
    for i in 0..N {
        let (c, u, _) = node.user(&format!("guest{i}")).await;
        crowd.push((c, u));
    }
    for (c, _) in crowd.iter_mut() {
        c.send_json(&json!({"op": "join", "room": "crowd"})).await;
    }

    let expected: BTreeSet<String> = crowd
        .iter()
        .map(|(_, u)| u["id"].as_str().unwrap().to_string())
        .collect();
    let mut seen = BTreeSet::new();
    let mut frames = 0;
    while seen.len() < N {
        let p = a.recv_until("presence").await;
        frames += 1;
        assert_eq!(p["left"], json!([]), "{p}");
        for u in p["joined"].as_array().unwrap() {
            let id = u["id"].as_str().unwrap().to_string();
            assert!(expected.contains(&id), "unknown arrival {u} in {p}");
            assert!(seen.insert(id), "arrival told twice: {p}");
        }
    }
    assert!(
        frames < N,
        "{N} arrivals at once took {frames} presence frames"
    );

    for (c, u) in crowd.iter_mut() {
        let (_, mut got) = c
            .recv_until_pred(|v| v["op"] == "joined" && v["room"] == "crowd")
            .await;
        // Frames of the window still open are out within a ping later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        got.extend(c.ping(7).await);
        for p in got.iter().filter(|v| v["op"] == "presence") {
            for list in ["joined", "left"] {
                assert!(
                    p[list]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|x| x["id"] != u["id"]),
                    "a user was told about themselves: {p}"
                );
            }
        }
    }
}

#[tokio::test]
async fn typing_is_relayed_to_others_only() {
    let node = TestNode::start_default().await;
    let (mut a, ua, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    let (mut c, _, _) = node.user("cat").await;
    let (mut d, _, _) = node.user("dan").await;
    for cl in [&mut a, &mut b, &mut c] {
        cl.join("lobby").await;
    }
    d.join("other").await;
    // Let the presence frames settle.
    for cl in [&mut a, &mut b, &mut c] {
        cl.ping(0).await;
    }
    a.send_json(&json!({"op": "typing", "room": "lobby"})).await;
    for cl in [&mut b, &mut c] {
        let t = cl.recv_until("typing").await;
        assert_eq!(t["room"], "lobby", "{t}");
        assert_eq!(t["user"], user_ref(&ua), "{t}");
    }
    let before_pong = a.ping(1).await;
    assert!(
        before_pong.iter().all(|v| v["op"] != "typing"),
        "sender got its own typing: {before_pong:?}"
    );
    a.expect_none_of(SHORT, &["typing"], "own typing").await;
    d.expect_silence(SHORT, "typing of another room").await;

    // Typing is never stored.
    let h = a.history("lobby", None, None).await;
    assert_eq!(h["messages"], json!([]), "{h}");
}

#[tokio::test]
async fn history_pages_back_to_the_first_message() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("hist").await;
    let acks = a.blast("hist", "h", 120).await;
    let by_cid = ack_map(&acks);
    let mut all: Vec<u64> = by_cid.values().map(|(s, _)| *s).collect();
    all.sort_unstable();
    assert_eq!(all.len(), 120);
    assert_eq!(all[0], 1, "the first message of a new room has seq 1");
    let by_seq: BTreeMap<u64, (String, String)> = by_cid
        .iter()
        .map(|(cid, (seq, id))| (*seq, (cid.clone(), id.clone())))
        .collect();

    let check_page = |page: &Value, expected: &[u64], has_more: bool| {
        assert_eq!(page["op"], "history", "{page}");
        assert_eq!(page["room"], "hist");
        assert_eq!(seqs(&page["messages"]), expected, "page seqs");
        assert_eq!(page["has_more"], has_more, "has_more");
        for m in page["messages"].as_array().unwrap() {
            assert_msg_shape(m);
            assert!(m.get("op").is_none(), "history item with op: {m}");
            let (cid, id) = &by_seq[&m["seq"].as_u64().unwrap()];
            assert_eq!(&m["cid"], cid);
            assert_eq!(&m["id"], id);
            assert_eq!(m["text"], format!("message {cid}"));
            assert_eq!(m["room"], "hist");
        }
    };

    // Default limit is 50: the 50 latest.
    let p1 = a.history("hist", None, None).await;
    check_page(&p1, &all[70..], true);
    let p2 = a.history("hist", Some(all[70]), Some(50)).await;
    check_page(&p2, &all[20..70], true);
    let p3 = a.history("hist", Some(all[20]), Some(50)).await;
    check_page(&p3, &all[..20], false);
    let p4 = a.history("hist", Some(all[0]), Some(10)).await;
    check_page(&p4, &[], false);

    let big = a.history("hist", None, Some(100)).await;
    check_page(&big, &all[20..], true);
    let one = a.history("hist", None, Some(1)).await;
    check_page(&one, &all[119..], true);
    let all_of_it = a.history("hist", Some(all[119] + 1), Some(100)).await;
    check_page(&all_of_it, &all[20..], true);

    for limit in [0u64, 101] {
        let e = a.history("hist", None, Some(limit)).await;
        assert_error(&e, "bad_request", &format!("limit {limit}"));
        assert_eq!(e["ref"], "history");
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong_carrying_t() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.ping(1234567890123).await;
    a.ping(0).await;
    for t in [json!("abc"), json!(1.5), json!({"x": [1, 2]})] {
        a.send_json(&json!({"op": "ping", "t": t})).await;
        let pong = a.recv_until("pong").await;
        assert_eq!(pong["t"], t, "{pong}");
    }
    a.send_json(&json!({"op": "ping"})).await;
    let pong = a.recv_until("pong").await;
    assert_eq!(pong["op"], "pong");
}

#[tokio::test]
async fn ops_before_join_and_after_leave_are_not_joined() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    b.join("lobby").await;

    let e = a
        .expect_error(Message::Text(
            json!({"op":"send","room":"lobby","text":"hi","cid":"n1"}).to_string(),
        ))
        .await;
    assert_error(&e, "not_joined", "send before join");
    assert_eq!(e["ref"], "n1");
    let e = a
        .expect_error(Message::Text(
            json!({"op":"typing","room":"lobby"}).to_string(),
        ))
        .await;
    assert_error(&e, "not_joined", "typing before join");
    assert_eq!(e["ref"], "typing");
    let e = a
        .expect_error(Message::Text(
            json!({"op":"history","room":"lobby"}).to_string(),
        ))
        .await;
    assert_error(&e, "not_joined", "history before join");
    assert_eq!(e["ref"], "history");
    let e = a
        .expect_error(Message::Text(
            json!({"op":"leave","room":"lobby"}).to_string(),
        ))
        .await;
    assert_error(&e, "not_joined", "leave before join");
    assert_eq!(e["ref"], "leave");

    a.join("lobby").await;
    a.send_msg("lobby", "now joined", "n2").await;
    a.send_json(&json!({"op": "leave", "room": "lobby"})).await;
    let e = a
        .expect_error(Message::Text(
            json!({"op":"send","room":"lobby","text":"hi","cid":"n3"}).to_string(),
        ))
        .await;
    assert_error(&e, "not_joined", "send after leave");
    assert_eq!(e["ref"], "n3");
    a.ping(7).await;

    // Bob saw exactly the one message sent while joined, no typing.
    let (m, skipped) = b.recv_until_collect("msg").await;
    assert_eq!(m["cid"], "n2");
    assert!(skipped.iter().all(|v| v["op"] != "typing"), "{skipped:?}");
    b.expect_none_of(SHORT, &["msg", "typing", "error"], "refused frames")
        .await;
}

// ---------------------------------------------------------------- errors

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("lobby").await;
    b.join("lobby").await;
    b.ping(0).await;

    let send = |text: Value, cid: Value| json!({"op":"send","room":"lobby","text":text,"cid":cid});
    let text = |v: Value| Message::Text(v.to_string());
    let long_room = "r".repeat(65);
    let long_cid = "c".repeat(65);

    // (frame, expected code, expected ref: None = absent, Some(x) = x, or unchecked)
    enum Ref {
        Absent,
        Is(&'static str),
        Any,
    }
    let cases: Vec<(&str, Message, &str, Ref)> = vec![
        (
            "not JSON",
            Message::Text("not json".into()),
            "bad_request",
            Ref::Absent,
        ),
        (
            "truncated JSON",
            Message::Text("{\"op\":".into()),
            "bad_request",
            Ref::Absent,
        ),
        (
            "JSON array",
            Message::Text("[1,2,3]".into()),
            "bad_request",
            Ref::Absent,
        ),
        (
            "JSON number",
            Message::Text("42".into()),
            "bad_request",
            Ref::Absent,
        ),
        (
            "JSON string",
            Message::Text("\"ping\"".into()),
            "bad_request",
            Ref::Absent,
        ),
        (
            "binary frame",
            Message::Binary(br#"{"op":"ping"}"#.to_vec()),
            "bad_request",
            Ref::Absent,
        ),
        ("empty object", text(json!({})), "bad_request", Ref::Any),
        (
            "op not a string",
            text(json!({"op": 5})),
            "bad_request",
            Ref::Any,
        ),
        (
            "unknown op",
            text(json!({"op": "dance"})),
            "bad_request",
            Ref::Any,
        ),
        (
            "join without room",
            text(json!({"op": "join"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join room not a string",
            text(json!({"op": "join", "room": 5})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join empty room",
            text(json!({"op": "join", "room": ""})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join 65-char room",
            text(json!({"op": "join", "room": long_room})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join uppercase room",
            text(json!({"op": "join", "room": "Lobby"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join room with space",
            text(json!({"op": "join", "room": "a b"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join room with slash",
            text(json!({"op": "join", "room": "a/b"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join room with dot",
            text(json!({"op": "join", "room": "a.b"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join non-ASCII room",
            text(json!({"op": "join", "room": "café"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join since not a number",
            text(json!({"op": "join", "room": "lobby", "since": "x"})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "join negative since",
            text(json!({"op": "join", "room": "lobby", "since": -1})),
            "bad_request",
            Ref::Is("join"),
        ),
        (
            "leave without room",
            text(json!({"op": "leave"})),
            "bad_request",
            Ref::Is("leave"),
        ),
        (
            "typing without room",
            text(json!({"op": "typing"})),
            "bad_request",
            Ref::Is("typing"),
        ),
        (
            "history limit 0",
            text(json!({"op": "history", "room": "lobby", "limit": 0})),
            "bad_request",
            Ref::Is("history"),
        ),
        (
            "history limit 101",
            text(json!({"op": "history", "room": "lobby", "limit": 101})),
            "bad_request",
            Ref::Is("history"),
        ),
        (
            "history limit not a number",
            text(json!({"op": "history", "room": "lobby", "limit": "ten"})),
            "bad_request",
            Ref::Is("history"),
        ),
        (
            "history before not a number",
            text(json!({"op": "history", "room": "lobby", "before": "x"})),
            "bad_request",
            Ref::Is("history"),
        ),
        (
            "send without text",
            text(json!({"op":"send","room":"lobby","cid":"e1"})),
            "bad_request",
            Ref::Is("e1"),
        ),
        (
            "send text not a string",
            text(send(json!(5), json!("e2"))),
            "bad_request",
            Ref::Is("e2"),
        ),
        (
            "send without room",
            text(json!({"op":"send","text":"hi","cid":"e3"})),
            "bad_request",
            Ref::Is("e3"),
        ),
        (
            "send bad room",
            text(json!({"op":"send","room":"No Room","text":"hi","cid":"e4"})),
            "bad_request",
            Ref::Is("e4"),
        ),
        (
            "send without cid",
            text(json!({"op":"send","room":"lobby","text":"hi"})),
            "bad_request",
            Ref::Any,
        ),
        (
            "send empty cid",
            text(send(json!("hi"), json!(""))),
            "bad_request",
            Ref::Any,
        ),
        (
            "send 65-char cid",
            text(send(json!("hi"), json!(long_cid))),
            "bad_request",
            Ref::Any,
        ),
        (
            "send cid not a string",
            text(send(json!("hi"), json!(5))),
            "bad_request",
            Ref::Any,
        ),
        (
            "send empty text",
            text(send(json!(""), json!("e5"))),
            "bad_request",
            Ref::Is("e5"),
        ),
        (
            "send spaces only",
            text(send(json!("     "), json!("e6"))),
            "bad_request",
            Ref::Is("e6"),
        ),
        (
            "send whitespace only",
            text(send(json!(" \n\t \n"), json!("e7"))),
            "bad_request",
            Ref::Is("e7"),
        ),
        (
            "send NUL",
            text(send(json!("a\u{0}b"), json!("e8"))),
            "bad_request",
            Ref::Is("e8"),
        ),
        (
            "send only NUL",
            text(send(json!("\u{0}"), json!("e9"))),
            "bad_request",
            Ref::Is("e9"),
        ),
        (
            "send BEL",
            text(send(json!("ding\u{7}"), json!("e10"))),
            "bad_request",
            Ref::Is("e10"),
        ),
        (
            "send ESC",
            text(send(json!("\u{1b}[31mred"), json!("e11"))),
            "bad_request",
            Ref::Is("e11"),
        ),
        (
            "send CR",
            text(send(json!("a\rb"), json!("e12"))),
            "bad_request",
            Ref::Is("e12"),
        ),
        (
            "send DEL",
            text(send(json!("a\u{7f}b"), json!("e13"))),
            "bad_request",
            Ref::Is("e13"),
        ),
        (
            "send C1 control",
            text(send(json!("a\u{9b}b"), json!("e14"))),
            "bad_request",
            Ref::Is("e14"),
        ),
        (
            "send text over limit",
            text(send(json!("a".repeat(4001)), json!("e15"))),
            "too_large",
            Ref::Is("e15"),
        ),
        (
            "send non-ASCII over limit",
            text(send(json!("é".repeat(4001)), json!("e16"))),
            "too_large",
            Ref::Is("e16"),
        ),
    ];

    for (i, (what, frame, code, want_ref)) in cases.into_iter().enumerate() {
        let e = a.expect_error(frame).await;
        assert_error(&e, code, what);
        match want_ref {
            Ref::Absent => assert!(
                e.get("ref").is_none() || e["ref"].is_null(),
                "{what}: ref should be absent: {e}"
            ),
            Ref::Is(r) => assert_eq!(e["ref"], r, "{what}: ref in {e}"),
            Ref::Any => {}
        }
        // The connection is still usable.
        let skipped = a.ping(i as i64 + 100).await;
        assert!(
            skipped.iter().all(|v| v["op"] != "ack" && v["op"] != "msg"),
            "{what}: produced {skipped:?}"
        );
    }

    // Nothing of it reached Bob, and both still work.
    b.ping(1).await;
    let (ack, _) = a.send_msg("lobby", "still fine", "ok-1").await;
    let (m, skipped) = b.recv_until_collect("msg").await;
    assert_eq!(m["id"], ack["id"], "Bob's next message: {m}");
    assert!(skipped.iter().all(|v| v["op"] != "error"), "{skipped:?}");
    let (ack, _) = b.send_msg("lobby", "me too", "ok-2").await;
    assert_eq!(a.recv_until("msg").await["id"], ack["id"]);
    let h = b.history("lobby", None, None).await;
    assert_eq!(seqs(&h["messages"]).len(), 2, "stored: {h}");
}

#[tokio::test]
async fn rate_limit_refuses_excess_sends_per_connection() {
    let node = TestNode::start(NodeOpts {
        rate_per_sec: 1.0,
        rate_burst: 2,
        ..NodeOpts::default()
    })
    .await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("lobby").await;
    b.join("lobby").await;
    // Let the bucket refill after the join.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    for i in 0..10 {
        a.send_json(
            &json!({"op":"send","room":"lobby","text":format!("blast {i}"),"cid":format!("r{i}")}),
        )
        .await;
    }
    let mut acked = BTreeSet::new();
    let mut limited = BTreeSet::new();
    while acked.len() + limited.len() < 10 {
        let v = a.recv_json().await;
        match v["op"].as_str() {
            Some("ack") => {
                acked.insert(v["cid"].as_str().unwrap().to_string());
            }
            Some("error") => {
                assert_error(&v, "rate_limited", "blast");
                let r = v["ref"].as_str().unwrap_or_else(|| panic!("no ref: {v}"));
                assert!(r.starts_with('r'), "{v}");
                limited.insert(r.to_string());
            }
            _ => {}
        }
    }
    assert!(
        (2..=3).contains(&acked.len()),
        "burst 2 at 1/s: {} acked ({acked:?}), {} limited",
        acked.len(),
        limited.len()
    );
    assert!(acked.is_disjoint(&limited));

    // The other member sees only what was acked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sentinel = a.send_acked("lobby", "after the pause", "sentinel").await;
    let mut seen = BTreeSet::new();
    loop {
        let m = b.recv_until("msg").await;
        if m["cid"] == "sentinel" {
            assert_eq!(m["id"], sentinel["id"]);
            break;
        }
        seen.insert(m["cid"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, acked, "delivered vs acked");
    // Bob's own bucket is untouched.
    b.send_acked("lobby", "bob is fine", "b1").await;
}

// ---------------------------------------------------------------- idempotency

#[tokio::test]
async fn same_cid_is_one_message_per_user_and_room() {
    let node = TestNode::start_default().await;
    let (token_a, ua) = node.guest("ann").await;
    let mut a = node.connect(&token_a).await;
    let (mut b, ub, _) = node.user("bob").await;
    let (mut observer, _, _) = node.user("eve").await;
    a.join("r1").await;
    a.join("r2").await;
    b.join("r1").await;
    observer.join("r1").await;

    let (first, _) = a.send_msg("r1", "first", "dup").await;
    let again = a.send_acked("r1", "second attempt", "dup").await;
    assert_eq!(again["id"], first["id"], "retry id");
    assert_eq!(again["seq"], first["seq"], "retry seq");

    // Two attempts in flight at once.
    for _ in 0..2 {
        a.send_json(&json!({"op":"send","room":"r1","text":"twin","cid":"dup2"}))
            .await;
    }
    let mut twin_acks = Vec::new();
    while twin_acks.len() < 2 {
        let v = a.recv_json().await;
        assert_ne!(v["op"], "error", "{v}");
        if v["op"] == "ack" {
            twin_acks.push(v);
        }
    }
    assert_eq!(twin_acks[0]["id"], twin_acks[1]["id"]);
    assert_eq!(twin_acks[0]["seq"], twin_acks[1]["seq"]);

    // Another room: another message.
    let other_room = a.send_acked("r2", "first", "dup").await;
    assert_eq!(other_room["room"], "r2");
    assert_ne!(other_room["id"], first["id"]);

    // Another user: another message.
    let (other_user, m) = b.send_msg("r1", "first", "dup").await;
    assert_ne!(other_user["id"], first["id"]);
    assert_ne!(other_user["seq"], first["seq"]);
    assert_eq!(m["user"], user_ref(&ub));

    // Another session of the same user: the same message.
    let mut a2 = node.connect(&token_a).await;
    a2.join("r1").await;
    let resent = a2.send_acked("r1", "from elsewhere", "dup").await;
    assert_eq!(resent["id"], first["id"]);
    assert_eq!(resent["seq"], first["seq"]);

    // An observer saw each message exactly once.
    let sentinel = a.send_acked("r1", "end", "sentinel").await;
    let mut count: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    loop {
        let m = observer.recv_until("msg").await;
        if m["id"] == sentinel["id"] {
            break;
        }
        let key = (
            m["user"]["id"].as_str().unwrap().to_string(),
            m["cid"].as_str().unwrap().to_string(),
        );
        count.entry(key).or_default().push(m);
    }
    let a_id = ua["id"].as_str().unwrap().to_string();
    let b_id = ub["id"].as_str().unwrap().to_string();
    let dup = &count[&(a_id.clone(), "dup".to_string())];
    assert_eq!(dup.len(), 1, "ann's dup delivered {dup:?}");
    assert_eq!(dup[0]["text"], "first");
    assert_eq!(count[&(a_id, "dup2".to_string())].len(), 1);
    assert_eq!(count[&(b_id, "dup".to_string())].len(), 1);
    assert_eq!(count.len(), 3, "{count:?}");

    // And the room stores three messages plus the sentinel.
    let h = b.history("r1", None, None).await;
    assert_eq!(seqs(&h["messages"]).len(), 4, "{h}");
}

// ---------------------------------------------------------------- ordering

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_are_seen_in_one_seq_order() {
    let node = TestNode::start_default().await;
    let (mut s1, u1, _) = node.user("s1").await;
    let (mut s2, u2, _) = node.user("s2").await;
    let (mut r, _, _) = node.user("reader").await;
    for c in [&mut s1, &mut s2, &mut r] {
        c.join("race").await;
    }
    for c in [&mut s1, &mut s2, &mut r] {
        c.ping(0).await;
    }

    let run = |mut c: TestClient, prefix: &'static str| {
        tokio::spawn(async move {
            for i in 0..100 {
                c.send_json(&json!({"op":"send","room":"race","text":format!("{prefix} {i}"),"cid":format!("{prefix}-{i}")}))
                    .await;
            }
            let mut acks = Vec::new();
            let mut msgs = Vec::new();
            while acks.len() < 100 || msgs.len() < 200 {
                let v = c.recv_json().await;
                match v["op"].as_str() {
                    Some("ack") => acks.push(v),
                    Some("msg") => msgs.push(v),
                    Some("error") => panic!("{prefix}: {v}"),
                    _ => {}
                }
            }
            (acks, msgs)
        })
    };
    let t1 = run(s1, "one");
    let t2 = run(s2, "two");
    let mut received = Vec::new();
    while received.len() < 200 {
        let v = r.recv_json().await;
        if v["op"] == "msg" {
            received.push(v);
        }
    }
    r.expect_none_of(SHORT, &["msg"], "more than 200 messages")
        .await;
    let (acks1, msgs1) = t1.await.unwrap();
    let (acks2, msgs2) = t2.await.unwrap();

    let mut acked = ack_map(&acks1);
    acked.extend(ack_map(&acks2));
    assert_eq!(acked.len(), 200);

    for (who, list) in [("reader", &received), ("s1", &msgs1), ("s2", &msgs2)] {
        let s: Vec<u64> = list.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_strictly_increasing(&s, who);
        let mut cids = BTreeSet::new();
        for m in list.iter() {
            let cid = m["cid"].as_str().unwrap().to_string();
            assert!(cids.insert(cid.clone()), "{who}: {cid} twice");
            let (seq, id) = &acked[&cid];
            assert_eq!(m["seq"].as_u64().unwrap(), *seq, "{who}: {cid} seq vs ack");
            assert_eq!(m["id"].as_str().unwrap(), id, "{who}: {cid} id vs ack");
            let expected_user = if cid.starts_with("one") { &u1 } else { &u2 };
            assert_eq!(m["user"], user_ref(expected_user));
        }
        assert_eq!(cids.len(), 200, "{who}");
    }
    let ids: BTreeSet<&String> = acked.values().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 200, "ids unique");
}

// ---------------------------------------------------------------- replay

#[tokio::test]
async fn join_since_replays_exactly_the_later_messages_first() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("replay").await;
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(
            a.send_msg("replay", &format!("m{i}"), &format!("c{i}"))
                .await
                .0,
        );
    }
    let seq_of = |i: usize| acks[i]["seq"].as_u64().unwrap();

    let check = |msgs: &[Value], joined: &Value, from: usize| {
        let expected: Vec<u64> = (from..10).map(seq_of).collect();
        let got: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, expected, "replayed seqs");
        for (m, ack) in msgs.iter().zip(&acks[from..]) {
            assert_msg_shape(m);
            assert_eq!(m["id"], ack["id"]);
            assert_eq!(m["cid"], ack["cid"]);
        }
        assert_eq!(joined["last_seq"], seq_of(9), "{joined}");
    };

    let (token_b, _) = node.guest("bob").await;
    let mut b = node.connect(&token_b).await;
    let (msgs, joined) = b.join_since("replay", seq_of(3)).await;
    check(&msgs, &joined, 4);

    let mut c = node.connect(&token_b).await;
    let (msgs, joined) = c.join_since("replay", 0).await;
    check(&msgs, &joined, 0);

    let mut d = node.connect(&token_b).await;
    let (msgs, joined) = d.join_since("replay", seq_of(9)).await;
    check(&msgs, &joined, 10);

    // Then live, with nothing replayed twice.
    let (ack, _) = a.send_msg("replay", "live", "live").await;
    for cl in [&mut b, &mut c, &mut d] {
        let (m, skipped) = cl.recv_until_collect("msg").await;
        assert_eq!(m["id"], ack["id"], "next message after joined");
        assert!(skipped.iter().all(|v| v["op"] != "msg"), "{skipped:?}");
    }
    // No `since`: no replay at all.
    let mut e = node.connect(&token_b).await;
    e.send_json(&json!({"op":"join","room":"replay"})).await;
    let (joined, skipped) = e.recv_until_collect("joined").await;
    assert!(skipped.iter().all(|v| v["op"] != "msg"), "{skipped:?}");
    assert_eq!(joined["last_seq"], ack["seq"]);
}

// ---------------------------------------------------------------- REST

#[tokio::test]
async fn rest_rooms_lists_members_and_last_seq() {
    let node = TestNode::start_default().await;
    let (token_a, _) = node.guest("ann").await;
    let mut a1 = node.connect(&token_a).await;
    let mut a2 = node.connect(&token_a).await;
    let (mut b, _, _) = node.user("bob").await;
    let (mut c, _, _) = node.user("cat").await;
    a1.join("alpha").await;
    a2.join("alpha").await;
    b.join("alpha").await;
    let beta_joined = c.join("beta").await;
    let mut last = Value::Null;
    for i in 0..3 {
        last = a1.send_msg("alpha", "x", &format!("a{i}")).await.0;
    }

    let rooms = get_rooms(&node).await;
    let alpha = &rooms["alpha"];
    assert_eq!(
        alpha["members"], 2,
        "two distinct users (three sessions): {alpha}"
    );
    assert_eq!(alpha["last_seq"], last["seq"], "{alpha}");
    let beta = &rooms["beta"];
    assert_eq!(beta["members"], 1, "{beta}");
    assert_eq!(beta["last_seq"], beta_joined["last_seq"], "{beta}");

    // Beta had no messages: gone once its only member is.
    c.close().await;
    // Alpha keeps its messages with nobody online.
    a1.close().await;
    a2.close().await;
    b.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rooms = get_rooms(&node).await;
        let done =
            !rooms.contains_key("beta") && rooms.get("alpha").is_some_and(|a| a["members"] == 0);
        if done {
            assert_eq!(rooms["alpha"]["last_seq"], last["seq"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rooms after everyone left: {rooms:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_rooms(node: &TestNode) -> BTreeMap<String, Value> {
    let resp = node
        .http()
        .get(node.url("/api/v1/rooms"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let mut map = BTreeMap::new();
    for r in body["rooms"].as_array().unwrap_or_else(|| panic!("{body}")) {
        assert!(r["members"].is_u64() && r["last_seq"].is_u64(), "{r}");
        map.insert(r["name"].as_str().unwrap().to_string(), r.clone());
    }
    map
}

async fn get_messages(node: &TestNode, room: &str, query: &str) -> reqwest::Response {
    node.http()
        .get(node.url(&format!("/api/v1/rooms/{room}/messages{query}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn rest_messages_page_like_history() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("gamma").await;
    let mut acks = Vec::new();
    for i in 0..7 {
        acks.push(
            a.send_msg("gamma", &format!("g{i}"), &format!("g{i}"))
                .await
                .0,
        );
    }
    let seq_of = |i: usize| acks[i]["seq"].as_u64().unwrap();

    // (query string, the same as history's `before` and `limit`, expected seqs, has_more)
    type Case = (String, Option<u64>, Option<u64>, Vec<u64>, bool);
    let cases: Vec<Case> = vec![
        (
            String::new(),
            None,
            None,
            (0..7).map(seq_of).collect(),
            false,
        ),
        (
            "?limit=3".into(),
            None,
            Some(3),
            (4..7).map(seq_of).collect(),
            true,
        ),
        (
            format!("?before={}&limit=2", seq_of(4)),
            Some(seq_of(4)),
            Some(2),
            vec![seq_of(2), seq_of(3)],
            true,
        ),
        (
            format!("?before={}", seq_of(1)),
            Some(seq_of(1)),
            None,
            vec![seq_of(0)],
            false,
        ),
        (
            format!("?before={}", seq_of(0)),
            Some(seq_of(0)),
            None,
            vec![],
            false,
        ),
    ];
    for (query, before, limit, expected, has_more) in cases {
        let resp = get_messages(&node, "gamma", &query).await;
        assert_eq!(resp.status(), 200, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(seqs(&body["messages"]), expected, "{query}: {body}");
        assert_eq!(body["has_more"], has_more, "{query}");
        let ws = a.history("gamma", before, limit).await;
        assert_eq!(
            body["messages"], ws["messages"],
            "{query}: REST and history differ"
        );
        for m in body["messages"].as_array().unwrap() {
            assert_msg_shape(m);
        }
    }
    for query in ["?limit=0", "?limit=101", "?limit=abc", "?before=x"] {
        let resp = get_messages(&node, "gamma", query).await;
        assert_http_error(resp, 400, "bad_request", query).await;
    }
    let resp = get_messages(&node, "Bad%20Room", "").await;
    let status = resp.status().as_u16();
    assert!(status == 400 || status == 404, "bad room name: {status}");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");
}

#[tokio::test]
async fn rest_post_message_is_durable_idempotent_and_live() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("delta").await;
    a.ping(0).await;
    let (token_p, up) = node.guest("poster").await;
    let post = |token: Option<&str>, body: Value| {
        let mut req = node
            .http()
            .post(node.url("/api/v1/rooms/delta/messages"))
            .json(&body);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.send()
    };

    let before = now_ms();
    let resp = post(
        Some(&token_p),
        json!({"text": "from rest", "cid": "rest-1"}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    let created = body.get("message").cloned().unwrap_or_else(|| body.clone());
    assert_msg_shape(&created);
    assert_eq!(created["room"], "delta", "{body}");
    assert_eq!(created["text"], "from rest");
    assert_eq!(created["cid"], "rest-1");
    assert_eq!(created["user"], user_ref(&up));
    assert!(created["ts"].as_i64().unwrap() >= before - 2000);

    let live = a.recv_until("msg").await;
    assert_eq!(live["id"], created["id"]);
    assert_eq!(live["seq"], created["seq"]);
    assert_eq!(live["user"], user_ref(&up));

    // The same cid again: the same message, not delivered twice.
    let resp = post(
        Some(&token_p),
        json!({"text": "from rest again", "cid": "rest-1"}),
    )
    .await
    .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let body: Value = resp.json().await.unwrap();
    let again = body.get("message").cloned().unwrap_or_else(|| body.clone());
    assert_eq!(again["id"], created["id"]);
    assert_eq!(again["seq"], created["seq"]);

    // The same cid over WebSocket by the same user: still the same message.
    let mut p_ws = node.connect(&token_p).await;
    p_ws.join("delta").await;
    let ws_ack = p_ws.send_acked("delta", "over ws", "rest-1").await;
    assert_eq!(ws_ack["id"], created["id"]);
    assert_eq!(ws_ack["seq"], created["seq"]);

    let resp = post(Some(&token_p), json!({"text": "second", "cid": "rest-2"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (next, skipped) = a.recv_until_collect("msg").await;
    assert_eq!(next["cid"], "rest-2", "a duplicate was delivered: {next}");
    assert!(skipped.iter().all(|v| v["op"] != "msg"));

    // Refusals.
    let resp = post(None, json!({"text": "x", "cid": "n1"})).await.unwrap();
    assert_http_error(resp, 401, "unauthorized", "no token").await;
    let resp = post(Some("forged.token"), json!({"text": "x", "cid": "n2"}))
        .await
        .unwrap();
    assert_http_error(resp, 401, "unauthorized", "forged token").await;
    let resp = post(Some(&token_p), json!({"text": "", "cid": "n3"}))
        .await
        .unwrap();
    assert_http_error(resp, 400, "bad_request", "empty text").await;
    let resp = post(Some(&token_p), json!({"text": "a\u{0}b", "cid": "n4"}))
        .await
        .unwrap();
    assert_http_error(resp, 400, "bad_request", "NUL in text").await;
    let resp = post(Some(&token_p), json!({"text": "x"})).await.unwrap();
    assert_http_error(resp, 400, "bad_request", "no cid").await;
    let resp = post(
        Some(&token_p),
        json!({"text": "x".repeat(4001), "cid": "n5"}),
    )
    .await
    .unwrap();
    assert_http_error(resp, 413, "too_large", "text over limit").await;
    let resp = node
        .http()
        .post(node.url("/api/v1/rooms/delta/messages"))
        .header("Authorization", format!("Bearer {token_p}"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_http_error(resp, 400, "bad_request", "bad JSON").await;

    // None of the refused posts reached the room.
    a.expect_none_of(SHORT, &["msg"], "refused posts").await;
    let h = a.history("delta", None, None).await;
    assert_eq!(seqs(&h["messages"]).len(), 2, "{h}");
}

#[tokio::test]
async fn rest_me_needs_a_valid_bearer_token() {
    let node = TestNode::start_default().await;
    let (token, user) = node.guest("meg").await;
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["user"], user_ref(&user), "{body}");

    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .send()
        .await
        .unwrap();
    assert_http_error(resp, 401, "unauthorized", "no header").await;
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", "Bearer nonsense")
        .send()
        .await
        .unwrap();
    assert_http_error(resp, 401, "unauthorized", "garbage token").await;
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_http_error(resp, 401, "unauthorized", "not a bearer").await;
}

// ---------------------------------------------------------------- health, metrics

#[tokio::test]
async fn health_readiness_and_metrics() {
    let node = TestNode::start_default().await;
    let resp = node.http().get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = node.http().get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["dependencies"]["store"], "ok", "{body}");

    let resp = node.http().get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(ctype.starts_with("text/plain"), "content-type {ctype:?}");

    let m0 = node.metrics().await;
    let v0 = |name: &str| metric_value(&m0, name, &[]).unwrap_or(0.0);
    let in0 = v0("scalable_chat_messages_in_total");
    let out0 = v0("scalable_chat_messages_out_total");
    let lat0 = v0("scalable_chat_ack_latency_seconds_count");
    let err0 = metric_value(
        &m0,
        "scalable_chat_errors_total",
        &[r#"code="bad_request""#],
    )
    .unwrap_or(0.0);

    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("metrics-room").await;
    b.join("metrics-room").await;
    a.send_msg("metrics-room", "count me", "m1").await;
    b.recv_until("msg").await;
    a.expect_error(Message::Text("nope".into())).await;

    // Counters are updated right after the frames that caused them, but allow a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let m = node.metrics().await;
        let v = |name: &str| metric_value(&m, name, &[]);
        let ok = v("scalable_chat_connections") == Some(2.0)
            && v("scalable_chat_rooms").is_some_and(|r| r >= 1.0)
            && v("scalable_chat_messages_in_total") == Some(in0 + 1.0)
            && v("scalable_chat_messages_out_total").is_some_and(|o| o > out0)
            && v("scalable_chat_ack_latency_seconds_count") == Some(lat0 + 1.0)
            && v("scalable_chat_ack_latency_seconds_sum").is_some()
            && v("scalable_chat_ack_latency_seconds_bucket").is_some()
            && metric_value(&m, "scalable_chat_errors_total", &[r#"code="bad_request""#])
                == Some(err0 + 1.0);
        if ok {
            assert!(
                m.contains("scalable_chat_ack_latency_seconds_bucket{le=\"+Inf\"}"),
                "histogram without +Inf bucket:\n{m}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics after one send, two deliveries and one bad frame \
             (in0 {in0}, out0 {out0}, lat0 {lat0}, err0 {err0}):\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The gauge follows the connections.
    a.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node.metric("scalable_chat_connections", &[]).await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "connections gauge after a close"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
