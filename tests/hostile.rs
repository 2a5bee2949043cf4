//! Hostile clients: the cap on connections per client address, the per-user
//! rate limit across connections and over REST, tokens kept out of the log,
//! a fragmented oversize message against the node's memory, and control
//! characters over REST.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

async fn assert_http_error(resp: reqwest::Response, status: u16, code: &str, what: &str) {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: error body is not JSON: {text:?}"));
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

/// Sends a frame that must be refused and returns the `error` about it
/// (frames about other messages may come first, but no `ack` for it).
async fn refused(c: &mut TestClient, frame: Value, reference: &str) -> Value {
    c.send_json(&frame).await;
    let (e, _) = c
        .recv_until_pred(|v| {
            assert!(
                !(v["op"] == "ack" && v["cid"] == reference),
                "refused frame acked: {v}"
            );
            v["op"] == "error" && v["ref"] == reference
        })
        .await;
    e
}

/// Opens a WebSocket to `node` from the local address `source` (any port).
async fn connect_from(node: &TestNode, source: &str, token: &str) -> TestClient {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{source}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    let server: SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let stream = tokio::time::timeout(RECV_TIMEOUT, socket.connect(server))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    let (ws, resp) = tokio::time::timeout(
        RECV_TIMEOUT,
        tokio_tungstenite::client_async(node.ws_url(token), MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("upgrade timed out")
    .unwrap_or_else(|e| panic!("upgrade from {source} refused: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    TestClient::welcomed(ws, RECV_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no welcome frame: {e:?}"))
}

async fn post(node: &TestNode, token: &str, room: &str, body: &Value) -> reqwest::Response {
    node.http()
        .post(node.url(&format!("/api/v1/rooms/{room}/messages")))
        .header("Authorization", format!("Bearer {token}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

// ---------------------------------------------------------------- per address

#[tokio::test]
async fn connections_per_address_are_capped_with_429() {
    let node = TestNode::start(NodeOpts {
        max_connections_per_address: 3,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(node.connect(&token).await);
    }
    let url = node.ws_url(&token);
    assert_eq!(
        node.try_upgrade(&url, None).await,
        429,
        "fourth from 127.0.0.1"
    );
    // The refusal comes before the upgrade, with the error body.
    let resp = node
        .http()
        .get(url.replacen("ws://", "http://", 1))
        .send()
        .await
        .unwrap();
    assert_http_error(resp, 429, "rate_limited", "fourth, plain GET").await;

    // Another address is not affected.
    let mut other = connect_from(&node, "127.0.0.2", &token).await;
    other.join("lobby").await;
    let mut second = connect_from(&node, "127.0.0.2", &token).await;
    second.ping(1).await;

    // The open ones still work; one that closes gives its place back.
    open[0].ping(2).await;
    open.pop().unwrap().close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match node.try_upgrade(&url, None).await {
            101 => break,
            429 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("after a close, a new connection got {other}"),
        }
    }
}

// ---------------------------------------------------------------- per user

#[tokio::test]
async fn user_rate_limit_spans_connections_and_rest() {
    let node = TestNode::start(NodeOpts {
        user_rate_per_sec: 0.01,
        user_rate_burst: 4,
        // The rooms here are opened free: this test counts the frames alone.
        room_create_cost: 0,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    let mut b = node.connect(&token).await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.send_acked("lobby", "one", "a1").await;
    a.send_acked("lobby", "two", "a2").await;
    b.send_acked("lobby", "three", "b1").await;
    b.send_acked("lobby", "four", "b2").await;

    // The user's bucket is empty on both connections, although each
    // connection's own bucket is nearly full.
    for (c, cid) in [(&mut a, "a3"), (&mut b, "b3")] {
        let frame = json!({"op":"send","room":"lobby","text":"five","cid":cid});
        let e = refused(c, frame, cid).await;
        assert_eq!(e["code"], "rate_limited", "{e}");
    }
    let e = refused(&mut a, json!({"op":"typing","room":"lobby"}), "typing").await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    let e = refused(&mut b, json!({"op":"history","room":"lobby"}), "history").await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    // `ping` costs nothing; joins are limited per connection only.
    a.ping(7).await;
    b.join("other").await;

    // The same bucket covers the user's REST posts.
    let resp = post(
        &node,
        &token,
        "lobby",
        &json!({"text": "rest", "cid": "r1"}),
    )
    .await;
    assert_http_error(resp, 429, "rate_limited", "REST post of a limited user").await;

    // Another user is not affected.
    let (mut c, _, _) = node.user("bob").await;
    c.join("lobby").await;
    c.send_acked("lobby", "mine", "c1").await;

    // Nothing refused was stored.
    let h = c.history("lobby", None, None).await;
    let cids: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cid"].as_str().unwrap())
        .collect();
    assert_eq!(cids, ["a1", "a2", "b1", "b2", "c1"], "{h}");
}

#[tokio::test]
async fn rest_posts_are_rate_limited_per_user_with_429() {
    let node = TestNode::start(NodeOpts {
        user_rate_per_sec: 0.01,
        user_rate_burst: 3,
        // The rooms here are opened free: this test counts the posts alone.
        room_create_cost: 0,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    for i in 0..3 {
        let resp = post(
            &node,
            &token,
            "lobby",
            &json!({"text": "hi", "cid": format!("p{i}")}),
        )
        .await;
        assert_eq!(resp.status(), 201, "post {i}");
    }
    let resp = post(&node, &token, "lobby", &json!({"text": "hi", "cid": "p3"})).await;
    // One token per 100 s: the answer says when to come back.
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((90..=100).contains(&wait), "Retry-After {wait}");
    assert_http_error(resp, 429, "rate_limited", "fourth post").await;
    // Someone else may still post.
    let (other, _) = node.guest("bob").await;
    let resp = post(&node, &other, "lobby", &json!({"text": "hi", "cid": "q0"})).await;
    assert_eq!(resp.status(), 201);
    let (status, page) = node.get_json("/api/v1/rooms/lobby/messages").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 4, "{page}");
}

// ---------------------------------------------------------------- tokens

#[tokio::test]
async fn tokens_and_the_secret_never_reach_the_log() {
    let node = TestNode::start(NodeOpts {
        // Everything the node and its libraries log, debug and trace included.
        env: vec![("RUST_LOG".into(), "trace".into())],
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    a.join("lobby").await;
    a.send_acked("lobby", "hello", "t1").await;
    let resp = node
        .http()
        .get(node.url("/api/v1/me"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = post(
        &node,
        &token,
        "lobby",
        &json!({"text": "rest", "cid": "t2"}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    // Refused tokens: forged, and with a bad WebSocket handshake.
    let (payload, sig) = token.split_once('.').unwrap();
    let forged = format!("{payload}.{}", sig.chars().rev().collect::<String>());
    assert_eq!(node.try_upgrade(&node.ws_url(&forged), None).await, 401);
    let resp = node
        .http()
        .get(node.ws_url(&token).replacen("ws://", "http://", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "GET /ws without the upgrade headers");
    // A session that ends in an error, then one that closes.
    a.send_text("not json").await;
    a.recv_until("error").await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut log = String::new();
    for entry in std::fs::read_dir(node.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            log.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    assert!(
        log.lines().any(|l| l.contains("DEBUG")) && log.contains("opened for user"),
        "the node did not log at debug level:\n{log}"
    );
    let forged_sig = forged.split_once('.').unwrap().1.to_string();
    for (what, secret) in [
        ("token", token.as_str()),
        ("token payload", payload),
        ("token signature", sig),
        ("forged signature", forged_sig.as_str()),
        ("auth.secret", SECRET),
    ] {
        // Any 16 characters of it would be a leak, not only all of it.
        let probe = &secret[secret.len() - 16..];
        assert!(
            !log.contains(probe),
            "the {what} appears in the node's log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------- memory

/// A 2 MiB `send` in 1 KiB continuation frames.
fn fragmented_2mib() -> Vec<Message> {
    let total = 2 * 1024 * 1024;
    let chunk = 1024;
    let mut payload = br#"{"op":"send","room":"lobby","cid":"frag","text":""#.to_vec();
    payload.resize(total - 2, b'y');
    payload.extend_from_slice(br#""}"#);
    let n = payload.len().div_ceil(chunk);
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            Message::Frame(Frame::message(part.to_vec(), opcode, i + 1 == n))
        })
        .collect()
}

/// Writes the frames while reading; returns the close code the node sent.
async fn send_fragments(client: TestClient, frames: Vec<Message>) -> Option<u16> {
    let (mut sink, mut stream) = client.ws.split();
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    });
    for f in frames {
        // The node stops reading once it has refused the message.
        if sink.send(f).await.is_err() {
            break;
        }
    }
    let code = reader.await.unwrap();
    let _ = sink.close().await;
    code
}

#[tokio::test]
async fn fragmented_2_mib_messages_are_refused_with_1009_in_bounded_memory() {
    let node = TestNode::start_default().await;
    let pid = node.pid();
    let (token, _) = node.guest("ann").await;
    let (mut b, _, _) = node.user("bob").await;
    b.join("lobby").await;

    // One round first, so that the allocator has its working set.
    let mut a = node.connect(&token).await;
    a.join("lobby").await;
    assert_eq!(send_fragments(a, fragmented_2mib()).await, Some(1009));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);

    // Ten at once: 20 MiB offered.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut c = node.connect(&token).await;
        c.join("lobby").await;
        tasks.push(tokio::spawn(send_fragments(c, fragmented_2mib())));
    }
    let mut peak = before;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Some(1009));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_bytes(pid);
    peak = peak.max(after);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB (10 x 2 MiB offered)",
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(
        peak.saturating_sub(before) < 10 * 1024 * 1024,
        "RSS grew from {:.1} MiB to a peak of {:.1} MiB",
        mib(before),
        mib(peak)
    );

    // Nothing of it was stored or delivered, and the room goes on.
    let h = b.history("lobby", None, None).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 0, "{h}");
    b.send_acked("lobby", "still here", "b1").await;
}

// ---------------------------------------------------------------- control characters

#[tokio::test]
async fn control_characters_are_refused_in_cids_and_over_rest() {
    let node = TestNode::start_default().await;
    let (mut a, _, token) = node.user("ann").await;
    a.join("lobby").await;
    // Over WebSocket, in a cid (the text cases are in tests/protocol.rs):
    // refused, and the ref is the op since the cid is unusable.
    for cid in ["k\u{0}", "k\n", "\u{1b}k", "k\u{7f}", "k\u{9b}"] {
        let e = a
            .expect_error(Message::Text(
                json!({"op": "send", "room": "lobby", "text": "ok", "cid": cid}).to_string(),
            ))
            .await;
        assert_eq!(e["code"], "bad_request", "cid {cid:?}: {e}");
        assert_eq!(e["ref"], "send", "cid {cid:?}: {e}");
    }
    for (what, body) in [
        ("NUL in text", json!({"text": "a\u{0}b", "cid": "k1"})),
        ("ESC in text", json!({"text": "\u{1b}[2J", "cid": "k2"})),
        ("CR in text", json!({"text": "a\rb", "cid": "k3"})),
        ("DEL in text", json!({"text": "a\u{7f}", "cid": "k4"})),
        ("C1 in text", json!({"text": "a\u{85}b", "cid": "k5"})),
        ("NUL in cid", json!({"text": "ok", "cid": "k\u{0}"})),
        ("newline in cid", json!({"text": "ok", "cid": "k\n6"})),
    ] {
        let resp = post(&node, &token, "lobby", &body).await;
        assert_http_error(resp, 400, "bad_request", what).await;
    }
    for room in ["lob%00by", "lobby%0A", "%1B", "lobby%7F"] {
        let resp = post(&node, &token, room, &json!({"text": "ok", "cid": "k7"})).await;
        assert_http_error(resp, 400, "bad_request", room).await;
    }
    for name in ["ann\u{0}", "a\tb", "\u{1b}x"] {
        let resp = node
            .http()
            .post(node.url("/api/v1/auth/guest"))
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_http_error(resp, 400, "bad_request", &format!("name {name:?}")).await;
    }
    let (status, page) = node.get_json("/api/v1/rooms/lobby/messages").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 0, "{page}");
}

// ---------------------------------------------------------------- injection

#[tokio::test]
async fn room_names_that_could_shape_a_key_or_a_query_are_refused() {
    let node = TestNode::start_default().await;
    let (mut a, _, token) = node.user("ann").await;
    // Redis key syntax (hash tags, separators, globs), MongoDB operators,
    // paths, case, spaces, and too long.
    let long = "a".repeat(65);
    let names = [
        "{lobby}",
        "lobby}:seq",
        "chat:rooms",
        "lob*",
        "lobby?",
        "[ab]",
        "$gt",
        "a.b",
        "Lobby",
        "a b",
        "é",
        long.as_str(),
    ];
    for room in names {
        let e = a
            .expect_error(Message::Text(
                json!({"op": "join", "room": room}).to_string(),
            ))
            .await;
        assert_eq!(e["code"], "bad_request", "join {room:?}: {e}");
        let e = a
            .expect_error(Message::Text(
                json!({"op": "send", "room": room, "text": "x", "cid": "c"}).to_string(),
            ))
            .await;
        assert_eq!(e["code"], "bad_request", "send {room:?}: {e}");
        let path: String = room
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let resp = node
            .http()
            .get(node.url(&format!("/api/v1/rooms/{path}/messages")))
            .send()
            .await
            .unwrap();
        assert_http_error(resp, 400, "bad_request", &format!("GET {room:?}")).await;
        let resp = post(&node, &token, &path, &json!({"text": "x", "cid": "c"})).await;
        assert_http_error(resp, 400, "bad_request", &format!("POST {room:?}")).await;
    }
    // A JSON object where a room name belongs is not a query either.
    let e = a
        .expect_error(Message::Text(
            json!({"op": "join", "room": {"$ne": ""}}).to_string(),
        ))
        .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    let rooms: Value = node
        .http()
        .get(node.url("/api/v1/rooms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rooms["rooms"], json!([]), "{rooms}");
}
