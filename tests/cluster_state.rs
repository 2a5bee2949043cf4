//! What cluster mode keeps of a room in Redis, and for how long: a room
//! idle for `redis.room_idle_ttl_secs` leaves Redis entirely and comes
//! back from what is durable without a gap or a repeated seq, while a room
//! in use keeps its keys; a repeated cid with another text is answered with
//! the stored message, never a second text under the first's id (in
//! standalone mode too).
//!
//! The cluster tests need the services on 127.0.0.1 (`scripts/services
//! up`), on either topology. Each test has its own topic, consumer group,
//! MongoDB database, node ids and rooms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, Document};
use scalable_chat::store::keys;
use scalable_chat::store::scripts::text_digest;
use serde_json::{json, Value};

/// How long the persist workers may take to store what was acked.
const STORE_WITHIN: Duration = Duration::from_secs(30);

/// The cid lifetime of the nodes: the default, 7 days.
const CID_TTL_SECS: u64 = 7 * 24 * 3600;

// ---------------------------------------------------------------- harness

/// A test's cluster node on its own topic, consumer group and database.
struct Node {
    opts: ClusterOpts,
    node: TestNode,
    room: String,
}

impl Node {
    /// Starts one node with both roles and `env` as setting overrides.
    async fn start(env: &[(&str, &str)]) -> Node {
        Services::local().require().await;
        let opts = ClusterOpts::isolated();
        let node = TestNode::start(NodeOpts {
            node_id: format!("s-{}", unique_tag()),
            cluster: Some(opts.clone()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..NodeOpts::default()
        })
        .await;
        let room = format!("state-{}", unique_tag());
        Node { opts, node, room }
    }

    /// Polls MongoDB until it holds at least `want` messages of the room;
    /// returns them (sorted by seq).
    async fn wait_stored(&self, want: usize) -> Vec<Document> {
        self.opts.wait_stored(&self.room, want, STORE_WITHIN).await
    }

    /// Every key of the room in Redis (`chat:{room}:*`), read with `SCAN`
    /// on every server of the topology.
    async fn room_keys(&self) -> BTreeSet<String> {
        let pattern = format!("chat:{{{}}}:*", self.room);
        let mut found = BTreeSet::new();
        for port in &self.opts.services.redis_ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut cursor = 0u64;
            loop {
                let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                found.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        found
    }

    /// Stops the node and removes what the test left in the services.
    /// Failures are only reported: the test itself has passed by then.
    async fn cleanup(mut self) {
        self.node.kill9();
        let nodes = [self.node.opts.node_id.as_str()];
        self.opts.remove_leftovers([&self.room], nodes).await;
    }
}

/// A post that must be answered 201; returns the message.
async fn posted(node: &TestNode, token: &str, room: &str, text: &str, cid: &str) -> Value {
    let (status, body) = node.post_message(token, room, text, cid).await;
    assert_eq!(status, 201, "post {cid}: {body}");
    body
}

/// The room's history over REST, newest 100 messages.
async fn history(node: &TestNode, token: &str, room: &str) -> Vec<Value> {
    let resp = node
        .http()
        .get(node.url(&format!("/api/v1/rooms/{room}/messages?limit=100")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    body["messages"].as_array().expect("messages").clone()
}

fn seq_of(m: &Value) -> u64 {
    m["seq"].as_u64().unwrap()
}

// ---------------------------------------------------------------- tests

/// A room idle for `redis.room_idle_ttl_secs` (3 s here, with cids
/// remembered 2 s) leaves no key in Redis; its next messages are seeded
/// from what is durable: they take seqs 6 and 7, and history holds 1 to 7
/// once each.
#[tokio::test]
async fn an_idle_room_leaves_redis_and_comes_back_without_a_gap() {
    let n = Node::start(&[
        ("SCALABLE_CHAT__REDIS__ROOM_IDLE_TTL_SECS", "3"),
        ("SCALABLE_CHAT__REDIS__CID_TTL_SECS", "2"),
    ])
    .await;
    let (node, room) = (&n.node, n.room.as_str());
    let (token, _) = node.guest("ida").await;
    for i in 1..=5u64 {
        let m = posted(node, &token, room, &format!("before {i}"), &format!("b{i}")).await;
        assert_eq!(seq_of(&m), i, "{m}");
    }
    n.wait_stored(5).await;

    let idle = Instant::now();
    let mut left = n.room_keys().await;
    while !left.is_empty() && idle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = n.room_keys().await;
    }
    assert!(
        left.is_empty(),
        "the room was idle {:?} with an idle time of 3 s, and Redis still holds {left:?}",
        idle.elapsed()
    );

    let six = posted(node, &token, room, "after 6", "a6").await;
    let seven = posted(node, &token, room, "after 7", "a7").await;
    assert_eq!((seq_of(&six), seq_of(&seven)), (6, 7), "{six} {seven}");
    let listed = history(node, &token, room).await;
    let seqs: Vec<u64> = listed.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>(), "{listed:?}");
    n.cleanup().await;
}

/// A room that gets a message every second never outlives its keys, with
/// an idle time of 3 s: its seq is there before every message.
#[tokio::test]
async fn a_room_in_use_keeps_its_keys() {
    let n = Node::start(&[("SCALABLE_CHAT__REDIS__ROOM_IDLE_TTL_SECS", "3")]).await;
    let (node, room) = (&n.node, n.room.as_str());
    let (token, _) = node.guest("ulla").await;
    let mut redis = n.opts.redis().await;
    posted(node, &token, room, "first", "u0").await;
    let mut last = Instant::now();
    for i in 1..=8u64 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seeded: bool = redis::cmd("EXISTS")
            .arg(keys::seq(room))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(
            seeded,
            "message {i}: the room's seq is gone {:?} after its last message",
            last.elapsed()
        );
        let m = posted(node, &token, room, &format!("text {i}"), &format!("u{i}")).await;
        assert_eq!(seq_of(&m), i + 1, "{m}");
        last = Instant::now();
    }
    n.cleanup().await;
}

/// The stored message for a cid sent again with another text, over
/// WebSocket (the ack has its id and seq, and no second `msg` comes) and
/// REST (the answer is the stored message, its text the first's); history
/// holds the first text once.
async fn repeat_with_another_text(node: &TestNode, room: &str) -> Vec<Value> {
    let (token, _) = node.guest("rita").await;
    let mut rita = node.connect(&token).await;
    rita.join(room).await;
    let (first, _) = rita.send_msg(room, "first", "x").await;
    let again = rita.send_acked(room, "second", "x").await;
    assert_eq!(
        (&again["id"], &again["seq"]),
        (&first["id"], &first["seq"]),
        "{again} after {first}"
    );
    rita.expect_none_of(Duration::from_millis(500), &["msg"], "a repeated cid")
        .await;
    let answer = posted(node, &token, room, "third", "x").await;
    assert_eq!(
        (&answer["id"], &answer["seq"], &answer["text"]),
        (&first["id"], &first["seq"], &json!("first")),
        "{answer}"
    );
    let listed = history(node, &token, room).await;
    let texts: Vec<&Value> = listed.iter().map(|m| &m["text"]).collect();
    assert_eq!(texts, [&json!("first")], "{listed:?}");
    listed
}

#[tokio::test]
async fn standalone_a_repeated_cid_with_another_text_answers_the_stored_message() {
    let node = TestNode::start_default().await;
    repeat_with_another_text(&node, &format!("state-{}", unique_tag())).await;
}

#[tokio::test]
async fn a_repeated_cid_with_another_text_answers_the_stored_message() {
    let n = Node::start(&[]).await;
    repeat_with_another_text(&n.node, &n.room).await;
    let stored = n.wait_stored(1).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].get_str("text").unwrap(), "first");
    n.cleanup().await;
}

