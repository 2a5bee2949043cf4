//! Cluster mode: several nodes on the shared Redis, Kafka and MongoDB.
//!
//! Tokens, delivery, presence and typing across nodes; one order for every
//! client of every node; every acked message stored once in MongoDB;
//! history beyond the Redis cache; failover after `kill -9`; idempotency
//! across nodes; readiness.
//!
//! The services must run on 127.0.0.1 (`scripts/services up`). Each test
//! has its own Kafka topic, consumer group, MongoDB database, node ids and
//! rooms, so tests never see each other's data; what they leave in the
//! services is removed when they pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use scalable_chat::store::keys;
use serde_json::{json, Value};

/// How long the persist workers may take to store what was acked.
const STORE_WITHIN: Duration = Duration::from_secs(30);

/// How long a test waits for a batch of messages to reach every client.
const DELIVER_WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- harness

/// A test's nodes on its own topic, consumer group and database.
struct Cluster {
    opts: ClusterOpts,
    nodes: Vec<TestNode>,
    rooms: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes (all at once, as a deployment would).
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| {}).await
    }

    async fn start_with(n: usize, tweak: impl FnOnce(&mut ClusterOpts)) -> Cluster {
        Services::local().require().await;
        let mut opts = ClusterOpts::isolated();
        tweak(&mut opts);
        let tag = unique_tag();
        let ids: Vec<String> = (0..n)
            .map(|i| format!("t-{tag}-{}", char::from(b'a' + i as u8)))
            .collect();
        let nodes = join_all(ids.iter().map(|id| TestNode::start_cluster(id, &opts))).await;
        Cluster {
            opts,
            nodes,
            rooms: Vec::new(),
        }
    }

    /// A room name no other test uses.
    fn room(&mut self, what: &str) -> String {
        let room = format!("{what}-{}", unique_tag());
        self.rooms.push(room.clone());
        room
    }

    /// The test database's `messages` collection.
    async fn messages(&self) -> mongodb::Collection<Document> {
        mongo_client(&self.opts)
            .await
            .database(&self.opts.database)
            .collection("messages")
    }

    /// Polls MongoDB until it holds at least `want` messages of `room`;
    /// returns them (sorted by seq).
    async fn wait_stored(&self, room: &str, want: usize) -> Vec<Document> {
        self.opts.wait_stored(room, want, STORE_WITHIN).await
    }

    /// Stops the nodes and removes what the test left in the services: its
    /// database, topic, consumer group and Redis keys. Failures are only
    /// reported: the test itself has passed by then.
    async fn cleanup(mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
        let nodes = self.nodes.iter().map(|n| n.opts.node_id.as_str());
        self.opts.remove_leftovers(&self.rooms, nodes).await;
    }
}

fn user_ref(u: &Value) -> Value {
    json!({ "id": u["id"], "name": u["name"] })
}

fn text_of(cid: &str) -> String {
    format!("message {cid}")
}

/// Sends `send` frames for `cids` without waiting for anything.
async fn send_all(c: &mut TestClient, room: &str, cids: &[String]) {
    for cid in cids {
        c.send_json(&json!({ "op": "send", "room": room, "text": text_of(cid), "cid": cid }))
            .await;
    }
}

fn cid_set(cids: &[String]) -> BTreeSet<String> {
    cids.iter().cloned().collect()
}

/// What one client read of one room.
#[derive(Debug, Default)]
struct Seen {
    /// `msg` frames of the room, in arrival order (duplicates kept).
    msgs: Vec<Value>,
    /// `ack` frames of the room.
    acks: Vec<Value>,
}

impl Seen {
    fn seqs(&self) -> Vec<u64> {
        self.msgs
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    }

    fn max_seq(&self) -> u64 {
        self.seqs().into_iter().max().unwrap_or(0)
    }
}

/// Reads until every cid of `msgs` arrived as a `msg` of `room` and every
/// cid of `acks` was acked; panics on an `error` frame or after `within`.
async fn read_until(
    c: &mut TestClient,
    who: &str,
    room: &str,
    msgs: &BTreeSet<String>,
    acks: &BTreeSet<String>,
    within: Duration,
) -> Seen {
    let deadline = Instant::now() + within;
    let mut seen = Seen::default();
    let mut got_msgs = BTreeSet::new();
    let mut got_acks = BTreeSet::new();
    while !(msgs.is_subset(&got_msgs) && acks.is_subset(&got_acks)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = c.try_recv_json(left).await else {
            let missing_msgs: Vec<&String> = msgs.difference(&got_msgs).take(10).collect();
            let missing_acks: Vec<&String> = acks.difference(&got_acks).take(10).collect();
            let arrived: Vec<String> = seen
                .msgs
                .iter()
                .map(|m| format!("{}:{}", m["seq"], m["cid"].as_str().unwrap_or("?")))
                .collect();
            let acked_missing: Vec<String> = seen
                .acks
                .iter()
                .filter(|a| a["cid"].as_str().is_some_and(|c| !got_msgs.contains(c)))
                .map(|a| format!("{}:{}", a["seq"], a["cid"].as_str().unwrap_or("?")))
                .collect();
            panic!(
                "{who}: after {within:?} got {} of {} msgs and {} of {} acks in {room}; \
                 missing msgs (first 10) {missing_msgs:?}, missing acks {missing_acks:?}; \
                 acked here but never delivered here (seq:cid): {}; \
                 msgs that arrived (seq:cid, in order): {}",
                got_msgs.intersection(msgs).count(),
                msgs.len(),
                got_acks.intersection(acks).count(),
                acks.len(),
                acked_missing.join(" "),
                arrived.join(" ")
            );
        };
        match v["op"].as_str() {
            Some("msg") if v["room"] == room => {
                got_msgs.insert(v["cid"].as_str().unwrap().to_string());
                seen.msgs.push(v);
            }
            Some("ack") if v["room"] == room => {
                let cid = v["cid"].as_str().unwrap().to_string();
                assert!(got_acks.insert(cid), "{who}: a second ack {v}");
                seen.acks.push(v);
            }
            Some("error") => panic!("{who}: refused: {v}"),
            _ => {}
        }
    }
    seen
}

