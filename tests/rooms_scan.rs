//! The seeding scan of the Kafka log, and the paged room list.
//!
//! A new room's first message asks the log for the room's unstored records
//! through the node's one scan consumer, reading the room's partition
//! only, and no record at all when the persist group has stored the
//! partition up to its end. A room whose keys Redis lost still starts above
//! what the log holds. `GET /api/v1/rooms` answers in pages by name, in
//! both modes, and the room list forgets rooms gone from Redis.
//!
//! Cluster tests run on the local services (`scripts/services up`), each on
//! its own topic, consumer group, database and rooms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use scalable_chat::store::kafka_scan::partition_of;
use scalable_chat::store::keys;
use serde_json::Value;

/// How long a bounded wait of these tests may last before it fails.
const WITHIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- helpers

/// `POST /api/v1/rooms/{room}/messages`: the status and the body.
async fn post(node: &TestNode, token: &str, room: &str, cid: &str) -> (u16, Value) {
    node.post_message(token, room, &format!("text of {cid}"), cid)
        .await
}

/// Posts and expects the stored message back; returns its seq and id.
async fn posted(node: &TestNode, token: &str, room: &str, cid: &str) -> (u64, String) {
    let (status, body) = post(node, token, room, cid).await;
    assert_eq!(status, 201, "post {cid} to {room}: {body}");
    (
        body["seq"].as_u64().unwrap(),
        body["id"].as_str().unwrap().to_string(),
    )
}

async fn metric(node: &TestNode, name: &str) -> u64 {
    node.metric(name, &[]).await.unwrap_or(0.0) as u64
}

/// A cluster test's nodes, and what it leaves in the services.
struct Cluster {
    opts: ClusterOpts,
    node: TestNode,
    rooms: Vec<String>,
}

impl Cluster {
    /// One node with `roles` on its own topic, group and database.
    async fn start(roles: &[&str]) -> Cluster {
        Services::local().require().await;
        let mut opts = ClusterOpts::isolated();
        opts.roles = roles.iter().map(|r| r.to_string()).collect();
        let node = TestNode::start_cluster(&format!("t-{}", unique_tag()), &opts).await;
        Cluster {
            opts,
            node,
            rooms: Vec::new(),
        }
    }

    /// A room name no other test uses, removed from Redis at the end.
    fn room(&mut self, name: String) -> String {
        self.rooms.push(name.clone());
        name
    }

    /// Stops the node and removes the test's database, topic, group and
    /// Redis keys; failures are only reported.
    async fn cleanup(mut self) {
        self.node.kill9();
        let nodes = [self.node.opts.node_id.as_str()];
        self.opts.remove_leftovers(&self.rooms, nodes).await;
    }
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("Kafka admin client")
}

/// Whether the consumer group has committed every partition of the topic
/// up to its end.
fn group_caught_up(opts: &ClusterOpts) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &opts.kafka_brokers)
        .set("group.id", &opts.group)
        .create()
        .expect("Kafka consumer");
    let timeout = Duration::from_secs(5);
    let mut wanted = TopicPartitionList::new();
    for p in 0..opts.partitions {
        wanted.add_partition(&opts.topic, p);
    }
    let Ok(committed) = consumer.committed_offsets(wanted, timeout) else {
        return false;
    };
    (0..opts.partitions).all(|p| {
        let Ok((_, high)) = consumer.fetch_watermarks(&opts.topic, p, timeout) else {
            return false;
        };
        let at = committed.find_partition(&opts.topic, p).map(|e| e.offset());
        match at {
            Some(Offset::Offset(o)) => o >= high,
            _ => high == 0,
        }
    })
}

// ---------------------------------------------------------------- the scan