/// A retry with another text while the first attempt of its cid is still
/// on its way (accepted in Redis, not yet published) is never produced
/// under the first's id: it waits, and answers `unavailable` if the first
/// attempt does not come, or the first attempt's message once it does.
#[tokio::test]
async fn a_retry_with_another_text_waits_for_the_first_attempt() {
    let n = Node::start(&[]).await;
    let (node, room) = (&n.node, n.room.as_str());
    let (token, user) = node.guest("pia").await;
    posted(node, &token, room, "opening", "o").await;

    // What a node leaves when it accepted "first" under cid p and has not
    // published it yet (its produce is on its way, or the node died).
    let mut redis = n.opts.redis().await;
    let seq: u64 = redis::cmd("INCR")
        .arg(keys::seq(room))
        .query_async(&mut redis)
        .await
        .unwrap();
    let id = ulid::Ulid::new().to_string();
    let ts = now_ms();
    let (bucket, expires_at) = keys::cid_bucket_at(room, ts as u64 / 1000, CID_TTL_SECS);
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&bucket)
        .arg(format!("{}:p", user["id"].as_str().unwrap()))
        .arg(format!("{seq} {id} {ts} {}", text_digest("first")))
        .cmd("EXPIREAT")
        .arg(&bucket)
        .arg(expires_at)
        .query_async(&mut redis)
        .await
        .unwrap();

    let (status, body) = node.post_message(&token, room, "second", "p").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );

    // The retry waits; the first attempt's own retry (same text) is
    // published meanwhile, and both answer its message.
    let waiting = node.post_message(&token, room, "second", "p");
    let first = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        posted(node, &token, room, "first", "p").await
    };
    let ((status, waited), first) = tokio::join!(waiting, first);
    assert_eq!(status, 201, "{waited}");
    assert_eq!((seq_of(&first), &first["id"]), (seq, &json!(id)), "{first}");
    assert_eq!(
        (&waited["id"], &waited["seq"], &waited["text"]),
        (&first["id"], &first["seq"], &json!("first")),
        "{waited}"
    );
    let stored = n.wait_stored(2).await;
    let texts: Vec<&str> = stored.iter().map(|d| d.get_str("text").unwrap()).collect();
    assert_eq!(texts, ["opening", "first"], "{stored:?}");
    n.cleanup().await;
}