/// Asserts that nothing more of `room` is on its way to `c`: no `msg` of
/// the room arrives before the answer to a `ping`.
async fn assert_no_more_msgs(c: &mut TestClient, who: &str, room: &str) {
    for v in c.ping(now_ms()).await {
        assert!(
            !(v["op"] == "msg" && v["room"] == room),
            "{who}: an extra msg arrived: {v}"
        );
    }
}

/// What a node leaves in Redis when it accepts a `send` of `cid` by `user`
/// (gives it the room's next seq and an id) and then dies, or is still
/// waiting for Kafka: the message is neither produced nor published.
/// Returns its seq and id.
async fn accepted_not_published(
    opts: &ClusterOpts,
    room: &str,
    user: &Value,
    cid: &str,
) -> (u64, String) {
    let mut conn = opts.redis().await;
    let seq: u64 = redis::cmd("INCR")
        .arg(keys::seq(room))
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = ulid::Ulid::new().to_string();
    let _: () = redis::cmd("HSET")
        .arg(keys::cids(room))
        .arg(format!("{}:{cid}", user["id"].as_str().unwrap()))
        .arg(format!("{seq} {id} {}", now_ms()))
        .query_async(&mut conn)
        .await
        .unwrap();
    (seq, id)
}

/// The presence frame of `room` that `c` gets next (other frames skipped).
async fn next_presence(c: &mut TestClient, room: &str) -> Value {
    c.recv_until_pred(|v| v["op"] == "presence" && v["room"] == room)
        .await
        .0
}

// ---------------------------------------------------------------- tests

/// 1. A token issued by one node works on another, over WebSocket and REST.
#[tokio::test]
async fn token_from_one_node_works_on_another() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("tokens");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let (token, user) = a.guest("tina").await;
    let mut ws = b.connect(&token).await;
    assert_eq!(ws.welcome["user"], user_ref(&user), "{}", ws.welcome);
    assert_eq!(ws.welcome["node"], b.opts.node_id, "{}", ws.welcome);
    ws.join(&room).await;
    let (ack, msg) = ws.send_msg(&room, "hello via node b", "t-1").await;
    assert_eq!(msg["user"], user_ref(&user), "{msg}");

    // REST on node b with node a's token.
    let (status, body) = b.post_message(&token, &room, "over http", "t-2").await;
    assert_eq!(status, 201, "POST with a token of another node: {body}");
    assert_eq!(body["user"], user_ref(&user), "{body}");
    assert_eq!(body["cid"], "t-2", "{body}");
    assert!(
        body["seq"].as_u64().unwrap() > ack["seq"].as_u64().unwrap(),
        "{body} after {ack}"
    );
    let (live, _) = ws
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "t-2")
        .await;
    assert_eq!(live["id"], body["id"], "{live}");
    let resp = b
        .http()
        .get(b.url("/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["user"], user_ref(&user), "{me}");

    // And the other way round.
    let (token_b, user_b) = b.guest("bert").await;
    let wa = a.connect(&token_b).await;
    assert_eq!(wa.welcome["user"], user_ref(&user_b), "{}", wa.welcome);
    assert_eq!(wa.welcome["node"], a.opts.node_id, "{}", wa.welcome);

    // Both nodes read the same room.
    let (status, page) = a.get_json(&format!("/api/v1/rooms/{room}/messages")).await;
    assert_eq!(status, 200, "{page}");
    let cids: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cid"].as_str().unwrap())
        .collect();
    assert_eq!(cids, ["t-1", "t-2"], "{page}");

    // A token whose signature was changed is refused by the other node.
    let dot = token.find('.').expect("token has a signature");
    let mut forged = token.clone().into_bytes();
    forged[dot + 1] = if forged[dot + 1] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(b.try_upgrade(&b.ws_url(&forged), None).await, 401);
    let (status, body) = b.post_message(&forged, &room, "forged", "t-3").await;
    assert_eq!(status, 401, "{body}");

    ws.close().await;
    wa.close().await;
    cluster.cleanup().await;
}

/// 2. Members on two nodes see each other's messages, presence and typing,
/// and `joined.members` lists the members of every node.
#[tokio::test]
async fn delivery_presence_and_typing_cross_nodes() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("lobby");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let (mut ann, ua, _) = a.user("ann").await;
    let (mut bob, ub, _) = b.user("bob").await;
    let joined = ann.join(&room).await;
    assert_eq!(joined["members"], json!([user_ref(&ua)]), "{joined}");
    let joined = bob.join(&room).await;
    assert_eq!(
        joined["members"],
        json!([user_ref(&ua), user_ref(&ub)]),
        "bob (node b) must see ann (node a) among the members: {joined}"
    );
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(p["joined"], json!([user_ref(&ub)]), "{p}");
    assert_eq!(p["left"], json!([]), "{p}");

    // Messages, both ways; the sender gets its own too.
    let (ack, own) = ann.send_msg(&room, "hello from a", "a-1").await;
    assert_eq!(own["user"], user_ref(&ua), "{own}");
    let (got, _) = bob
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "a-1")
        .await;
    assert_msg_shape(&got);
    assert_eq!(got["user"], user_ref(&ua), "{got}");
    assert_eq!(got["text"], "hello from a", "{got}");
    assert_eq!(
        (&got["seq"], &got["id"]),
        (&ack["seq"], &ack["id"]),
        "{got}"
    );
    assert_eq!(got["ts"], own["ts"], "{got} vs {own}");

    let (ack, own) = bob.send_msg(&room, "hello from b", "b-1").await;
    assert_eq!(own["user"], user_ref(&ub), "{own}");
    let (got, _) = ann
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "b-1")
        .await;
    assert_eq!(got["user"], user_ref(&ub), "{got}");
    assert_eq!(
        (&got["seq"], &got["id"]),
        (&ack["seq"], &ack["id"]),
        "{got}"
    );

    // Typing, both ways; never back to the typist.
    ann.send_json(&json!({ "op": "typing", "room": room }))
        .await;
    let (t, _) = bob
        .recv_until_pred(|v| v["op"] == "typing" && v["room"] == room)
        .await;
    assert_eq!(t["user"], user_ref(&ua), "{t}");
    bob.send_json(&json!({ "op": "typing", "room": room }))
        .await;
    let (t, _) = ann
        .recv_until_pred(|v| v["op"] == "typing" && v["room"] == room)
        .await;
    assert_eq!(t["user"], user_ref(&ub), "{t}");
    for (c, who) in [(&mut ann, "ann"), (&mut bob, "bob")] {
        for v in c.ping(1).await {
            assert_ne!(v["op"], "typing", "{who} got a typing frame: {v}");
        }
    }

    // A user coming and going on node a is seen on node b.
    let (mut cat, uc, _) = a.user("cat").await;
    cat.join(&room).await;
    let p = next_presence(&mut bob, &room).await;
    assert_eq!(p["joined"], json!([user_ref(&uc)]), "{p}");
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(p["joined"], json!([user_ref(&uc)]), "{p}");
    cat.close().await;
    let p = next_presence(&mut bob, &room).await;
    assert_eq!(
        (&p["joined"], &p["left"]),
        (&json!([]), &json!([user_ref(&uc)])),
        "{p}"
    );
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(p["left"], json!([user_ref(&uc)]), "{p}");

    // Node b's user leaves, comes back and disconnects; node a sees each.
    bob.send_json(&json!({ "op": "leave", "room": room })).await;
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(
        (&p["joined"], &p["left"]),
        (&json!([]), &json!([user_ref(&ub)])),
        "{p}"
    );
    bob.join(&room).await;
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(
        (&p["joined"], &p["left"]),
        (&json!([user_ref(&ub)]), &json!([])),
        "{p}"
    );
    let again = ann.join(&room).await;
    assert_eq!(
        again["members"],
        json!([user_ref(&ua), user_ref(&ub)]),
        "ann (node a) must see bob (node b) among the members: {again}"
    );
    bob.close().await;
    let p = next_presence(&mut ann, &room).await;
    assert_eq!(
        (&p["joined"], &p["left"]),
        (&json!([]), &json!([user_ref(&ub)])),
        "{p}"
    );

    ann.close().await;
    cluster.cleanup().await;
}

