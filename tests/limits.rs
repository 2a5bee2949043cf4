//! Limits and refusals: frame size, authentication, Origin, heartbeat, slow
//! readers, and start-up with a bad config.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// What a connection saw after sending something that should close it.
struct Outcome {
    close_code: Option<u16>,
    close_reason: String,
    frames: Vec<Value>,
    ended_by: String,
}

/// Writes `frames` while reading concurrently (so the close frame is read
/// as soon as it arrives), and returns how the connection ended.
async fn send_and_watch(client: TestClient, frames: Vec<Message>) -> Outcome {
    let (mut sink, mut stream) = client.ws.split();
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    return Outcome {
                        close_code: None,
                        close_reason: String::new(),
                        frames,
                        ended_by: "timeout: still open after 20 s".into(),
                    }
                }
                Ok(None) => {
                    return Outcome {
                        close_code: None,
                        close_reason: String::new(),
                        frames,
                        ended_by: "stream ended without a close frame".into(),
                    }
                }
                Ok(Some(Err(e))) => {
                    return Outcome {
                        close_code: None,
                        close_reason: String::new(),
                        frames,
                        ended_by: format!("error: {e}"),
                    }
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Outcome {
                        close_code: f.as_ref().map(|f| u16::from(f.code)),
                        close_reason: f.map(|f| f.reason.into_owned()).unwrap_or_default(),
                        frames,
                        ended_by: "close frame".into(),
                    }
                }
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Ok(v) = serde_json::from_str(&t) {
                        frames.push(v);
                    }
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    });
    for f in frames {
        if sink.feed(f).await.is_err() {
            break;
        }
    }
    let _ = sink.flush().await;
    let outcome = reader.await.unwrap();
    drop(sink);
    outcome
}

fn assert_closed_1009(o: &Outcome, what: &str) {
    assert_eq!(
        o.close_code,
        Some(1009),
        "{what}: expected close 1009, connection ended by {} (reason {:?}, frames {:?})",
        o.ended_by,
        o.close_reason,
        summarize(&o.frames)
    );
    for v in &o.frames {
        assert!(
            v["op"] != "ack" && v["op"] != "msg",
            "{what}: oversize content went through: {v}"
        );
        if v["op"] == "error" {
            assert_eq!(v["code"], "too_large", "{what}: {v}");
        }
    }
}

/// The other client is still served: ping works, and it sends and receives.
async fn assert_still_served(node: &TestNode, b: &mut TestClient, room: &str, tag: &str) {
    b.ping(42).await;
    let (mut c, _, _) = node.user(&format!("late{tag}")).await;
    c.join(room).await;
    let (ack, _) = c
        .send_msg(room, "still here?", &format!("late-{tag}"))
        .await;
    let (m, skipped) = b.recv_until_collect("msg").await;
    assert_eq!(m["id"], ack["id"]);
    assert!(
        skipped.iter().all(|v| v["op"] != "msg"),
        "oversize content delivered: {skipped:?}"
    );
}

#[tokio::test]
async fn oversize_frame_is_refused_with_1009_and_others_keep_going() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("lobby").await;
    b.join("lobby").await;
    b.ping(0).await;

    // Just under the limit is an ordinary frame.
    let t = "p".repeat(60_000);
    a.send_json(&json!({"op": "ping", "t": t})).await;
    let pong = a.recv_until("pong").await;
    assert_eq!(pong["t"].as_str().map(str::len), Some(60_000));

    let big = json!({"op":"send","room":"lobby","cid":"big","text":"x".repeat(70_000)}).to_string();
    assert!(big.len() > 65_536);
    let outcome = send_and_watch(a, vec![Message::Text(big)]).await;
    assert_closed_1009(&outcome, "70 kB text frame");
    assert_still_served(&node, &mut b, "lobby", "1").await;
    let h = b.history("lobby", None, None).await;
    assert!(
        h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["cid"] != "big"),
        "{h}"
    );

    // A binary frame over the limit too.
    let (d, _, _) = node.user("dan").await;
    let outcome = send_and_watch(d, vec![Message::Binary(vec![b'x'; 100_000])]).await;
    assert_closed_1009(&outcome, "100 kB binary frame");
    assert_still_served(&node, &mut b, "lobby", "2").await;
}

