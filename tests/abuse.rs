//! Abuse of the cheap paths: pings, binary and garbage frames against the
//! rate limit, a flood into an empty bucket, typing storms, opening rooms
//! by the hundred, a node's room set in Redis that must shrink, and joins
//! whose replays must neither pile up in memory nor interleave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// A node whose connections have a bucket of `burst` tokens that barely
/// refills, so that every token a frame takes shows.
async fn node_with_bucket(burst: u64) -> TestNode {
    TestNode::start(NodeOpts {
        rate_per_sec: 0.01,
        rate_burst: burst,
        ..NodeOpts::default()
    })
    .await
}

/// What arrived within `dur`: the JSON frames, and the WebSocket Pongs.
async fn drain(c: &mut TestClient, dur: Duration) -> (Vec<Value>, usize) {
    let deadline = tokio::time::Instant::now() + dur;
    let mut frames = Vec::new();
    let mut pongs = 0;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) | Ok(None) => return (frames, pongs),
            Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
            Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("connection failed: {e}"),
        }
    }
}

fn with_op<'a>(frames: &'a [Value], op: &str) -> Vec<&'a Value> {
    frames.iter().filter(|v| v["op"] == op).collect()
}

// ---------------------------------------------------------------- pings

#[tokio::test]
async fn pings_cost_a_quarter_token_and_an_empty_bucket_gets_no_pong() {
    // 4 tokens at 0.25 a ping: 16 pings, of the 40 sent.
    let node = node_with_bucket(4).await;
    let (token, _) = node.guest("ann").await;

    let mut app = node.connect(&token).await;
    for t in 0..40 {
        app.send_json(&json!({"op": "ping", "t": t})).await;
    }
    let (frames, _) = drain(&mut app, Duration::from_secs(2)).await;
    let pongs = with_op(&frames, "pong");
    let errors = with_op(&frames, "error");
    assert!(
        (16..=17).contains(&pongs.len()),
        "{} pongs for 40 pings with 4 tokens at 0.25",
        pongs.len()
    );
    assert_eq!(pongs.len() + errors.len(), 40, "each ping answered once");
    for e in errors {
        assert_eq!(e["code"], "rate_limited", "{e}");
        assert_eq!(e["ref"], "ping", "{e}");
    }

    // WebSocket Ping control frames cost the same, on their own connection.
    let mut control = node.connect(&token).await;
    for i in 0..40u8 {
        control.send_raw(Message::Ping(vec![i])).await;
    }
    let (frames, pongs) = drain(&mut control, Duration::from_secs(2)).await;
    assert!(
        (16..=17).contains(&pongs),
        "{pongs} Pongs for 40 Pings with 4 tokens at 0.25"
    );
    let errors = with_op(&frames, "error");
    assert_eq!(pongs + errors.len(), 40, "each Ping answered once");
    for e in errors {
        assert_eq!(e["code"], "rate_limited", "{e}");
        assert!(e.get("ref").is_none(), "a control frame has no ref: {e}");
    }
}

// ---------------------------------------------------------------- garbage

/// A text message in two fragments whose bytes are not UTF-8.
fn fragmented_not_utf8() -> [Message; 2] {
    [
        Message::Frame(Frame::message(
            vec![b'{', 0xff],
            OpCode::Data(Data::Text),
            false,
        )),
        Message::Frame(Frame::message(
            vec![0xfe, b'}'],
            OpCode::Data(Data::Continue),
            true,
        )),
    ]
}

#[tokio::test]
async fn binary_and_garbage_frames_drain_the_bucket() {
    // join (1) + 3 binary + a message that is not UTF-8 + 2 frames that
    // are not JSON = 7 tokens.
    let node = node_with_bucket(7).await;
    let (mut a, _, _) = node.user("ann").await;
    a.join("garbage").await;
    for i in 0..3u8 {
        let e = a.expect_error(Message::Binary(vec![i; 16])).await;
        assert_eq!(e["code"], "bad_request", "binary: {e}");
    }
    let [first, last] = fragmented_not_utf8();
    a.send_raw(first).await;
    let e = a.expect_error(last).await;
    assert_eq!(e["code"], "bad_request", "not UTF-8: {e}");
    for text in ["not json", "{\"op\":"] {
        let e = a.expect_error(Message::Text(text.into())).await;
        assert_eq!(e["code"], "bad_request", "{text}: {e}");
    }

    // The bucket is empty: a valid send is refused, and nothing is stored.
    let send = json!({"op": "send", "room": "garbage", "text": "hi", "cid": "c1"});
    let e = a.expect_error(Message::Text(send.to_string())).await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert_eq!(e["ref"], "c1", "{e}");
    let binary = a.expect_error(Message::Binary(vec![0; 4])).await;
    assert_eq!(binary["code"], "rate_limited", "{binary}");

    let (mut b, _, _) = node.user("bob").await;
    let h = {
        b.join("garbage").await;
        b.history("garbage", None, None).await
    };
    assert_eq!(h["messages"].as_array().unwrap().len(), 0, "{h}");
}