/// 3. 200 messages sent at once through two of three nodes reach every
/// client of all three once each, in one strictly increasing seq order, all
/// acked.
#[tokio::test]
async fn concurrent_senders_on_two_nodes_give_one_order_everywhere() {
    let mut cluster = Cluster::start(3).await;
    let room = cluster.room("order");
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);

    let (mut sa, ua, _) = a.user("sa").await;
    let (mut sb, ub, _) = b.user("sb").await;
    let (mut oa, _, _) = a.user("oa").await;
    let (mut ob, _, _) = b.user("ob").await;
    // A third node with no sender: it only relays.
    let (mut oc, _, _) = c.user("oc").await;
    for c in [&mut sa, &mut sb, &mut oa, &mut ob, &mut oc] {
        c.join(&room).await;
    }

    let cids_a: Vec<String> = (0..100).map(|i| format!("a-{i}")).collect();
    let cids_b: Vec<String> = (0..100).map(|i| format!("b-{i}")).collect();
    let all: BTreeSet<String> = cid_set(&cids_a).union(&cid_set(&cids_b)).cloned().collect();
    let (acks_a, acks_b) = (cid_set(&cids_a), cid_set(&cids_b));
    let none = BTreeSet::new();
    let (seen_sa, seen_sb, seen_oa, seen_ob, seen_oc) = tokio::join!(
        async {
            send_all(&mut sa, &room, &cids_a).await;
            read_until(&mut sa, "sender a", &room, &all, &acks_a, DELIVER_WITHIN).await
        },
        async {
            send_all(&mut sb, &room, &cids_b).await;
            read_until(&mut sb, "sender b", &room, &all, &acks_b, DELIVER_WITHIN).await
        },
        read_until(&mut oa, "observer a", &room, &all, &none, DELIVER_WITHIN),
        read_until(&mut ob, "observer b", &room, &all, &none, DELIVER_WITHIN),
        read_until(&mut oc, "observer c", &room, &all, &none, DELIVER_WITHIN),
    );

    // Every ack names its message; seqs and ids are unique.
    let mut acks = seen_sa.acks.clone();
    acks.extend(seen_sb.acks.iter().cloned());
    let acked = ack_map(&acks);
    eprintln!("acks (cid: seq id): {acked:?}");
    assert_eq!(acked.len(), 200);
    let seqs: BTreeSet<u64> = acked.values().map(|(s, _)| *s).collect();
    let ids: BTreeSet<&String> = acked.values().map(|(_, i)| i).collect();
    assert_eq!(seqs.len(), 200, "two messages share a seq: {acked:?}");
    assert_eq!(ids.len(), 200, "two messages share an id: {acked:?}");

    let reference = seen_oa.seqs();
    for (who, seen) in [
        ("sender a", &seen_sa),
        ("sender b", &seen_sb),
        ("observer a", &seen_oa),
        ("observer b", &seen_ob),
        ("observer c", &seen_oc),
    ] {
        let got = seen.seqs();
        assert_eq!(
            seen.msgs.len(),
            200,
            "{who} got {} msg frames for 200 messages (duplicates): {got:?}",
            seen.msgs.len()
        );
        assert_strictly_increasing(&got, who);
        assert_eq!(got, reference, "{who} saw another order than observer a");
        for m in &seen.msgs {
            assert_msg_shape(m);
            let cid = m["cid"].as_str().unwrap();
            let (seq, id) = &acked[cid];
            assert_eq!(m["seq"].as_u64().unwrap(), *seq, "{who}: {m} vs its ack");
            assert_eq!(m["id"].as_str().unwrap(), id, "{who}: {m} vs its ack");
            assert_eq!(m["text"], text_of(cid), "{who}: {m}");
            let sender = if cid.starts_with("a-") { &ua } else { &ub };
            assert_eq!(m["user"], user_ref(sender), "{who}: {m}");
        }
    }
    for (c, who) in [
        (&mut sa, "sender a"),
        (&mut sb, "sender b"),
        (&mut oa, "observer a"),
        (&mut ob, "observer b"),
        (&mut oc, "observer c"),
    ] {
        assert_no_more_msgs(c, who, &room).await;
    }

    cluster.cleanup().await;
}