#[tokio::test]
async fn oversize_message_in_continuation_frames_is_refused_with_1009() {
    let node = TestNode::start_default().await;
    let (mut a, _, _) = node.user("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    a.join("lobby").await;
    b.join("lobby").await;
    b.ping(0).await;

    // 2 MiB in 1 KiB fragments: every frame is small, the message is not.
    let total = 2 * 1024 * 1024;
    let chunk = 1024;
    let mut frames = Vec::with_capacity(total / chunk);
    let mut payload = br#"{"op":"send","room":"lobby","cid":"frag","text":""#.to_vec();
    payload.resize(total - 2, b'y');
    payload.extend_from_slice(br#""}"#);
    let n = payload.len().div_ceil(chunk);
    for (i, part) in payload.chunks(chunk).enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        frames.push(Message::Frame(Frame::message(
            part.to_vec(),
            opcode,
            i + 1 == n,
        )));
    }
    let outcome = send_and_watch(a, frames).await;
    assert_closed_1009(&outcome, "2 MiB in continuation frames");
    assert_still_served(&node, &mut b, "lobby", "1").await;
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn websocket_refuses_missing_bad_and_forged_tokens_with_401() {
    let node = TestNode::start_default().await;
    let (token, _) = node.guest("ann").await;
    assert_eq!(node.try_upgrade(&node.ws_url(&token), None).await, 101);

    let base = format!("ws://127.0.0.1:{}/ws", node.port);
    assert_eq!(node.try_upgrade(&base, None).await, 401, "no token");
    assert_eq!(
        node.try_upgrade(&format!("{base}?token="), None).await,
        401,
        "empty token"
    );
    assert_eq!(
        node.try_upgrade(&node.ws_url("garbage"), None).await,
        401,
        "garbage token"
    );

    // Tampered tokens: one character changed, at several places.
    let chars: Vec<char> = token.chars().collect();
    for pos in [chars.len() / 3, chars.len() / 2, chars.len() - 5] {
        let mut forged = chars.clone();
        forged[pos] = if forged[pos] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        assert_eq!(
            node.try_upgrade(&node.ws_url(&forged), None).await,
            401,
            "token changed at {pos}"
        );
    }
    let truncated = &token[..token.len() - 4];
    assert_eq!(
        node.try_upgrade(&node.ws_url(truncated), None).await,
        401,
        "truncated token"
    );

    // Signed with another secret.
    let other = TestNode::start(NodeOpts {
        node_id: "test-other".into(),
        secret: "a-completely-different-secret-of-40-bytes!".into(),
        ..NodeOpts::default()
    })
    .await;
    let (foreign, _) = other.guest("mallory").await;
    assert_eq!(
        node.try_upgrade(&node.ws_url(&foreign), None).await,
        401,
        "token of another secret"
    );
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", format!("Bearer {foreign}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Another node with the same secret accepts this node's token.
    let sibling = TestNode::start(NodeOpts {
        node_id: "test-2".into(),
        ..NodeOpts::default()
    })
    .await;
    let (token2, user2) = node.guest("carol").await;
    let c = sibling.connect(&token2).await;
    assert_eq!(c.welcome["node"], "test-2");
    assert_eq!(c.welcome["user"]["id"], user2["id"]);
}

#[tokio::test]
async fn expired_token_is_refused_with_401() {
    let node = TestNode::start(NodeOpts {
        token_ttl_secs: 1,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(node.try_upgrade(&node.ws_url(&token), None).await, 401);
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = node
        .http()
        .post(node.url("/api/v1/rooms/lobby/messages"))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"text": "late", "cid": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A fresh token works.
    let (fresh, _) = node.guest("ann").await;
    assert_eq!(node.try_upgrade(&node.ws_url(&fresh), None).await, 101);
}

#[tokio::test]
async fn origin_outside_the_allow_list_is_refused_with_403() {
    let node = TestNode::start_default().await;
    let (token, _) = node.guest("ann").await;
    let url = node.ws_url(&token);
    assert_eq!(node.try_upgrade(&url, None).await, 101, "no Origin");
    assert_eq!(
        node.try_upgrade(&url, Some(&node.origin())).await,
        101,
        "allowed Origin"
    );
    let other_port = format!("http://127.0.0.1:{}", node.port.wrapping_add(1));
    let localhost = format!("http://localhost:{}", node.port);
    let https = format!("https://127.0.0.1:{}", node.port);
    for origin in [
        "http://evil.example",
        other_port.as_str(),
        localhost.as_str(),
        https.as_str(),
        "null",
    ] {
        assert_eq!(
            node.try_upgrade(&url, Some(origin)).await,
            403,
            "Origin {origin}"
        );
    }
}

// ---------------------------------------------------------------- heartbeat

#[tokio::test]
async fn silent_client_is_closed_and_live_ones_are_kept() {
    let node = TestNode::start(NodeOpts {
        heartbeat_interval_secs: 1,
        client_timeout_secs: 3,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    // Never reads again, so never answers a ping, and never sends.
    let mut silent = node.connect(&token).await;
    // Reads (so answers pings automatically) but sends nothing itself.
    let mut reader = node.connect(&token).await;
    // Never reads, but sends a `ping` op every second.
    let mut talker = node.connect(&token).await;
    assert!(
        node.wait_metric("scalable_chat_connections", 3.0, Duration::from_secs(2))
            .await,
        "connections gauge with three clients"
    );

    let start = Instant::now();
    let mut next_talk = start;
    let mut silent_gone_after = None;
    while start.elapsed() < Duration::from_secs(8) {
        if Instant::now() >= next_talk {
            talker.send_json(&json!({"op": "ping", "t": 1})).await;
            next_talk += Duration::from_secs(1);
        }
        match reader.next_event(Duration::from_millis(200)).await {
            WsEvent::Timeout => {}
            other => panic!("reading client got {other:?}"),
        }
        if silent_gone_after.is_none()
            && node.metric("scalable_chat_connections", &[]).await == Some(2.0)
        {
            silent_gone_after = Some(start.elapsed());
        }
    }
    let gone = silent_gone_after.expect("silent client still connected after 8 s");
    assert!(
        gone >= Duration::from_secs(2),
        "silent client closed after {gone:?}, before the 3 s timeout"
    );
    assert!(
        reader.pings_seen >= 4,
        "server pings: {}",
        reader.pings_seen
    );
    assert_eq!(
        node.metric("scalable_chat_connections", &[]).await,
        Some(2.0)
    );

    // The silent one finds its connection ended.
    match silent.next_event(Duration::from_secs(5)).await {
        WsEvent::Closed(_) | WsEvent::Error(_) => {}
        other => panic!("silent client after the timeout: {other:?}"),
    }
    // The others are fine.
    reader.ping(5).await;
    let skipped = talker.ping(6).await;
    assert!(skipped.iter().all(|v| v["op"] == "pong"), "{skipped:?}");
}

// ---------------------------------------------------------------- slow reader

/// Sends 3.9 kB messages into `room` from `fast`, 50 at a time, keeping up
/// with its own echoes, until the node counts one connection left (the
/// other member was cut off); fails after `max` messages.
async fn flood_until_cut_off(node: &TestNode, fast: &mut TestClient, room: &str, max: usize) {
    let text = "z".repeat(3900);
    let mut sent = 0;
    while node.metric("scalable_chat_connections", &[]).await != Some(1.0) {
        assert!(
            sent < max,
            "slow reader still connected after {sent} messages of 3.9 kB"
        );
        for _ in 0..50 {
            fast.send_json(&json!({"op":"send","room":room,"text":text,"cid":format!("f{sent}")}))
                .await;
            sent += 1;
        }
        let last = format!("f{}", sent - 1);
        fast.recv_until_pred(|v| {
            assert_ne!(v["op"], "error", "fast sender refused: {v}");
            v["op"] == "msg" && v["cid"] == last
        })
        .await;
    }
}

#[tokio::test]
async fn slow_reader_is_closed_with_1008_and_the_room_goes_on() {
    let node = TestNode::start(NodeOpts {
        outbound_soft_bytes: 65_536,
        outbound_hard_bytes: 262_144,
        ..NodeOpts::default()
    })
    .await;
    let (mut slow, _, _) = node.user("slow").await;
    let (mut fast, _, _) = node.user("fast").await;
    slow.join("flood").await;
    fast.join("flood").await;
    fast.ping(0).await;

    flood_until_cut_off(&node, &mut fast, "flood", 4000).await;

    // The slow reader drains what was in flight, then finds the close frame.
    eprintln!(
        "DIAG gauge dropped, reading starts at {:?}",
        std::time::SystemTime::now()
    );
    let (frame, frames) = slow.wait_close(Duration::from_secs(30)).await;
    let frame = frame.expect("closed without a close frame");
    assert_eq!(u16::from(frame.code), 1008, "close {frame:?}");
    assert!(
        frame.reason.to_lowercase().contains("slow"),
        "close reason should mention the slow reader: {:?}",
        frame.reason
    );
    let s: Vec<u64> = frames
        .iter()
        .filter(|v| v["op"] == "msg")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_strictly_increasing(&s, "slow reader before its close");

    // The room goes on for the others.
    let (ack, _) = fast.send_msg("flood", "after", "after").await;
    assert!(ack["seq"].is_u64());
}

/// The state (hex, as in /proc/net/tcp) of the node's side of the TCP
/// connection from client port `client`, if the kernel still has it.
#[cfg(target_os = "linux")]
fn server_side_state(node_port: u16, client: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{node_port:04X}");
    let remote = format!(":{client:04X}");
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 3 && cols[1].ends_with(&local) && cols[2].ends_with(&remote))
            .then(|| cols[3].to_string())
    })
}

/// A client that takes no bytes at all parks its session behind the full
/// socket; the node still lets go of it (TCP_USER_TIMEOUT), so it holds no
/// memory or file for good.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn client_that_never_reads_is_dropped_by_the_node() {
    const ESTABLISHED: &str = "01";
    let node = TestNode::start(NodeOpts {
        outbound_soft_bytes: 65_536,
        outbound_hard_bytes: 262_144,
        ..NodeOpts::default()
    })
    .await;
    let (mut mute, _, _) = node.user("mute").await;
    let (mut fast, _, _) = node.user("loud").await;
    mute.join("flood").await;
    fast.join("flood").await;
    let mute_port = match mute.ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap().port(),
        _ => unreachable!("plain connections only"),
    };
    assert_eq!(
        server_side_state(node.port, mute_port).as_deref(),
        Some(ESTABLISHED)
    );

    flood_until_cut_off(&node, &mut fast, "flood", 6000).await;

    // Cut off, and still never reading: the node's end of the connection
    // goes away on its own.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = server_side_state(node.port, mute_port);
        if state.as_deref() != Some(ESTABLISHED) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node still holds the connection of a client that never reads"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The others go on.
    let (ack, _) = fast.send_msg("flood", "still here", "after").await;
    assert!(ack["seq"].is_u64());
    drop(mute);
}

// ---------------------------------------------------------------- config

#[tokio::test]
async fn unknown_config_key_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = minimal_config(dir.path(), free_port());

    let err = start_expect_failure(&format!("{base}\n[limits]\nbogus_key = 1\n"), &[]).await;
    assert!(err.contains("bogus_key"), "stderr: {err}");

    let err = start_expect_failure(&format!("{base}\n[bogus_section]\nx = 1\n"), &[]).await;
    assert!(err.contains("bogus_section"), "stderr: {err}");

    let with_node_key = base.replace("[node]\n", "[node]\nflavour = \"x\"\n");
    let err = start_expect_failure(&with_node_key, &[]).await;
    assert!(err.contains("flavour"), "stderr: {err}");

    let err = start_expect_failure(&base, &[("SCALABLE_CHAT__LIMITS__NOPE", "1")]).await;
    assert!(err.to_lowercase().contains("nope"), "stderr: {err}");
}