/// The partition the scan computes for a room is the one the producer
/// (librdkafka's default partitioner, as the node's producer uses it)
/// writes the room's records to.
#[tokio::test]
async fn a_rooms_records_are_in_the_partition_the_scan_reads() {
    Services::local().require().await;
    let opts = ClusterOpts::isolated();
    let partitions = 7;
    let admin = admin(&opts.kafka_brokers);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let topic = NewTopic::new(&opts.topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&topic], &options).await.unwrap() {
        r.unwrap();
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &opts.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    for i in 0..60 {
        let room = format!("room-{i}-{}", unique_tag());
        let record = FutureRecord::to(&opts.topic).key(&room).payload("x");
        let delivered = producer
            .send(record, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        assert_eq!(
            delivered.partition,
            partition_of(&room, partitions as usize),
            "room {room}"
        );
    }
    let _ = admin.delete_topics(&[&opts.topic], &options).await;
}

/// 200 messages, each to a new room, from one node whose persist role is
/// off (so that the log is never stored and every seeding has records to
/// look through): no consumer per room, and each seeding reads only its
/// room's partition, exactly the records produced there before it.
#[tokio::test]
async fn new_rooms_share_one_consumer_and_read_their_partition_only() {
    let mut cluster = Cluster::start(&["sweep"]).await;
    let (token, _) = cluster.node.guest("flood").await;
    let tag = unique_tag();
    let rooms: Vec<String> = (0..200)
        .map(|i| cluster.room(format!("fresh-{tag}-{i}")))
        .collect();
    let started = Instant::now();
    let mut earlier: BTreeMap<i32, u64> = BTreeMap::new();
    let mut expected_reads = 0;
    for room in &rooms {
        let (seq, _) = posted(&cluster.node, &token, room, "c-1").await;
        assert_eq!(seq, 1, "{room}");
        let p = partition_of(room, cluster.opts.partitions as usize);
        let before = earlier.entry(p).or_default();
        expected_reads += *before;
        *before += 1;
        assert!(
            started.elapsed() < 4 * WITHIN,
            "200 new rooms take too long"
        );
    }
    let node = &cluster.node;
    let consumers = metric(node, "scalable_chat_seed_scan_consumers_total").await;
    let checks = metric(node, "scalable_chat_seed_tail_checks_total").await;
    let reads = metric(node, "scalable_chat_seed_scan_records_total").await;
    assert!(consumers <= 1, "{consumers} scan consumers for 200 rooms");
    assert_eq!(checks, 200, "one look at the log per new room");
    // Reading every partition would read every earlier record: 19,900.
    assert_eq!(reads, expected_reads, "records read by the scans");
    cluster.cleanup().await;
}

/// When the persist group has stored the room's partition to its end, a
/// new room's seeding reads no record.
#[tokio::test]
async fn a_new_room_reads_nothing_when_the_log_is_stored() {
    let mut cluster = Cluster::start(&["persist", "sweep"]).await;
    let (token, _) = cluster.node.guest("ann").await;
    let tag = unique_tag();
    let first = cluster.room(format!("stored-{tag}-a"));
    posted(&cluster.node, &token, &first, "c-1").await;
    let deadline = Instant::now() + WITHIN;
    while !group_caught_up(&cluster.opts) {
        assert!(
            Instant::now() < deadline,
            "the persist group never caught up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scans = metric(&cluster.node, "scalable_chat_seed_scans_total").await;
    let checks = metric(&cluster.node, "scalable_chat_seed_tail_checks_total").await;
    let second = cluster.room(format!("stored-{tag}-b"));
    posted(&cluster.node, &token, &second, "c-1").await;
    assert_eq!(
        metric(&cluster.node, "scalable_chat_seed_tail_checks_total").await,
        checks + 1
    );
    assert_eq!(
        metric(&cluster.node, "scalable_chat_seed_scans_total").await,
        scans,
        "a scan read records of a stored log"
    );
    cluster.cleanup().await;
}

/// Redis loses a room (its keys are deleted) while its messages are in
/// Kafka and not in MongoDB (no persist role): the next message gets the
/// next seq above them, and a retry of an earlier cid gets its message.
#[tokio::test]
async fn a_room_lost_from_redis_starts_above_its_unstored_records() {
    let mut cluster = Cluster::start(&["sweep"]).await;
    let (token, _) = cluster.node.guest("ann").await;
    let room = cluster.room(format!("lost-{}", unique_tag()));
    let mut acked = BTreeMap::new();
    for i in 1..=5 {
        let cid = format!("c-{i}");
        acked.insert(
            cid.clone(),
            posted(&cluster.node, &token, &room, &cid).await,
        );
    }
    let mut redis = cluster.opts.redis().await;
    let _: () = redis::cmd("DEL")
        .arg(&keys::of_room(&room)[..])
        .query_async(&mut redis)
        .await
        .unwrap();
    let (seq, _) = posted(&cluster.node, &token, &room, "c-6").await;
    assert_eq!(seq, 6, "the seq after the loss");
    assert_eq!(
        posted(&cluster.node, &token, &room, "c-3").await,
        acked["c-3"],
        "a retry of a cid accepted before the loss"
    );
    cluster.cleanup().await;
}

// ---------------------------------------------------------------- the list

/// Every page of `GET /api/v1/rooms?limit=` from `after` on: each page's
/// names, and the `next` of each.
async fn pages(node: &TestNode, after: &str, limit: usize) -> Vec<(Vec<String>, Value)> {
    let mut out = Vec::new();
    let mut after = after.to_string();
    loop {
        let (status, body) = node
            .get_json(&format!("/api/v1/rooms?limit={limit}&after={after}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let names: Vec<String> = body["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect();
        let next = body["next"].clone();
        out.push((names, next.clone()));
        match next.as_str() {
            Some(n) => after = n.to_string(),
            None => return out,
        }
        assert!(out.len() < 50, "the pages never end: {out:?}");
    }
}

/// Creates 250 rooms named `prefix-NNN` (one message each), pages through
/// them 100 at a time from `prefix`, and checks 100/100/50, sorted, no
/// duplicates, `next` naming each page's last room, null at the end. The
/// prefix must sort after every other room of the list.
async fn pages_of_250(node: &TestNode, prefix: &str) {
    let (token, _) = node.guest("lister").await;
    let created: Vec<String> = (0..250).map(|i| format!("{prefix}-{i:03}")).collect();
    for room in &created {
        posted(node, &token, room, "c-1").await;
    }
    let got = pages(node, prefix, 100).await;
    let sizes: Vec<usize> = got.iter().map(|(names, _)| names.len()).collect();
    assert_eq!(sizes, vec![100, 100, 50], "page sizes");
    for (names, next) in &got[..2] {
        assert_eq!(next.as_str(), names.last().map(String::as_str), "next");
    }
    assert_eq!(got[2].1, Value::Null, "the last page's next");
    let all: Vec<String> = got.into_iter().flat_map(|(names, _)| names).collect();
    assert_eq!(all, created, "every room once, by name");

    // A client that ignores `next` gets the first 100 (of every room: in
    // cluster mode, other tests' rooms come first).
    let (status, body) = node.get_json("/api/v1/rooms").await;
    assert_eq!(status, 200, "{body}");
    let first = body["rooms"].as_array().unwrap();
    assert_eq!(first.len(), 100, "{body}");
    assert_eq!(body["next"], first[99]["name"], "{body}");
    let room = &first[0];
    assert!(
        room["name"].is_string() && room["members"].is_u64() && room["last_seq"].is_u64(),
        "{room}"
    );
}

/// Bad `limit` and `after` values are refused with 400 `bad_request`.
async fn bad_queries_are_refused(node: &TestNode) {
    let long = "a".repeat(65);
    let queries = [
        "limit=0".to_string(),
        "limit=501".to_string(),
        "limit=abc".to_string(),
        "limit=-1".to_string(),
        "after=".to_string(),
        format!("after={long}"),
        "after=Lobby".to_string(),
        "after=a%20b".to_string(),
        "after=%7Blobby%7D".to_string(),
    ];
    for q in queries {
        let resp = node
            .http()
            .get(node.url(&format!("/api/v1/rooms?{q}")))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{q}: {body}");
    }
    let (status, body) = node.get_json("/api/v1/rooms?limit=500").await;
    assert_eq!(status, 200, "limit=500: {body}");
}

/// The names `GET /api/v1/rooms` lists after `after`.
async fn listed(node: &TestNode, after: &str) -> BTreeSet<String> {
    let (_, body) = node.get_json(&format!("/api/v1/rooms?after={after}")).await;
    body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn standalone_rooms_come_in_pages_by_name() {
    let node = TestNode::start_default().await;
    pages_of_250(&node, "room").await;
    bad_queries_are_refused(&node).await;
}

/// In cluster mode the list is shared by every test on the services: the
/// rooms' names start with `zzzzzz-<tag>`, after every other test's (those
/// of this file start with `zzzz-`).
#[tokio::test]
async fn cluster_rooms_come_in_pages_by_name() {
    let mut cluster = Cluster::start(&["persist", "sweep"]).await;
    let prefix = format!("zzzzzz-{}", unique_tag());
    for i in 0..250 {
        cluster.room(format!("{prefix}-{i:03}"));
    }
    pages_of_250(&cluster.node, &prefix).await;
    bad_queries_are_refused(&cluster.node).await;
    cluster.cleanup().await;
}

/// A room whose keys are gone from Redis (expired after
/// `redis.room_idle_ttl_secs`) and that has no member leaves the list in
/// the sweep; a room that still has its seq stays.
#[tokio::test]
async fn the_sweep_removes_rooms_gone_from_redis_from_the_list() {
    let mut cluster = Cluster::start(&["persist", "sweep"]).await;
    let (token, _) = cluster.node.guest("ann").await;
    let prefix = format!("zzzz-{}", unique_tag());
    let gone = cluster.room(format!("{prefix}-gone"));
    let kept = cluster.room(format!("{prefix}-kept"));
    posted(&cluster.node, &token, &gone, "c-1").await;
    posted(&cluster.node, &token, &kept, "c-1").await;
    let names = listed(&cluster.node, &prefix).await;
    assert!(names.contains(&gone) && names.contains(&kept), "{names:?}");
    let mut redis = cluster.opts.redis().await;
    let _: () = redis::cmd("DEL")
        .arg(&keys::of_room(&gone)[..])
        .query_async(&mut redis)
        .await
        .unwrap();
    let deadline = Instant::now() + WITHIN;
    loop {
        let names = listed(&cluster.node, &prefix).await;
        if !names.contains(&gone) {
            assert!(names.contains(&kept), "{names:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{gone} is still listed: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.cleanup().await;
}

/// A room in the set earlier versions kept the room list in is listed
/// once a node with the sweep role has run.
#[tokio::test]
async fn rooms_of_the_earlier_room_set_are_listed() {
    Services::local().require().await;
    let opts = ClusterOpts::isolated();
    let room = format!("zzzz-{}-old", unique_tag());
    let mut redis = opts.redis().await;
    let _: () = redis::cmd("SET")
        .arg(keys::seq(&room))
        .arg(3)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SADD")
        .arg(keys::LEGACY_ROOMS)
        .arg(&room)
        .query_async(&mut redis)
        .await
        .unwrap();
    let cluster = Cluster {
        node: TestNode::start_cluster(&format!("t-{}", unique_tag()), &opts).await,
        opts,
        rooms: vec![room.clone()],
    };
    let deadline = Instant::now() + WITHIN;
    loop {
        let (_, body) = cluster
            .node
            .get_json(&format!("/api/v1/rooms?after={}", &room[..room.len() - 4]))
            .await;
        if body["rooms"][0]["name"] == room.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "{room} is not listed: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _: () = redis::cmd("SREM")
        .arg(keys::LEGACY_ROOMS)
        .arg(&room)
        .query_async(&mut redis)
        .await
        .unwrap();
    cluster.cleanup().await;
}