/// 4. The persist workers store every acked message in MongoDB once, in the
/// documented shape, with the unique (room, seq) index.
#[tokio::test]
async fn acked_messages_are_stored_in_mongodb_once() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("stored");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let (mut ann, ua, ann_token) = a.user("ann").await;
    let (mut bob, ub, _) = b.user("bob").await;
    ann.join(&room).await;
    bob.join(&room).await;

    // Expected documents by id: (seq, user, text, ts, cid).
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    for i in 0..10 {
        let (_, m) = ann
            .send_msg(&room, &format!("ann says {i}"), &format!("a-{i}"))
            .await;
        expected.insert(m["id"].as_str().unwrap().to_string(), m);
        let (_, m) = bob
            .send_msg(&room, &format!("bob says {i}"), &format!("b-{i}"))
            .await;
        expected.insert(m["id"].as_str().unwrap().to_string(), m);
    }
    let (carol_token, uc) = b.guest("carol").await;
    let (status, m) = b
        .post_message(&carol_token, &room, "carol over http", "h-1")
        .await;
    assert_eq!(status, 201, "{m}");
    expected.insert(m["id"].as_str().unwrap().to_string(), m);
    // Retries of a cid through the other node, over REST and WebSocket: the
    // log may hold them twice, MongoDB must not.
    let first = expected
        .values()
        .find(|m| m["cid"] == "a-3")
        .unwrap()
        .clone();
    let (status, retry) = b.post_message(&ann_token, &room, "ann says 3", "a-3").await;
    assert_eq!(status, 201, "{retry}");
    assert_eq!(
        (&retry["id"], &retry["seq"]),
        (&first["id"], &first["seq"]),
        "a retried cid through another node made another message: {retry} vs {first}"
    );
    let retry = ann.send_acked(&room, "ann says 3", "a-3").await;
    assert_eq!((&retry["id"], &retry["seq"]), (&first["id"], &first["seq"]));
    assert_eq!(expected.len(), 21);

    let docs = cluster.wait_stored(&room, expected.len()).await;
    // Whatever else is still on its way (the retries' records) must not add
    // a document either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let docs_later = cluster.wait_stored(&room, expected.len()).await;
    assert_eq!(docs.len(), expected.len(), "documents of {room}: {docs:#?}");
    assert_eq!(docs_later.len(), expected.len(), "{docs_later:#?}");

    let users: BTreeMap<&str, &Value> = [&ua, &ub, &uc]
        .into_iter()
        .map(|u| (u["id"].as_str().unwrap(), u))
        .collect();
    let mut seqs = BTreeSet::new();
    for d in &docs {
        let Some(Bson::String(id)) = d.get("_id") else {
            panic!("_id is not the message id string: {d}");
        };
        let m = expected
            .get(id)
            .unwrap_or_else(|| panic!("document of no acked message: {d}"));
        assert_eq!(d.get_str("room").ok(), Some(room.as_str()), "{d}");
        let seq = bson_int(d.get("seq"));
        assert_eq!(seq, m["seq"].as_i64().unwrap(), "{d} vs {m}");
        assert!(seqs.insert(seq), "seq {seq} stored twice");
        let user = d
            .get_document("user")
            .unwrap_or_else(|_| panic!("user is not a document: {d}"));
        assert_eq!(user.get_str("id").ok(), m["user"]["id"].as_str(), "{d}");
        assert_eq!(user.get_str("name").ok(), m["user"]["name"].as_str(), "{d}");
        assert!(users.contains_key(user.get_str("id").unwrap()), "{d}");
        assert_eq!(d.get_str("text").ok(), m["text"].as_str(), "{d}");
        assert_eq!(d.get_str("cid").ok(), m["cid"].as_str(), "{d}");
        match d.get("ts") {
            Some(Bson::DateTime(ts)) => {
                assert_eq!(ts.timestamp_millis(), m["ts"].as_i64().unwrap(), "{d}")
            }
            other => panic!("ts is not a BSON date: {other:?} in {d}"),
        }
    }

    let coll = cluster.messages().await;
    let indexes: Vec<mongodb::IndexModel> = coll
        .list_indexes()
        .await
        .expect("list indexes")
        .try_collect()
        .await
        .expect("index cursor");
    let ascending =
        |b: &Bson| matches!(b, Bson::Int32(1) | Bson::Int64(1)) || *b == Bson::Double(1.0);
    let unique_room_seq = indexes.iter().any(|ix| {
        let keys: Vec<(&String, &Bson)> = ix.keys.iter().collect();
        keys.len() == 2
            && keys[0].0 == "room"
            && keys[1].0 == "seq"
            && ascending(keys[0].1)
            && ascending(keys[1].1)
            && ix.options.as_ref().and_then(|o| o.unique) == Some(true)
    });
    assert!(
        unique_room_seq,
        "no unique index on (room, seq) in {}.messages: {indexes:?}",
        cluster.opts.database
    );

    ann.close().await;
    bob.close().await;
    cluster.cleanup().await;
}