#[tokio::test]
async fn malformed_config_value_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = minimal_config(dir.path(), port);

    let bad_bind = base.replace(&format!("bind = \"127.0.0.1:{port}\""), "bind = 5");
    assert_ne!(bad_bind, base);
    let err = start_expect_failure(&bad_bind, &[]).await;
    assert!(err.contains("http.bind"), "stderr: {err}");

    let err = start_expect_failure(
        &format!("{base}\n[limits]\nmax_text_chars = \"lots\"\n"),
        &[],
    )
    .await;
    assert!(err.contains("limits.max_text_chars"), "stderr: {err}");

    let err =
        start_expect_failure(&base, &[("SCALABLE_CHAT__LIMITS__MAX_TEXT_CHARS", "abc")]).await;
    assert!(err.contains("limits.max_text_chars"), "stderr: {err}");

    let err = start_expect_failure(&base, &[("SCALABLE_CHAT__HTTP__BIND", "5")]).await;
    assert!(err.contains("http.bind"), "stderr: {err}");

    let err = start_expect_failure(&format!("{base}\n[limits]\nrate_per_sec = [1]\n"), &[]).await;
    assert!(err.contains("limits.rate_per_sec"), "stderr: {err}");
}

#[tokio::test]
async fn half_configured_cluster_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let base = minimal_config(dir.path(), free_port());
    let config = format!(
        "{base}\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\n[kafka]\nbrokers = \"127.0.0.1:1\"\ntopic = \"chat.messages\"\n"
    );
    let err = start_expect_failure(&config, &[]).await;
    assert!(err.to_lowercase().contains("mongo"), "stderr: {err}");
}

#[tokio::test]
async fn environment_overrides_config_keys() {
    let node = TestNode::start(NodeOpts {
        env: vec![
            ("SCALABLE_CHAT__LIMITS__MAX_TEXT_CHARS".into(), "10".into()),
            ("SCALABLE_CHAT__NODE__ID".into(), "env-node".into()),
        ],
        ..NodeOpts::default()
    })
    .await;
    let (mut a, _, _) = node.user("ann").await;
    assert_eq!(a.welcome["node"], "env-node");
    a.join("lobby").await;
    a.send_msg("lobby", "0123456789", "ten").await;
    let e = a
        .expect_error(Message::Text(
            json!({"op":"send","room":"lobby","text":"0123456789a","cid":"eleven"}).to_string(),
        ))
        .await;
    assert_eq!(e["code"], "too_large", "{e}");
    assert_eq!(e["ref"], "eleven", "{e}");
}