#[tokio::test]
async fn a_flood_into_an_empty_bucket_is_closed_with_1008() {
    let node = TestNode::start(NodeOpts {
        rate_per_sec: 1.0,
        rate_burst: 2,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let flooder = node.connect(&token).await;
    let flood = 1000;
    let (mut sink, mut stream) = flooder.ws.split();
    let writer = tokio::spawn(async move {
        for _ in 0..flood {
            // The node stops reading once it closed.
            if sink.send(Message::Text("garbage".into())).await.is_err() {
                break;
            }
        }
        sink
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut errors = 0;
    let close = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => errors += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("no close within 20 s ({errors} errors read): {other:?}"),
        }
    };
    let _ = writer.await;
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert_eq!(close.reason, "rate limit exceeded");
    // 2 frames taken, then about 100 refusals answered (with a little
    // refill), the rest of the flood unanswered.
    assert!(
        errors < 120,
        "{errors} error frames for a flood of {flood} garbage frames"
    );

    // Another connection of the same user is not affected.
    let mut other = node.connect(&token).await;
    other.ping(1).await;
}

// ---------------------------------------------------------------- typing

#[tokio::test]
async fn typing_is_relayed_once_per_interval_over_all_of_a_users_connections() {
    let node = TestNode::start(NodeOpts {
        typing_interval_ms: 3000,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let mut a1 = node.connect(&token).await;
    let mut a2 = node.connect(&token).await;
    let (mut b, _, _) = node.user("bob").await;
    for c in [&mut a1, &mut a2, &mut b] {
        c.join("typing").await;
    }
    // Ten typing frames within a second, from both of ann's connections.
    for i in 0..10 {
        let c = if i % 2 == 0 { &mut a1 } else { &mut a2 };
        c.send_json(&json!({"op": "typing", "room": "typing"}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (frames, _) = drain(&mut b, Duration::from_millis(1500)).await;
    let typing = with_op(&frames, "typing");
    assert_eq!(typing.len(), 1, "bob got {typing:?}");
    // None of them was refused: they still cost only their token.
    for c in [&mut a1, &mut a2] {
        let (frames, _) = drain(c, Duration::from_millis(100)).await;
        assert!(with_op(&frames, "error").is_empty(), "{frames:?}");
    }

    // After the interval ann's typing goes out again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    a1.send_json(&json!({"op": "typing", "room": "typing"}))
        .await;
    let t = b.recv_until("typing").await;
    assert_eq!(t["user"]["name"], "ann", "{t}");
}

// ---------------------------------------------------------------- new rooms

/// Sends `join` and answers `joined`, or the `error` about it.
async fn try_join(c: &mut TestClient, room: &str) -> Value {
    c.send_json(&json!({"op": "join", "room": room})).await;
    let (v, _) = c
        .recv_until_pred(|v| {
            (v["op"] == "joined" && v["room"] == room) || (v["op"] == "error" && v["ref"] == "join")
        })
        .await;
    v
}

async fn post(node: &TestNode, token: &str, room: &str, cid: &str) -> reqwest::Response {
    node.http()
        .post(node.url(&format!("/api/v1/rooms/{room}/messages")))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"text": "hello", "cid": cid}))
        .send()
        .await
        .unwrap()
}

/// The members `GET /api/v1/rooms` lists for `room` (0 when it is absent).
async fn listed_members(node: &TestNode, room: &str) -> u64 {
    let (status, body) = node.get_json("/api/v1/rooms").await;
    assert_eq!(status, 200, "{body}");
    body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == room)
        .map_or(0, |r| r["members"].as_u64().unwrap())
}

#[tokio::test]
async fn opening_rooms_is_limited_per_user_and_joining_existing_ones_is_not() {
    let node = TestNode::start(NodeOpts {
        new_rooms_per_hour: 5,
        ..NodeOpts::default()
    })
    .await;
    // Bob opens a room and leaves a message in it.
    let (mut b, _, _) = node.user("bob").await;
    b.join("existing").await;
    b.send_acked("existing", "hello", "b1").await;
    b.send_json(&json!({"op": "leave", "room": "existing"}))
        .await;

    let (mut a, _, token) = node.user("ann").await;
    for i in 0..5 {
        let v = try_join(&mut a, &format!("new-{i}")).await;
        assert_eq!(v["op"], "joined", "new room {i}: {v}");
    }
    let refused = try_join(&mut a, "new-5").await;
    assert_eq!(refused["op"], "error", "sixth new room: {refused}");
    assert_eq!(refused["code"], "rate_limited", "{refused}");

    // Joining a room that exists costs nothing more.
    let v = try_join(&mut a, "existing").await;
    assert_eq!(v["op"], "joined", "existing room: {v}");
    assert_eq!(v["last_seq"], 1, "{v}");
    a.send_msg("existing", "still allowed", "a1").await;

    // The refused room has no trace of ann.
    let e = a
        .expect_error(Message::Text(
            json!({"op": "send", "room": "new-5", "text": "x", "cid": "a2"}).to_string(),
        ))
        .await;
    assert_eq!(e["code"], "not_joined", "{e}");
    assert_eq!(listed_members(&node, "new-5").await, 0);
    assert_eq!(listed_members(&node, "new-4").await, 1);
    let (mut c, _, _) = node.user("cid").await;
    let joined = try_join(&mut c, "new-1").await;
    assert_eq!(joined["members"].as_array().unwrap().len(), 2, "{joined}");

    // A REST post that would open a room is refused the same way, and
    // stores nothing; one into an existing room goes through.
    let resp = post(&node, &token, "new-6", "p1").await;
    assert_eq!(resp.status().as_u16(), 429);
    // The hour's bucket of 5 refills one room per 12 minutes.
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=720).contains(&wait), "Retry-After {wait}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let (_, page) = node.get_json("/api/v1/rooms/new-6/messages").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 0, "{page}");
    assert_eq!(post(&node, &token, "existing", "p2").await.status(), 201);
}

#[tokio::test]
async fn opening_a_room_costs_tokens_of_the_users_bucket() {
    // 25 tokens: two rooms at 1 + 10 each, then 3 left, short of a third.
    let node = TestNode::start(NodeOpts {
        user_rate_per_sec: 0.01,
        user_rate_burst: 25,
        room_create_cost: 10,
        ..NodeOpts::default()
    })
    .await;
    let (mut b, _, _) = node.user("bob").await;
    b.join("busy").await;
    b.send_acked("busy", "hello", "b1").await;

    let (mut a, _, _) = node.user("ann").await;
    for room in ["open-1", "open-2"] {
        let v = try_join(&mut a, room).await;
        assert_eq!(v["op"], "joined", "{room}: {v}");
    }
    let v = try_join(&mut a, "open-3").await;
    assert_eq!(v["code"], "rate_limited", "third new room: {v}");
    // An existing room is free to join, and the bucket still has tokens.
    let v = try_join(&mut a, "busy").await;
    assert_eq!(v["op"], "joined", "{v}");
    a.send_acked("busy", "after the refusal", "a1").await;
}

// ---------------------------------------------------------------- node rooms

async fn node_rooms(opts: &ClusterOpts, node_id: &str) -> Vec<String> {
    let mut conn = opts.redis().await;
    let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
        .arg(scalable_chat::store::keys::node_rooms(node_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    rooms.sort();
    rooms
}

/// Waits (at most 10 s) until the node's room set is `want`, then checks
/// that it stays so.
async fn expect_node_rooms(opts: &ClusterOpts, node_id: &str, want: &[&String]) {
    let mut want: Vec<String> = want.iter().map(|r| r.to_string()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = node_rooms(opts, node_id).await;
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node rooms {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node_rooms(opts, node_id).await, want, "and it stays so");
}

#[tokio::test]
async fn a_nodes_room_set_shrinks_when_its_last_local_member_leaves() {
    let opts = ClusterOpts::isolated();
    opts.services.require().await;
    let tag = unique_tag();
    let node_id = format!("rooms-{tag}");
    let node = TestNode::start_cluster(&node_id, &opts).await;
    let rooms: Vec<String> = (0..3).map(|i| format!("nr-{tag}-{i}")).collect();

    let (token, _) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    let (mut b, _, _) = node.user("bob").await;
    for room in &rooms {
        a.join(room).await;
    }
    b.join(&rooms[0]).await;
    expect_node_rooms(&opts, &node_id, &rooms.iter().collect::<Vec<_>>()).await;

    // Room 0 keeps bob; room 1 is left by its only member; ann leaves
    // room 2 and comes back many times, the last time to leave.
    for room in &rooms[..2] {
        a.send_json(&json!({"op": "leave", "room": room})).await;
    }
    for _ in 0..20 {
        a.send_json(&json!({"op": "leave", "room": &rooms[2]}))
            .await;
        a.join(&rooms[2]).await;
    }
    expect_node_rooms(&opts, &node_id, &[&rooms[0], &rooms[2]]).await;
    a.send_json(&json!({"op": "leave", "room": &rooms[2]}))
        .await;
    expect_node_rooms(&opts, &node_id, &[&rooms[0]]).await;

    // Bob disconnects: nothing is left.
    b.close().await;
    expect_node_rooms(&opts, &node_id, &[]).await;
    a.close().await;

    drop(node);
    let mut conn = opts.redis().await;
    let _ = forget_in_redis(&mut conn, &rooms, [node_id.as_str()]).await;
}

// ---------------------------------------------------------------- replays

/// Fills `room` with `n` messages of about 200 characters.
async fn fill(writer: &mut TestClient, room: &str, n: usize) {
    writer.join(room).await;
    let text = "x".repeat(200);
    for i in 0..n {
        let cid = format!("{room}-{i}");
        writer
            .send_json(&json!({"op": "send", "room": room, "text": text, "cid": cid}))
            .await;
    }
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acks < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = writer
            .try_recv_json(left)
            .await
            .unwrap_or_else(|| panic!("{acks} of {n} acks in {room}"));
        match v["op"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => panic!("send refused while filling {room}: {v}"),
            _ => {}
        }
    }
    writer
        .send_json(&json!({"op": "leave", "room": room}))
        .await;
}

/// The `msg` and `joined` frames of a client, as (room, seq) for `msg` and
/// (room, None) for `joined`, until `joins` `joined` frames came.
async fn read_replays(
    c: &mut TestClient,
    joins: usize,
    mut each: impl FnMut(),
) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    let mut joined = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while joined < joins {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = c
            .try_recv_json(left)
            .await
            .unwrap_or_else(|| panic!("{joined} of {joins} joined within 120 s"));
        each();
        let room = v["room"].as_str().unwrap_or_default().to_string();
        match v["op"].as_str() {
            Some("msg") => out.push((room, Some(v["seq"].as_u64().unwrap()))),
            Some("joined") => {
                joined += 1;
                out.push((room, None));
            }
            Some("error") => panic!("join refused: {v}"),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn a_second_join_since_waits_for_the_first_replay() {
    let node = TestNode::start_default().await;
    let room = "replayed-twice";
    let (mut w, _, _) = node.user("writer").await;
    fill(&mut w, room, 1600).await;

    let (mut r, _, _) = node.user("reader").await;
    r.send_json(&json!({"op": "join", "room": room, "since": 0}))
        .await;
    r.send_json(&json!({"op": "join", "room": room, "since": 800}))
        .await;
    let frames = read_replays(&mut r, 2, || {}).await;

    let mut expected: Vec<(String, Option<u64>)> = Vec::new();
    expected.extend((1..=1600).map(|s| (room.to_string(), Some(s))));
    expected.push((room.to_string(), None));
    expected.extend((801..=1600).map(|s| (room.to_string(), Some(s))));
    expected.push((room.to_string(), None));
    if frames != expected {
        let first_joined = frames.iter().position(|(_, s)| s.is_none());
        let backwards = frames
            .windows(2)
            .filter(|w| matches!((w[0].1, w[1].1), (Some(a), Some(b)) if b <= a))
            .count();
        panic!(
            "{} frames; first joined at {first_joined:?} (want 1600); {backwards} steps back in seq",
            frames.len()
        );
    }
}

#[tokio::test]
async fn replays_of_many_rooms_come_one_after_another_in_bounded_memory() {
    let node = TestNode::start_default().await;
    let pid = node.pid();
    let rooms: Vec<String> = (0..20).map(|i| format!("many-{i:02}")).collect();
    let (mut w, _, _) = node.user("writer").await;
    for room in &rooms {
        fill(&mut w, room, 500).await;
    }
    // One replay of a room first, so that the allocator has its working set.
    let (mut warm, _, _) = node.user("warm").await;
    let (msgs, _) = warm.join_since(&rooms[0], 0).await;
    assert_eq!(msgs.len(), 500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);

    let (mut r, _, _) = node.user("reader").await;
    for room in &rooms {
        r.send_json(&json!({"op": "join", "room": room, "since": 0}))
            .await;
    }
    let mut peak = before;
    let mut read = 0;
    let frames = read_replays(&mut r, rooms.len(), || {
        read += 1;
        if read % 100 == 0 {
            peak = peak.max(rss_bytes(pid));
        }
    })
    .await;
    peak = peak.max(rss_bytes(pid));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "RSS before {:.1} MiB, peak {:.1} MiB while 20 rooms x 500 messages replayed",
        mib(before),
        mib(peak)
    );

    // Room after room, in the order joined: 1..500, then `joined`.
    let mut expected = Vec::new();
    for room in &rooms {
        expected.extend((1..=500).map(|s| (room.clone(), Some(s))));
        expected.push((room.clone(), None));
    }
    if frames != expected {
        let switches = frames.windows(2).filter(|w| w[0].0 != w[1].0).count();
        panic!(
            "{} frames, the room changes {switches} times (want 19)",
            frames.len()
        );
    }
}