/// 5. With a small Redis cache, REST history pages back to seq 1 through
/// MongoDB, and `join since = 0` replays everything.
#[tokio::test]
async fn history_pages_back_to_seq_1_past_the_cache() {
    let mut cluster = Cluster::start_with(2, |o| o.cache_size = 20).await;
    let room = cluster.room("deep");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let (mut ann, ua, _) = a.user("ann").await;
    ann.join(&room).await;
    let mut acks = ann.blast(&room, "h", 120).await;
    cluster.wait_stored(&room, 120).await;

    // Precondition: seq 1 has left the recent cache, so the pages below
    // must reach MongoDB. The cache is trimmed when a message is delivered,
    // and only below what MongoDB holds (less the node's safety margin), so
    // a few more messages, each sent once the previous one is stored, push
    // it out.
    let mut conn = cluster.opts.redis().await;
    loop {
        let cached_first: usize = redis::cmd("ZCOUNT")
            .arg(keys::recent(&room))
            .arg(1)
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        if cached_first == 0 {
            break;
        }
        assert!(
            acks.len() < 400,
            "precondition: with redis.cache_size = 20 and all {} messages in MongoDB, \
             the recent cache still holds seq 1",
            acks.len()
        );
        let cid = format!("h-{}", acks.len());
        acks.push(ann.send_acked(&room, &text_of(&cid), &cid).await);
        cluster.wait_stored(&room, acks.len()).await;
    }
    let total = acks.len();
    let acked = ack_map(&acks);
    assert_eq!(acked.len(), total);
    let by_seq: BTreeMap<u64, (&String, &String)> =
        acked.iter().map(|(cid, (s, id))| (*s, (cid, id))).collect();
    assert_eq!(by_seq.len(), total, "two acks share a seq: {acked:?}");
    let all_seqs: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(
        all_seqs[0], 1,
        "the first message of a new room: {all_seqs:?}"
    );
    let last = *all_seqs.last().unwrap();

    // REST pages from the other node, newest first, down to seq 1.
    let mut before: Option<u64> = None;
    let mut got: Vec<u64> = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(
            pages <= total.div_ceil(50),
            "more pages than {total} messages need: {got:?}"
        );
        let path = match before {
            None => format!("/api/v1/rooms/{room}/messages?limit=50"),
            Some(s) => format!("/api/v1/rooms/{room}/messages?before={s}&limit=50"),
        };
        let (status, page) = b.get_json(&path).await;
        assert_eq!(status, 200, "GET {path}: {page}");
        let msgs = page["messages"].as_array().unwrap();
        let seqs = seqs(&page["messages"]);
        assert_strictly_increasing(&seqs, &format!("page {path}"));
        assert!(msgs.len() <= 50, "GET {path}: {} messages", msgs.len());
        let has_more = page["has_more"]
            .as_bool()
            .unwrap_or_else(|| panic!("has_more in {page}"));
        let want: Vec<u64> = all_seqs
            .iter()
            .copied()
            .filter(|s| before.is_none_or(|b| *s < b))
            .rev()
            .take(50)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert_eq!(seqs, want, "GET {path} (has_more {has_more})");
        for m in msgs {
            assert_msg_shape(m);
            let (cid, id) = by_seq[&m["seq"].as_u64().unwrap()];
            assert_eq!(m["cid"], cid.as_str(), "{m}");
            assert_eq!(m["id"], id.as_str(), "{m}");
            assert_eq!(m["user"], user_ref(&ua), "{m}");
            assert_eq!(m["text"], text_of(cid), "{m}");
        }
        got.splice(0..0, seqs.iter().copied());
        let older_exist = seqs.first().is_some_and(|first| *first > all_seqs[0]);
        assert_eq!(has_more, older_exist, "has_more of GET {path}: {page}");
        if !has_more {
            break;
        }
        before = seqs.first().copied();
    }
    assert_eq!(got, all_seqs, "pages together");

    // A fresh connection on the other node replays all of it.
    let (token, _) = b.guest("rita").await;
    let mut rita = b.connect(&token).await;
    let (replay, joined) = rita.join_since(&room, 0).await;
    let replayed = seqs(&Value::Array(replay.clone()));
    assert_eq!(replayed, all_seqs, "join since 0 replay");
    for m in &replay {
        let (cid, id) = by_seq[&m["seq"].as_u64().unwrap()];
        assert_eq!(
            (m["cid"].as_str(), m["id"].as_str()),
            (Some(cid.as_str()), Some(id.as_str())),
            "{m}"
        );
    }
    assert_eq!(joined["last_seq"], last, "{joined}");

    ann.close().await;
    rita.close().await;
    cluster.cleanup().await;
}

