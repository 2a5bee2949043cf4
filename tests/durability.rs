//! An acked message is never lost: across a graceful restart (SIGTERM) and a
//! crash (SIGKILL) on the same data directory; seq never goes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Joins `room` with `since = 0` on a fresh connection and returns every
/// replayed message and the `joined` frame.
async fn replay_all(node: &TestNode, token: &str, room: &str) -> (Vec<Value>, Value) {
    let mut c = node.connect(token).await;
    let (msgs, joined) = c.join_since(room, 0).await;
    c.close().await;
    (msgs, joined)
}

#[tokio::test]
async fn graceful_restart_keeps_every_acked_message() {
    let mut node = TestNode::start_default().await;
    let (token, user) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    a.join("durable").await;
    let acks = a.blast("durable", "d", 200).await;
    let acked = ack_map(&acks);
    let max_seq = acked.values().map(|(s, _)| *s).max().unwrap();

    let status = node.sigterm().await;
    assert!(status.success(), "SIGTERM exit status {status}");
    // The open session was closed, not left hanging.
    let (_, _) = a.wait_close(Duration::from_secs(10)).await;

    node.restart().await;
    // A token issued before the restart is still good (same secret).
    let (msgs, joined) = replay_all(&node, &token, "durable").await;
    assert_eq!(msgs.len(), 200, "replayed after restart");
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_strictly_increasing(&seqs, "replay");
    for m in &msgs {
        assert_msg_shape(m);
        let cid = m["cid"].as_str().unwrap();
        let (seq, id) = &acked[cid];
        assert_eq!(m["seq"].as_u64().unwrap(), *seq, "{cid}");
        assert_eq!(m["id"].as_str().unwrap(), id, "{cid}");
        assert_eq!(m["text"], format!("message {cid}"));
        assert_eq!(m["user"], json!({"id": user["id"], "name": user["name"]}));
    }
    assert_eq!(joined["last_seq"], max_seq);

    // History and REST agree after the restart.
    let resp = node
        .http()
        .get(node.url("/api/v1/rooms/durable/messages?limit=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["messages"].as_array().unwrap().len(), 100);
    assert_eq!(body["has_more"], true);
    assert_eq!(body["messages"][99]["seq"], max_seq);

    // seq continues above everything acked before, and the dedup memory survived.
    let mut b = node.connect(&token).await;
    b.join("durable").await;
    let (ack, _) = b.send_msg("durable", "after restart", "after-1").await;
    assert!(ack["seq"].as_u64().unwrap() > max_seq, "{ack} vs {max_seq}");
    let retry = b.send_acked("durable", "retry", "d-7").await;
    assert_eq!(retry["seq"].as_u64().unwrap(), acked["d-7"].0, "{retry}");
    assert_eq!(retry["id"].as_str().unwrap(), acked["d-7"].1, "{retry}");
}

#[tokio::test]
async fn kill9_after_acks_keeps_every_acked_message() {
    let mut node = TestNode::start_default().await;
    let (token, _) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    a.join("crash").await;
    let acks = a.blast("crash", "k", 500).await;
    node.kill9();
    let acked = ack_map(&acks);
    assert_eq!(acked.len(), 500);
    let max_seq = acked.values().map(|(s, _)| *s).max().unwrap();

    node.restart().await;
    let (msgs, joined) = replay_all(&node, &token, "crash").await;
    let got: BTreeMap<String, (u64, String)> = msgs
        .iter()
        .map(|m| {
            (
                m["cid"].as_str().unwrap().to_string(),
                (
                    m["seq"].as_u64().unwrap(),
                    m["id"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(got.len(), msgs.len(), "a cid replayed twice");
    for (cid, v) in &acked {
        assert_eq!(got.get(cid), Some(v), "acked {cid} after kill -9");
    }
    assert_eq!(msgs.len(), 500);
    assert_eq!(joined["last_seq"], max_seq);

    let mut b = node.connect(&token).await;
    b.join("crash").await;
    let (ack, _) = b.send_msg("crash", "after crash", "after").await;
    assert!(ack["seq"].as_u64().unwrap() > max_seq, "{ack} vs {max_seq}");
}

#[tokio::test]
async fn kill9_mid_stream_loses_nothing_acked_and_retries_dedupe() {
    stop_mid_stream(false).await;
}

#[tokio::test]
async fn sigterm_mid_stream_loses_nothing_acked_and_retries_dedupe() {
    stop_mid_stream(true).await;
}

/// Sends a stream of messages, stops the node (SIGTERM or SIGKILL) once a
/// quarter of them is acked, restarts it, and checks that every acked message
/// is there and that retrying the rest with the same cids stores each once.
async fn stop_mid_stream(graceful: bool) {
    let mut node = TestNode::start_default().await;
    let (token, _) = node.guest("ann").await;
    let mut a = node.connect(&token).await;
    a.join("midcrash").await;
    let total = 400;
    for i in 0..total {
        a.send_json(&json!({
            "op": "send", "room": "midcrash", "text": format!("message m-{i}"), "cid": format!("m-{i}")
        }))
        .await;
    }
    // Crash as soon as a part of them is acked, with the rest in flight.
    let mut acks = Vec::new();
    while acks.len() < total / 4 {
        let v = a.recv_json().await;
        assert_ne!(v["op"], "error", "{v}");
        if v["op"] == "ack" {
            acks.push(v);
        }
    }
    if graceful {
        let status = node.sigterm().await;
        assert!(status.success(), "SIGTERM exit status {status}");
    } else {
        node.kill9();
    }
    // Acks that were already on the wire count too.
    while let WsEvent::Json(v) = a.next_event(Duration::from_millis(500)).await {
        if v["op"] == "ack" {
            acks.push(v);
        }
    }
    let acked = ack_map(&acks);

    node.restart().await;
    let (msgs, _) = replay_all(&node, &token, "midcrash").await;
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_strictly_increasing(&seqs, "replay after crash");
    let mut stored: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for m in &msgs {
        let cid = m["cid"].as_str().unwrap().to_string();
        let v = (
            m["seq"].as_u64().unwrap(),
            m["id"].as_str().unwrap().to_string(),
        );
        assert!(
            stored.insert(cid.clone(), v).is_none(),
            "{cid} stored twice"
        );
    }
    for (cid, v) in &acked {
        assert_eq!(
            stored.get(cid),
            Some(v),
            "acked {cid} lost (graceful: {graceful})"
        );
    }

    // The client retries everything it has no ack for, with the same cids:
    // what got through keeps its id and seq, the rest is stored once.
    let mut b = node.connect(&token).await;
    b.join("midcrash").await;
    let mut final_acks = BTreeMap::new();
    for i in 0..total {
        let cid = format!("m-{i}");
        if acked.contains_key(&cid) {
            continue;
        }
        let ack = b
            .send_acked("midcrash", &format!("message {cid}"), &cid)
            .await;
        let v = (
            ack["seq"].as_u64().unwrap(),
            ack["id"].as_str().unwrap().to_string(),
        );
        if let Some(before) = stored.get(&cid) {
            assert_eq!(&v, before, "retry of {cid} stored before the crash");
        }
        final_acks.insert(cid, v);
    }
    final_acks.extend(acked);
    assert_eq!(final_acks.len(), total);

    let (msgs, _) = replay_all(&node, &token, "midcrash").await;
    assert_eq!(msgs.len(), total, "each cid stored exactly once");
    let cids: BTreeSet<&str> = msgs.iter().map(|m| m["cid"].as_str().unwrap()).collect();
    assert_eq!(cids.len(), total);
    for m in &msgs {
        let cid = m["cid"].as_str().unwrap();
        assert_eq!(m["seq"].as_u64().unwrap(), final_acks[cid].0, "{cid}");
        assert_eq!(m["id"].as_str().unwrap(), final_acks[cid].1, "{cid}");
    }
}

#[tokio::test]
async fn seq_keeps_increasing_across_restarts() {
    let mut node = TestNode::start_default().await;
    let (token, _) = node.guest("ann").await;
    let mut last = 0;
    for round in 0..3 {
        let mut a = node.connect(&token).await;
        let joined = a.join("counter").await;
        if round > 0 {
            assert_eq!(joined["last_seq"], last, "round {round}: {joined}");
        }
        for i in 0..5 {
            let (ack, _) = a
                .send_msg("counter", "tick", &format!("r{round}-{i}"))
                .await;
            let seq = ack["seq"].as_u64().unwrap();
            assert!(seq > last, "round {round}: seq {seq} after {last}");
            last = seq;
        }
        if round == 1 {
            node.kill9();
        }
        node.restart().await;
    }
    let resp = node
        .http()
        .get(node.url("/api/v1/rooms"))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let room = body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "counter")
        .unwrap_or_else(|| panic!("room with stored messages not listed: {body}"));
    assert_eq!(room["last_seq"], last);
}