/// 6. After `kill -9` of a node, its client resumes on another node with
/// `join since` and misses nothing sent meanwhile.
#[tokio::test]
async fn clients_of_a_killed_node_resume_on_another_and_miss_nothing() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("failover");

    let (mut ann, ua, ann_token) = cluster.nodes[0].user("ann").await;
    let (mut bob, ub, _) = cluster.nodes[1].user("bob").await;
    ann.join(&room).await;
    bob.join(&room).await;

    let before: Vec<String> = (0..10).map(|i| format!("pre-{i}")).collect();
    send_all(&mut bob, &room, &before).await;
    let set = cid_set(&before);
    let pre_bob = read_until(&mut bob, "bob", &room, &set, &set, DELIVER_WITHIN).await;
    let pre_ann = read_until(
        &mut ann,
        "ann",
        &room,
        &set,
        &BTreeSet::new(),
        DELIVER_WITHIN,
    )
    .await;
    let mut last_seen = pre_ann.max_seq();

    // Node a dies while bob goes on sending through node b.
    let during: Vec<String> = (0..30).map(|i| format!("during-{i}")).collect();
    send_all(&mut bob, &room, &during[..10]).await;
    cluster.nodes[0].kill9();
    send_all(&mut bob, &room, &during[10..]).await;
    let set = cid_set(&during);
    let mid_bob = read_until(&mut bob, "bob", &room, &set, &set, DELIVER_WITHIN).await;

    // Ann's connection ends; she keeps what arrived before it did.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ann.next_event(left).await {
            WsEvent::Json(v) if v["op"] == "msg" && v["room"] == room => {
                last_seen = last_seen.max(v["seq"].as_u64().unwrap());
            }
            WsEvent::Json(_) | WsEvent::Other(_) => {}
            WsEvent::Closed(_) | WsEvent::Error(_) => break,
            WsEvent::Timeout => panic!("ann's connection to the killed node did not end"),
        }
    }

    let mut acks = pre_bob.acks.clone();
    acks.extend(mid_bob.acks.iter().cloned());
    let acked = ack_map(&acks);
    let max_seq = acked.values().map(|(s, _)| *s).max().unwrap();
    let mut missed: Vec<(u64, String, String)> = acked
        .iter()
        .filter(|(_, (s, _))| *s > last_seen)
        .map(|(cid, (s, id))| (*s, cid.clone(), id.clone()))
        .collect();
    missed.sort();
    assert!(
        missed.len() >= 20,
        "ann saw up to seq {last_seen}, which leaves only {} messages to replay: {missed:?}",
        missed.len()
    );

    // She resumes on node b.
    let mut ann2 = cluster.nodes[1].connect(&ann_token).await;
    assert_eq!(ann2.welcome["user"], user_ref(&ua));
    let (replay, joined) = ann2.join_since(&room, last_seen).await;
    let replayed: Vec<(u64, String, String)> = replay
        .iter()
        .map(|m| {
            assert_msg_shape(m);
            assert_eq!(m["user"], user_ref(&ub), "{m}");
            (
                m["seq"].as_u64().unwrap(),
                m["cid"].as_str().unwrap().to_string(),
                m["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        replayed, missed,
        "join since {last_seen} on node b after node a was killed"
    );
    assert_eq!(joined["last_seq"], max_seq, "{joined}");

    // And she is live again.
    let (ack, _) = bob.send_msg(&room, "still here", "post-1").await;
    let (m, _) = ann2
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "post-1")
        .await;
    assert_eq!((&m["seq"], &m["id"]), (&ack["seq"], &ack["id"]), "{m}");
    let (ack, _) = ann2.send_msg(&room, "back", "ann-back").await;
    let (m, _) = bob
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "ann-back")
        .await;
    assert_eq!((&m["seq"], &m["id"]), (&ack["seq"], &ack["id"]), "{m}");

    ann2.close().await;
    bob.close().await;
    cluster.cleanup().await;
}

/// 7. One user sending the same cid through two nodes at once makes one
/// message: the same id and seq in both acks, one `msg` per connection.
#[tokio::test]
async fn same_cid_through_two_nodes_makes_one_message() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("dedup");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let (token, ua) = a.guest("ann").await;
    let mut on_a = a.connect(&token).await;
    let mut on_b = b.connect(&token).await;
    let (mut oa, _, _) = a.user("oa").await;
    let (mut ob, _, _) = b.user("ob").await;
    for c in [&mut on_a, &mut on_b, &mut oa, &mut ob] {
        c.join(&room).await;
    }

    let cids: Vec<String> = (0..20).map(|i| format!("dup-{i}")).collect();
    let set = cid_set(&cids);
    let none = BTreeSet::new();
    let (seen_a, seen_b) = tokio::join!(
        async {
            send_all(&mut on_a, &room, &cids).await;
            read_until(&mut on_a, "ann on a", &room, &none, &set, DELIVER_WITHIN).await
        },
        async {
            send_all(&mut on_b, &room, &cids).await;
            read_until(&mut on_b, "ann on b", &room, &none, &set, DELIVER_WITHIN).await
        },
    );
    let acked_a = ack_map(&seen_a.acks);
    let acked_b = ack_map(&seen_b.acks);
    eprintln!("acks (cid: seq id): {acked_a:?}");
    for cid in &cids {
        assert_eq!(
            acked_a[cid], acked_b[cid],
            "{cid} sent through node a and node b: the acks differ"
        );
    }

    // The same cid by REST through node b: the same message again.
    let (status, body) = b
        .post_message(&token, &room, &text_of("dup-0"), "dup-0")
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (
            body["seq"].as_u64().unwrap(),
            body["id"].as_str().unwrap().to_string()
        ),
        acked_a["dup-0"],
        "{body}"
    );

    // A marker sent after every ack arrives after anything those sends
    // made (delivery is in seq order): up to it, one msg per cid.
    on_a.send_json(&json!({ "op": "send", "room": room, "text": "marker", "cid": "marker" }))
        .await;
    let mut want = set.clone();
    want.insert("marker".to_string());
    let marker_ack = cid_set(&["marker".to_string()]);
    for (c, who, earlier, acks) in [
        (&mut on_a, "ann on a", seen_a.msgs, &marker_ack),
        (&mut on_b, "ann on b", seen_b.msgs, &none),
        (&mut oa, "observer a", Vec::new(), &none),
        (&mut ob, "observer b", Vec::new(), &none),
    ] {
        let have: BTreeSet<String> = earlier
            .iter()
            .map(|m| m["cid"].as_str().unwrap().to_string())
            .collect();
        let rest: BTreeSet<String> = want.difference(&have).cloned().collect();
        let mut seen = read_until(c, who, &room, &rest, acks, DELIVER_WITHIN).await;
        seen.msgs.splice(0..0, earlier);
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &seen.msgs {
            let cid = m["cid"].as_str().unwrap();
            *count.entry(cid).or_default() += 1;
            if cid != "marker" {
                let (seq, id) = &acked_a[cid];
                assert_eq!(m["seq"].as_u64().unwrap(), *seq, "{who}: {m}");
                assert_eq!(m["id"].as_str().unwrap(), id, "{who}: {m}");
                assert_eq!(m["user"], user_ref(&ua), "{who}: {m}");
            }
        }
        let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{who} got these cids more than once: {twice:?}"
        );
        assert_strictly_increasing(&seen.seqs(), who);
        assert_no_more_msgs(c, who, &room).await;
    }

    cluster.cleanup().await;
}

/// 7b. A node accepted a message (gave it a seq) and died before Kafka had
/// it; later messages were delivered meanwhile. The client's retry through
/// another node comes long after the rooms stopped waiting for that seq:
/// it is published under a new seq, delivered live to every client of
/// every node, acked with that seq and stored under it, once.
#[tokio::test]
async fn a_retry_after_later_messages_is_delivered_live_under_a_new_seq() {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("late");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (token, ann) = a.guest("ann").await;
    let mut ann_b = b.connect(&token).await;
    let (mut oa, _, _) = a.user("oa").await;
    let (mut ob, _, _) = b.user("ob").await;
    for c in [&mut ann_b, &mut oa, &mut ob] {
        c.join(&room).await;
    }
    ann_b.send_acked(&room, "first", "first").await;

    // A node accepted ann's `lost` and died.
    let (lost_seq, lost_id) = accepted_not_published(&cluster.opts, &room, &ann, "lost").await;

    let later: Vec<String> = vec!["later-1".into(), "later-2".into()];
    send_all(&mut ann_b, &room, &later).await;
    let seen = read_until(
        &mut ann_b,
        "ann",
        &room,
        &cid_set(&later),
        &cid_set(&later),
        DELIVER_WITHIN,
    )
    .await;
    let top = seen.max_seq();
    assert!(
        top > lost_seq,
        "later messages come after the lost seq: {seen:?}"
    );
    for (c, who) in [(&mut oa, "oa"), (&mut ob, "ob")] {
        let mut want = cid_set(&later);
        want.insert("first".into());
        read_until(c, who, &room, &want, &BTreeSet::new(), DELIVER_WITHIN).await;
    }
    // Past the rooms' hold-back: a seq that arrives now is skipped.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (ack, msg) = ann_b.send_msg(&room, &text_of("lost"), "lost").await;
    let seq = ack["seq"].as_u64().unwrap();
    assert!(seq > top, "the retry is published above {top}: {ack}");
    assert_eq!(
        ack["id"],
        lost_id.as_str(),
        "the retry keeps the first id: {ack}"
    );
    assert_eq!(msg["seq"], seq, "{msg}");
    for (c, who) in [(&mut oa, "oa on a"), (&mut ob, "ob on b")] {
        let got = read_until(
            c,
            who,
            &room,
            &cid_set(&["lost".into()]),
            &BTreeSet::new(),
            DELIVER_WITHIN,
        )
        .await;
        assert_eq!(got.seqs(), vec![seq], "{who}: {got:?}");
        assert_no_more_msgs(c, who, &room).await;
    }
    // A client resuming from the highest seq before it gets it too.
    let (mut fresh, _, _) = a.user("fresh").await;
    let (replayed, _) = fresh.join_since(&room, top).await;
    let replayed: Vec<(u64, &str)> = replayed
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["cid"].as_str().unwrap()))
        .collect();
    assert_eq!(replayed, vec![(seq, "lost")], "join since {top}");

    // Once more through the other node: the same answer, nothing new.
    let mut ann_a = a.connect(&token).await;
    ann_a.join(&room).await;
    let again = ann_a.send_acked(&room, &text_of("lost"), "lost").await;
    assert_eq!(
        (&again["seq"], &again["id"]),
        (&ack["seq"], &ack["id"]),
        "{again}"
    );
    assert_no_more_msgs(&mut ann_a, "ann on a", &room).await;

    // Kafka has it under both seqs (the retry produced the first one before
    // it learnt it was late): MongoDB ends with one document, the new seq.
    let started = Instant::now();
    loop {
        let docs = cluster.wait_stored(&room, 4).await;
        let lost: Vec<(i64, String)> = docs
            .iter()
            .filter(|d| d.get_str("cid") == Ok("lost"))
            .map(|d| {
                (
                    bson_int(d.get("seq")),
                    d.get_str("_id").unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(docs.len(), 4, "{docs:?}");
        if lost == vec![(seq as i64, lost_id.clone())] {
            break;
        }
        assert!(
            started.elapsed() < STORE_WITHIN,
            "MongoDB holds {lost:?} for the retried message, not ({seq}, {lost_id})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    cluster.cleanup().await;
}

/// 7c. A client joins with `since` while node b's room holds messages back
/// for a lower seq still on its way. The store already has the higher
/// ones, but the replay stops where the room's deliveries stand: the
/// missing one, when it comes, is delivered before them, to every client.
#[tokio::test]
async fn a_join_during_a_hold_back_gets_the_missing_seq_in_order() {
    join_while_a_seq_is_on_its_way(true).await;
}

/// 7d. The same when the join starts the room on node b: the room starts
/// below the missing seq, not at the highest one stored.
#[tokio::test]
async fn a_room_started_while_a_seq_is_on_its_way_delivers_it_in_order() {
    join_while_a_seq_is_on_its_way(false).await;
}

async fn join_while_a_seq_is_on_its_way(room_already_on_b: bool) {
    let mut cluster = Cluster::start(2).await;
    let room = cluster.room("held");
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (token, ann) = a.guest("ann").await;
    let mut ann_a = a.connect(&token).await;
    ann_a.join(&room).await;
    let mut ob = None;
    if room_already_on_b {
        let (mut c, _, _) = b.user("ob").await;
        c.join(&room).await;
        ob = Some(c);
    }
    let first = ann_a.send_acked(&room, "first", "first").await;
    let first_seq = first["seq"].as_u64().unwrap();
    if let Some(c) = ob.as_mut() {
        c.recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "first")
            .await;
    }

    // Ann's `slow` is accepted, its produce still on its way; two later
    // messages go through meanwhile.
    let (slow_seq, _) = accepted_not_published(&cluster.opts, &room, &ann, "slow").await;
    assert_eq!(slow_seq, first_seq + 1);
    for cid in ["next-1", "next-2"] {
        ann_a.send_acked(&room, &text_of(cid), cid).await;
    }
    // A client joins on node b now, within the rooms' hold-back.
    let (mut late, _, _) = b.user("late").await;
    let (replayed, _) = late.join_since(&room, first_seq).await;
    let (ack, _) = ann_a.send_msg(&room, &text_of("slow"), "slow").await;
    assert_eq!(
        ack["seq"].as_u64(),
        Some(slow_seq),
        "the produce came within the hold-back, so it keeps its seq: {ack}"
    );
    let want: BTreeSet<String> = ["slow", "next-1", "next-2"].map(String::from).into();
    let mut clients = vec![(late, "late", replayed)];
    if let Some(c) = ob {
        clients.push((c, "ob", Vec::new()));
    }
    for (mut c, who, earlier) in clients {
        let replayed: BTreeSet<String> = earlier
            .iter()
            .map(|m| m["cid"].as_str().unwrap().to_string())
            .collect();
        let rest: BTreeSet<String> = want.difference(&replayed).cloned().collect();
        let mut seen = read_until(
            &mut c,
            who,
            &room,
            &rest,
            &BTreeSet::new(),
            Duration::from_secs(5),
        )
        .await;
        seen.msgs.splice(0..0, earlier);
        assert_eq!(
            seen.seqs(),
            vec![slow_seq, slow_seq + 1, slow_seq + 2],
            "{who}: {:?}",
            seen.msgs
        );
        assert_no_more_msgs(&mut c, who, &room).await;
    }
    cluster.cleanup().await;
}

/// 8. `/readyz` of a cluster node names Redis, Kafka and MongoDB as ok.
#[tokio::test]
async fn readyz_names_every_cluster_service() {
    let cluster = Cluster::start(1).await;
    let (status, body) = cluster.nodes[0].get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    for service in ["redis", "kafka", "mongo"] {
        assert_eq!(body["dependencies"][service], "ok", "{service} in {body}");
    }
    cluster.cleanup().await;
}

/// Redis loses a room (its keys are deleted, as a restart without its file
/// would): the next message seeds the room above every stored seq, and a
/// retry of a cid accepted before the loss gets that message's id and seq,
/// whether the seeding took the cid back from MongoDB or, in a room marked
/// as recovering, the accept looks it up there. No second message is made.
#[tokio::test]
async fn a_cid_accepted_before_redis_lost_the_room_is_recognised() {
    let mut cluster = Cluster::start(1).await;
    let room = cluster.room("lost");
    let node = &cluster.nodes[0];
    let (token, _) = node.guest("ann").await;
    let mut ann = node.connect(&token).await;
    ann.join(&room).await;
    let cids: Vec<String> = (0..5).map(|i| format!("before-{i}")).collect();
    let mut acked = BTreeMap::new();
    for cid in &cids {
        let ack = ann.send_acked(&room, &text_of(cid), cid).await;
        acked.insert(
            cid.clone(),
            (
                ack["seq"].as_u64().unwrap(),
                ack["id"].as_str().unwrap().to_string(),
            ),
        );
    }
    cluster.wait_stored(&room, cids.len()).await;

    // Redis loses the room, its cid buckets (for the nodes' default cid
    // lifetime, 7 days) included.
    let mut redis = cluster.opts.redis().await;
    let buckets = keys::live_cid_buckets(&room, now_ms() as u64 / 1000, 7 * 24 * 3600);
    let _: () = redis::cmd("DEL")
        .arg(&keys::of_room(&room)[..])
        .arg(&buckets)
        .query_async(&mut redis)
        .await
        .unwrap();
    // Seeded again from MongoDB, which gives the cids back.
    let again = ann.send_acked(&room, "after", "after-0").await;
    let last = acked.values().map(|(seq, _)| *seq).max().unwrap();
    assert!(
        again["seq"].as_u64().unwrap() > last,
        "the seq went back: {again} after {last}"
    );
    let retry = ann
        .send_acked(&room, &text_of("before-0"), "before-0")
        .await;
    assert_eq!(
        (
            retry["seq"].as_u64().unwrap(),
            retry["id"].as_str().unwrap().to_string()
        ),
        acked["before-0"],
        "a retry after the loss: {retry}"
    );

    // A room whose cids were not all taken back: the memory of a cid is
    // gone, the room is recovering, and the accept asks MongoDB.
    for bucket in &buckets {
        let _: () = redis::cmd("HDEL")
            .arg(bucket)
            .arg(format!(
                "{}:before-1",
                ann.welcome["user"]["id"].as_str().unwrap()
            ))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg(keys::recovering(&room))
        .arg(1)
        .arg("EX")
        .arg(60)
        .query_async(&mut redis)
        .await
        .unwrap();
    let retry = ann
        .send_acked(&room, &text_of("before-1"), "before-1")
        .await;
    assert_eq!(
        (
            retry["seq"].as_u64().unwrap(),
            retry["id"].as_str().unwrap().to_string()
        ),
        acked["before-1"],
        "a retry in a recovering room: {retry}"
    );
    // A new cid in the recovering room is a new message.
    let fresh = ann.send_acked(&room, "fresh", "after-1").await;
    assert!(fresh["seq"].as_u64().unwrap() > again["seq"].as_u64().unwrap());

    // MongoDB ends with one message per cid.
    let stored = cluster.wait_stored(&room, cids.len() + 2).await;
    let mut per_cid: BTreeMap<String, usize> = BTreeMap::new();
    for d in &stored {
        *per_cid
            .entry(d.get_str("cid").unwrap().to_string())
            .or_default() += 1;
    }
    assert!(per_cid.values().all(|n| *n == 1), "{per_cid:?}");
    assert_eq!(stored.len(), cids.len() + 2, "{per_cid:?}");

    cluster.cleanup().await;
}
