//! Fault injection against the real services: Kafka, FerretDB and Redis
//! stopped and restarted under load, nodes killed with SIGKILL or drained
//! with SIGTERM, a persist worker (a persist-only node with one worker)
//! killed over and over, the nodes' relay cut off past the hold-back, and
//! a client that never reads.
//!
//! Every scenario counts what the clients were told (ack or `unavailable`)
//! and checks MongoDB at the end: no acked message lost, no duplicate
//! document, and every connection's view of a room in `seq` order.
//!
//! The scenarios stop and start the shared services with `scripts/services`
//! (or take long, or compare timings), so they are `#[ignore]`d in the
//! normal `cargo test` and run one at a time by `make test-faults`
//! (`cargo test --test faults -- --include-ignored --test-threads=1`), which
//! starts the services first, and as the last step of `make test` (with
//! `--ignored`, the services already up). Only the SIGTERM drain (a few
//! seconds, no service stopped) runs in the normal `cargo test`. They read the
//! service ports from REDIS_PORT, KAFKA_PORT, KAFKA_CONTROLLER_PORT and
//! MONGO_PORT, like `scripts/services`, and pass them on to it. Each prints
//! one `FAULTS` line with its figures (run with `--nocapture` to see it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use futures_util::{SinkExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use scalable_chat::store::keys;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------- services

/// `scripts/services` of this checkout.
fn services_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services")
}

/// Runs `scripts/services ARGS` (with the same port variables as the tests),
/// bounded to 240 s; panics unless it succeeds. Returns how long it took.
async fn services(args: &[&str]) -> Duration {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("240")
            .arg(services_script())
            .args(&args)
            .output()
            .expect("run scripts/services")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "scripts/services failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Makes sure every service answers, starting them when one does not (for a
/// scenario that follows one that failed half-way with a service stopped).
async fn services_up() {
    let all_answer = tokio::task::spawn_blocking(|| {
        Command::new("timeout")
            .arg("60")
            .arg(services_script())
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await
    .unwrap();
    if !all_answer {
        services(&["up"]).await;
    }
    Services::local().require().await;
}

/// Where `scripts/services` keeps Redis's data (its append-only files).
fn redis_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".services/redis")
}

/// Removes Redis's persisted data (RDB snapshot and append-only files);
/// only while Redis is stopped.
fn wipe_redis_data() {
    let dir = redis_data_dir();
    let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
    let _ = std::fs::remove_file(dir.join("dump.rdb"));
    let _ = std::fs::remove_file(dir.join("appendonly.aof"));
}

// ---------------------------------------------------------------- cluster

/// One scenario's nodes on its own topic, consumer group and database.
struct Faulty {
    opts: ClusterOpts,
    nodes: Vec<Node>,
    room: String,
    /// Other rooms the scenario used, removed from Redis too.
    more_rooms: Vec<String>,
}

impl Faulty {
    /// Starts one node per entry of `roles` (all at once).
    async fn start(what: &str, roles: &[&[&str]], env: &[(&str, &str)]) -> Faulty {
        Services::local().require().await;
        let opts = ClusterOpts::isolated();
        let tag = unique_tag();
        let starts = roles.iter().enumerate().map(|(i, r)| {
            let mut cluster = opts.clone();
            cluster.roles = r.iter().map(|s| s.to_string()).collect();
            Node::start(NodeOpts {
                node_id: format!("f-{tag}-{}", char::from(b'a' + i as u8)),
                cluster: Some(cluster),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..NodeOpts::default()
            })
        });
        let nodes = join_all(starts).await;
        Faulty {
            opts,
            nodes,
            room: format!("{what}-{}", unique_tag()),
            more_rooms: Vec::new(),
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    async fn tokens(&self, n: usize, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..n {
            let (token, _) = self.nodes[i % self.nodes.len()]
                .guest(&format!("{prefix}{i}"))
                .await;
            out.push(token);
        }
        out
    }

    /// Removes what the scenario left in the services; failures are only
    /// reported.
    async fn cleanup(mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
        let work = async {
            let client = mongo_client(&self.opts).await;
            if let Err(e) = client.database(&self.opts.database).drop().await {
                eprintln!("cleanup: dropping {}: {e}", self.opts.database);
            }
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &self.opts.kafka_brokers)
                .create()
                .expect("Kafka admin client");
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            if let Err(e) = admin.delete_topics(&[&self.opts.topic], &options).await {
                eprintln!("cleanup: deleting topic {}: {e}", self.opts.topic);
            }
            let _ = admin.delete_groups(&[&self.opts.group], &options).await;
            let redis = redis::Client::open(self.opts.redis_url.as_str()).unwrap();
            if let Ok(mut conn) = redis.get_multiplexed_async_connection().await {
                let mut pipe = redis::pipe();
                for room in std::iter::once(&self.room).chain(&self.more_rooms) {
                    pipe.del(&keys::of_room(room)).srem(keys::ROOMS, room);
                }
                for node in &self.nodes {
                    pipe.del(keys::node_rooms(&node.opts.node_id))
                        .zrem(keys::NODES, &node.opts.node_id);
                }
                let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .is_err()
        {
            eprintln!("cleanup did not finish within 30 s");
        }
    }
}

/// What MongoDB holds of a room compared with what was acked.
#[derive(Debug, Default)]
struct Stored {
    /// Documents of the room.
    docs: usize,
    /// Acked messages (cid) with no document of the same id and seq.
    lost: Vec<String>,
    /// Documents beyond the first with the same (user, cid) or the same seq.
    duplicates: usize,
    /// From the call until every acked message was there (or the limit).
    drained_in: Duration,
    /// The cids of the room's documents.
    cids: BTreeSet<String>,
}

/// Polls MongoDB (at most `within`) until every acked message of the room is
/// stored, then compares.
async fn check_stored(
    opts: &ClusterOpts,
    room: &str,
    acked: &BTreeMap<String, (u64, String)>,
    within: Duration,
) -> Stored {
    let coll = mongo_client(opts)
        .await
        .database(&opts.database)
        .collection::<Document>("messages");
    let started = Instant::now();
    loop {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            coll.find(doc! { "room": room })
                .await?
                .try_collect::<Vec<Document>>()
                .await
        })
        .await;
        let docs = match found {
            Ok(Ok(docs)) => docs,
            Ok(Err(e)) => {
                eprintln!("MongoDB find: {e}");
                Vec::new()
            }
            Err(_) => {
                eprintln!("MongoDB find took more than 30 s");
                Vec::new()
            }
        };
        let by_id: BTreeMap<String, i64> = docs
            .iter()
            .map(|d| {
                (
                    d.get_str("_id").unwrap_or_default().to_string(),
                    bson_int(d.get("seq")),
                )
            })
            .collect();
        let lost: Vec<String> = acked
            .iter()
            .filter(|(_, (seq, id))| by_id.get(id) != Some(&(*seq as i64)))
            .map(|(cid, _)| cid.clone())
            .collect();
        if lost.is_empty() || started.elapsed() > within {
            let mut seqs = BTreeSet::new();
            let mut cids = BTreeSet::new();
            let mut duplicates = 0;
            let mut all_cids = BTreeSet::new();
            for d in &docs {
                let user = d
                    .get_document("user")
                    .ok()
                    .and_then(|u| u.get_str("id").ok())
                    .unwrap_or_default()
                    .to_string();
                let cid = d.get_str("cid").unwrap_or_default().to_string();
                all_cids.insert(cid.clone());
                let fresh_seq = seqs.insert(bson_int(d.get("seq")));
                let fresh_cid = cids.insert((user, cid));
                if !(fresh_seq && fresh_cid) {
                    duplicates += 1;
                }
            }
            return Stored {
                docs: docs.len(),
                lost,
                duplicates,
                drained_in: started.elapsed(),
                cids: all_cids,
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------- clients

/// What one simulated client does.
#[derive(Clone)]
struct Plan {
    name: String,
    room: String,
    token: String,
    cids: Vec<String>,
    /// Most sends waiting for an answer at once.
    window: usize,
    /// Least time between two sends.
    pace: Duration,
    /// Send a cid again this long after `unavailable`; `None`: give it up.
    retry_after: Option<Duration>,
    /// Characters of each text.
    text_len: usize,
    /// When the connection ends: `true` stops (the drain scenario), `false`
    /// reconnects to the next node and resumes with `join since`.
    stop_on_close: bool,
    /// The node to use first (index into the shared ports).
    home: usize,
    within: Duration,
}

/// What one simulated client saw.
#[derive(Debug, Default)]
struct Outcome {
    name: String,
    acked: BTreeMap<String, (u64, String)>,
    /// `unavailable` answers to sends (retries included).
    unavailable: usize,
    /// cids answered `unavailable` at least once.
    unavailable_cids: BTreeSet<String>,
    /// cids given up after `unavailable` (no retry).
    refused: BTreeSet<String>,
    /// Other refusals, verbatim.
    errors: Vec<String>,
    /// The `seq`s of the room's `msg` frames, per connection, in arrival order.
    conns: Vec<Vec<u64>>,
    reconnects: usize,
    /// cids with no answer when the connection ended (stop_on_close).
    unanswered: Vec<String>,
    /// cids neither acked nor refused by the deadline.
    gave_up: Vec<String>,
    /// Send to ack, for acks of first attempts.
    latencies_ms: Vec<f64>,
    /// Acks that came after a reconnect or a retry.
    retried_acks: usize,
    /// When each ack arrived, with its seq.
    ack_times: Vec<(Instant, u64)>,
    /// The longest wait for an answer (ack or `unavailable`) to one attempt.
    slowest_answer: Duration,
    /// How many `msg` frames of each connection were its join replay.
    replayed: Vec<usize>,
}

impl Outcome {
    fn seen(&self) -> BTreeSet<u64> {
        self.conns.iter().flatten().copied().collect()
    }

    /// Each connection's view is strictly increasing.
    fn order_violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, c) in self.conns.iter().enumerate() {
            for (k, w) in c.windows(2).enumerate() {
                if w[0] >= w[1] {
                    let around = &c[k.saturating_sub(12)..(k + 14).min(c.len())];
                    out.push(format!(
                        "{} conn {i} (its first {} seqs were the join replay): {} then {}; around it: {around:?}",
                        self.name,
                        self.replayed.get(i).copied().unwrap_or(0),
                        w[0],
                        w[1]
                    ));
                }
            }
        }
        out
    }
}

fn ws_url(port: u16, token: &str) -> String {
    let mut enc = String::new();
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("ws://127.0.0.1:{port}/ws?token={enc}")
}

/// A connection with its `welcome` read, or `None` (bounded to 5 s).
async fn try_connect(port: u16, token: &str) -> Option<Client> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(ws_url(port, token)),
    )
    .await
    .ok()?
    .ok()?;
    Client::welcomed(ws, Duration::from_secs(5)).await.ok()
}

/// `join since`: the replayed seqs, or `None` when refused or closed.
async fn try_join(c: &mut Client, room: &str, since: u64) -> Option<Vec<u64>> {
    let frame = json!({ "op": "join", "room": room, "since": since });
    if tokio::time::timeout(
        Duration::from_secs(5),
        c.ws.send(Message::Text(frame.to_string())),
    )
    .await
    .ok()?
    .is_err()
    {
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut replay = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left).await {
            Event::Json(v) if v["op"] == "msg" && v["room"] == room => {
                replay.push(v["seq"].as_u64().unwrap());
            }
            Event::Json(v) if v["op"] == "joined" && v["room"] == room => return Some(replay),
            Event::Json(v) if v["op"] == "error" && v["ref"] == "join" => return None,
            Event::Json(_) | Event::Other(_) => {}
            _ => return None,
        }
    }
}

/// Runs one client's plan; returns what it saw and its last connection (if
/// it still has one).
async fn drive(plan: Plan, ports: Arc<Mutex<Vec<u16>>>) -> (Outcome, Option<Client>) {
    let mut out = Outcome {
        name: plan.name.clone(),
        ..Outcome::default()
    };
    let deadline = Instant::now() + plan.within;
    let text = |cid: &str| {
        let mut t = format!("{} {cid} ", plan.name);
        while t.len() < plan.text_len {
            t.push('x');
        }
        t
    };
    let mut fresh: VecDeque<String> = plan.cids.iter().cloned().collect();
    let mut retries: VecDeque<(String, Instant)> = VecDeque::new();
    let mut in_flight: BTreeMap<String, (Instant, bool)> = BTreeMap::new();
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    let mut last_seq = 0u64;
    let mut next_port = plan.home;
    let mut connections = 0;
    'connect: loop {
        if Instant::now() > deadline {
            break;
        }
        // Connect to the next node that answers and join the room.
        let list = ports.lock().unwrap().clone();
        let port = list[next_port % list.len()];
        let Some(mut c) = try_connect(port, &plan.token).await else {
            next_port += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Some(replay) = try_join(&mut c, &plan.room, last_seq).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if connections > 0 {
            out.reconnects += 1;
        }
        connections += 1;
        out.replayed.push(replay.len());
        let mut seen = replay;
        if let Some(m) = seen.last() {
            last_seq = last_seq.max(*m);
        }
        // What was in flight on the old connection is sent again.
        for (cid, _) in std::mem::take(&mut in_flight).into_iter().rev() {
            retries.push_front((cid, Instant::now()));
        }
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if fresh.is_empty() && retries.is_empty() && in_flight.is_empty() {
                out.conns.push(seen);
                return (out, Some(c));
            }
            if now > deadline {
                out.conns.push(seen);
                break 'connect;
            }
            // Send what the window and the pace allow.
            let mut closed = false;
            while in_flight.len() < plan.window && Instant::now() >= next_send {
                let cid = if retries.front().is_some_and(|(_, at)| *at <= Instant::now()) {
                    retries.pop_front().unwrap().0
                } else if let Some(cid) = fresh.pop_front() {
                    cid
                } else {
                    break;
                };
                let first = attempted.insert(cid.clone());
                let frame =
                    json!({ "op": "send", "room": plan.room, "text": text(&cid), "cid": cid });
                in_flight.insert(cid.clone(), (Instant::now(), first));
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.ws.send(Message::Text(frame.to_string())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    closed = true;
                    break;
                }
                next_send = Instant::now() + plan.pace;
            }
            let mut wait = Duration::from_millis(200);
            if in_flight.len() < plan.window {
                if !fresh.is_empty() {
                    wait = wait.min(next_send.saturating_duration_since(Instant::now()));
                }
                if let Some((_, at)) = retries.front() {
                    wait = wait.min(at.saturating_duration_since(Instant::now()));
                }
            }
            let event = if closed {
                Event::Closed(None)
            } else {
                c.next_event(wait.max(Duration::from_millis(1))).await
            };
            match event {
                Event::Json(v) => match v["op"].as_str() {
                    Some("msg") if v["room"] == plan.room => {
                        let seq = v["seq"].as_u64().unwrap();
                        seen.push(seq);
                        last_seq = last_seq.max(seq);
                    }
                    Some("ack") if v["room"] == plan.room => {
                        let cid = v["cid"].as_str().unwrap().to_string();
                        let got_seq = v["seq"].as_u64().unwrap();
                        let got = (got_seq, v["id"].as_str().unwrap().into());
                        if let Some(prev) = out.acked.get(&cid) {
                            if *prev != got {
                                out.errors
                                    .push(format!("{cid}: acked as {prev:?} and {got:?}"));
                            }
                        }
                        if let Some((at, first)) = in_flight.remove(&cid) {
                            out.slowest_answer = out.slowest_answer.max(at.elapsed());
                            if first && connections == 1 {
                                out.latencies_ms.push(at.elapsed().as_secs_f64() * 1000.0);
                            } else {
                                out.retried_acks += 1;
                            }
                        }
                        out.acked.insert(cid, got);
                        out.ack_times.push((Instant::now(), got_seq));
                    }
                    Some("error") => {
                        let r = v["ref"].as_str().unwrap_or_default().to_string();
                        let attempt = in_flight.remove(&r);
                        if let (true, Some((at, _))) = (v["code"] == "unavailable", attempt) {
                            out.slowest_answer = out.slowest_answer.max(at.elapsed());
                            out.unavailable += 1;
                            out.unavailable_cids.insert(r.clone());
                            match plan.retry_after {
                                Some(d) => retries.push_back((r, Instant::now() + d)),
                                None => {
                                    out.refused.insert(r);
                                }
                            }
                        } else {
                            out.errors.push(v.to_string());
                        }
                    }
                    _ => {}
                },
                Event::Timeout | Event::Other(_) => {}
                Event::Closed(_) | Event::Error(_) => {
                    out.conns.push(seen);
                    if plan.stop_on_close {
                        out.unanswered = in_flight.keys().cloned().collect();
                        out.gave_up = fresh
                            .into_iter()
                            .chain(retries.into_iter().map(|r| r.0))
                            .collect();
                        return (out, None);
                    }
                    next_port += 1;
                    continue 'connect;
                }
            }
        }
    }
    out.gave_up = fresh
        .into_iter()
        .chain(retries.into_iter().map(|r| r.0))
        .chain(in_flight.into_keys())
        .collect();
    (out, None)
}

/// Runs every plan at once.
async fn drive_all(
    plans: Vec<Plan>,
    ports: &Arc<Mutex<Vec<u16>>>,
) -> Vec<(Outcome, Option<Client>)> {
    join_all(plans.into_iter().map(|p| {
        let ports = ports.clone();
        async move { drive(p, ports).await }
    }))
    .await
}

/// Reads on each client's last connection until it has seen (across its
/// connections) every seq in `all`, at most `within` in all; returns the
/// seqs still missing per client.
async fn settle(
    results: &mut [(Outcome, Option<Client>)],
    room: &str,
    all: &BTreeSet<u64>,
    within: Duration,
) -> BTreeMap<String, Vec<u64>> {
    let deadline = Instant::now() + within;
    let mut missing = BTreeMap::new();
    for (out, client) in results.iter_mut() {
        if let Some(c) = client.as_mut() {
            let last = out.conns.len() - 1;
            // Each client reads at least 3 s, whatever the others took.
            let until = deadline.max(Instant::now() + Duration::from_secs(3));
            while !all.is_subset(&out.seen()) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match c.next_event(left).await {
                    Event::Json(v) if v["op"] == "msg" && v["room"] == room => {
                        out.conns[last].push(v["seq"].as_u64().unwrap());
                    }
                    Event::Json(_) | Event::Other(_) => {}
                    _ => break,
                }
            }
        }
        let seen = out.seen();
        let m: Vec<u64> = all.difference(&seen).copied().collect();
        if !m.is_empty() {
            missing.insert(out.name.clone(), m);
        }
    }
    missing
}

/// A fresh connection's `join since 0`: every seq the room's history holds.
async fn history_seqs(port: u16, token: &str, room: &str) -> Vec<u64> {
    let mut c = try_connect(port, token).await.expect("connect for history");
    let seqs = try_join(&mut c, room, 0)
        .await
        .expect("join since 0 for history");
    c.close().await;
    seqs
}

/// The figures of a run, summed over clients.
#[derive(Debug, Default)]
struct Totals {
    sends: usize,
    acked: usize,
    unavailable: usize,
    unavailable_cids: usize,
    refused: usize,
    unanswered: usize,
    gave_up: usize,
    reconnects: usize,
    errors: Vec<String>,
    order: Vec<String>,
    acked_map: BTreeMap<String, (u64, String)>,
    p50_ms: f64,
    p99_ms: f64,
    slowest_answer: Duration,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn totals(results: &[(Outcome, Option<Client>)], sends: usize) -> Totals {
    let mut t = Totals {
        sends,
        ..Totals::default()
    };
    let mut lat = Vec::new();
    for (o, _) in results {
        t.acked += o.acked.len();
        t.unavailable += o.unavailable;
        t.unavailable_cids += o.unavailable_cids.len();
        t.refused += o.refused.len();
        t.unanswered += o.unanswered.len();
        t.gave_up += o.gave_up.len();
        t.reconnects += o.reconnects;
        t.slowest_answer = t.slowest_answer.max(o.slowest_answer);
        t.errors.extend(o.errors.iter().cloned());
        t.order.extend(o.order_violations());
        t.acked_map.extend(o.acked.clone());
        lat.extend(o.latencies_ms.iter().copied());
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t.p50_ms = percentile(&lat, 0.5);
    t.p99_ms = percentile(&lat, 0.99);
    t
}

/// Acks that arrived between `from` and `to`.
fn acks_between(results: &[(Outcome, Option<Client>)], from: Instant, to: Instant) -> usize {
    results
        .iter()
        .flat_map(|(o, _)| &o.ack_times)
        .filter(|(t, _)| *t >= from && *t <= to)
        .count()
}

/// The seqs of the acks that arrived before `at`, and of those after it.
fn acked_seqs_around(results: &[(Outcome, Option<Client>)], at: Instant) -> (Vec<u64>, Vec<u64>) {
    let all = results.iter().flat_map(|(o, _)| &o.ack_times);
    let before = all
        .clone()
        .filter(|(t, _)| *t < at)
        .map(|(_, s)| *s)
        .collect();
    let after = all.filter(|(t, _)| *t >= at).map(|(_, s)| *s).collect();
    (before, after)
}

/// Two acks with the same seq (a seq given twice).
fn shared_seqs(acked: &BTreeMap<String, (u64, String)>) -> Vec<u64> {
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for (seq, _) in acked.values() {
        *by_seq.entry(*seq).or_default() += 1;
    }
    by_seq
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(s, _)| s)
        .collect()
}

fn plans(room: &str, tokens: &[String], per_client: usize, tweak: impl Fn(&mut Plan)) -> Vec<Plan> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let name = format!("c{i}");
            let mut p = Plan {
                name: name.clone(),
                room: room.to_string(),
                token: token.clone(),
                cids: (0..per_client).map(|k| format!("{name}-{k}")).collect(),
                window: 10,
                pace: Duration::from_millis(20),
                retry_after: Some(Duration::from_secs(1)),
                text_len: 40,
                stop_on_close: false,
                home: i,
                within: Duration::from_secs(240),
            };
            tweak(&mut p);
            p
        })
        .collect()
}

/// The common end of a scenario: nothing acked lost, no duplicate, every
/// view in order, no other error. Prints the figures.
fn assert_clean(scenario: &str, t: &Totals, s: &Stored, extra: &str) {
    eprintln!(
        "FAULTS {scenario}: sends {} acked {} unavailable-answers {} (cids {}) refused {} \
         unanswered {} gave-up {} reconnects {} stored {} lost {} duplicates {} \
         drained-in {:.1}s ack-p50 {:.1}ms ack-p99 {:.1}ms slowest-answer {:.1}s {extra}",
        t.sends,
        t.acked,
        t.unavailable,
        t.unavailable_cids,
        t.refused,
        t.unanswered,
        t.gave_up,
        t.reconnects,
        s.docs,
        s.lost.len(),
        s.duplicates,
        s.drained_in.as_secs_f64(),
        t.p50_ms,
        t.p99_ms,
        t.slowest_answer.as_secs_f64(),
    );
    assert!(
        t.errors.is_empty(),
        "{scenario}: unexpected errors: {:?}",
        t.errors
    );
    assert!(
        t.order.is_empty(),
        "{scenario}: views out of seq order: {:?}",
        t.order
    );
    assert!(
        s.lost.is_empty(),
        "{scenario}: {} acked messages are not in MongoDB (first: {:?})",
        s.lost.len(),
        &s.lost[..s.lost.len().min(10)]
    );
    assert_eq!(s.duplicates, 0, "{scenario}: duplicate documents");
    let shared = shared_seqs(&t.acked_map);
    assert!(
        shared.is_empty(),
        "{scenario}: seqs acked for two cids: {shared:?}"
    );
}

// ---------------------------------------------------------------- 1. Kafka

/// 1. Kafka stopped for 30 s while 10 clients send 100 messages each: every
/// send gets `ack` or `unavailable`; the clients retry the same cids, and
/// once Kafka is back MongoDB holds each message once.
#[tokio::test]
#[ignore = "stops Kafka for 30 s: make test-faults"]
async fn kafka_stopped_30s_every_send_acked_or_unavailable_then_stored_once() {
    services_up().await;
    let f = Faulty::start(
        "kafka-out",
        &[&["persist", "sweep"], &["persist", "sweep"]],
        &[],
    )
    .await;
    let tokens = f.tokens(10, "k").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    // 100 messages over about 10 s per client; Kafka goes away after 2 s.
    let plans = plans(&f.room, &tokens, 100, |p| {
        p.pace = Duration::from_millis(100);
        p.retry_after = Some(Duration::from_secs(2));
    });
    let load = drive_all(plans, &ports);
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stop = services(&["stop", "kafka"]).await;
        let down_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let start = services(&["start", "kafka"]).await;
        (stop, down_at.elapsed(), start)
    };
    let began = Instant::now();
    let (mut results, (stop, down, start)) = tokio::join!(load, fault);
    let run = began.elapsed();
    let t = totals(&results, 1000);
    let all: BTreeSet<u64> = t.acked_map.values().map(|(s, _)| *s).collect();
    let missing = settle(&mut results, &f.room, &all, Duration::from_secs(20)).await;
    let s = check_stored(&f.opts, &f.room, &t.acked_map, Duration::from_secs(60)).await;
    assert_clean(
        "1 kafka-stopped-30s",
        &t,
        &s,
        &format!(
            "run {:.1}s stop {:.1}s down-until-ready {:.1}s start {:.1}s live-missing {}",
            run.as_secs_f64(),
            stop.as_secs_f64(),
            down.as_secs_f64(),
            start.as_secs_f64(),
            missing.values().map(Vec::len).sum::<usize>()
        ),
    );
    assert!(
        t.unavailable > 0,
        "no send was answered unavailable while Kafka was down"
    );
    assert_eq!(t.gave_up, 0, "sends with neither ack nor unavailable");
    assert!(
        t.slowest_answer <= Duration::from_secs(15),
        "a send waited {:?} for its answer (kafka.message_timeout_ms is 10 s)",
        t.slowest_answer
    );
    assert_eq!(t.acked, 1000, "every cid acked after retries");
    assert_eq!(s.docs, 1000, "MongoDB holds each message once");
    assert!(
        missing.is_empty(),
        "clients missing acked messages: {missing:?}"
    );
    f.cleanup().await;
}

/// 1b. Kafka stopped while many sends are in flight: each is answered
/// within `kafka.message_timeout_ms` and a little, `ack` or `unavailable`.
/// librdkafka held the reports of messages in flight to the stopping
/// broker for about twice the message timeout.
#[tokio::test]
#[ignore = "stops Kafka: make test-faults"]
async fn kafka_stopped_under_load_every_send_answered_within_the_message_timeout() {
    const CLIENTS: usize = 10;
    const PER_CLIENT: usize = 250;
    services_up().await;
    let f = Faulty::start("kafka-inflight", &[&["sweep"], &["sweep"]], &[]).await;
    let tokens = f.tokens(CLIENTS, "i").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    // 50 sends per second per client, no retries: about 5 s of sends.
    let plans = plans(&f.room, &tokens, PER_CLIENT, |p| {
        p.pace = Duration::from_millis(20);
        p.retry_after = None;
        p.within = Duration::from_secs(240);
    });
    let load = drive_all(plans, &ports);
    // Kafka away for 15 s, then back for the sends still to come.
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stop = services(&["stop", "kafka"]).await;
        tokio::time::sleep(Duration::from_secs(15)).await;
        (stop, services(&["start", "kafka"]).await)
    };
    let (results, (stop, start)) = tokio::join!(load, fault);
    let t = totals(&results, CLIENTS * PER_CLIENT);
    eprintln!(
        "FAULTS 1b kafka-stopped-in-flight: sends {} acked {} unavailable {} gave-up {} \
         slowest-answer {:.1}s stop {:.1}s start {:.1}s",
        t.sends,
        t.acked,
        t.unavailable,
        t.gave_up,
        t.slowest_answer.as_secs_f64(),
        stop.as_secs_f64(),
        start.as_secs_f64(),
    );
    assert!(t.errors.is_empty(), "unexpected errors: {:?}", t.errors);
    assert_eq!(t.gave_up, 0, "sends with neither ack nor unavailable");
    assert_eq!(t.acked + t.unavailable, CLIENTS * PER_CLIENT);
    assert!(
        t.unavailable > 0,
        "no send was refused while Kafka was away"
    );
    assert!(
        t.slowest_answer <= Duration::from_secs(13),
        "a send waited {:?} for its answer (kafka.message_timeout_ms is 10 s)",
        t.slowest_answer
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------- 2. MongoDB

/// 2. FerretDB stopped for 30 s under load: acks go on, history has no hole,
/// and the backlog drains once it is back.
#[tokio::test]
#[ignore = "stops FerretDB for 30 s: make test-faults"]
async fn mongo_stopped_30s_acks_continue_and_backlog_drains() {
    services_up().await;
    let f = Faulty::start(
        "mongo-out",
        &[&["persist", "sweep"], &["persist", "sweep"]],
        &[],
    )
    .await;
    let tokens = f.tokens(10, "m").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    // Seed the room while MongoDB is up (its first message reads MongoDB).
    {
        let mut c = try_connect(f.nodes[0].port, &tokens[0]).await.unwrap();
        try_join(&mut c, &f.room, 0).await.unwrap();
        c.send_acked(&f.room, "first", "seed").await;
        c.close().await;
    }
    // 10 clients, 300 messages each over about 36 s; FerretDB away after 2 s.
    let plans = plans(&f.room, &tokens, 300, |p| {
        p.pace = Duration::from_millis(120);
        p.retry_after = None;
    });
    let load = drive_all(plans, &ports);
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        services(&["stop", "mongo"]).await;
        let down_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(30)).await;
        services(&["start", "mongo"]).await;
        (down_at, Instant::now())
    };
    let (mut results, (down_at, back)) = tokio::join!(load, fault);
    let down = back - down_at;
    let during = acks_between(&results, down_at, back);
    let t = totals(&results, 3000);
    let all: BTreeSet<u64> = t.acked_map.values().map(|(s, _)| *s).collect();
    let missing = settle(&mut results, &f.room, &all, Duration::from_secs(20)).await;
    let s = check_stored(&f.opts, &f.room, &t.acked_map, Duration::from_secs(120)).await;
    let drained = back.elapsed();
    let history = history_seqs(f.nodes[1].port, &tokens[1], &f.room).await;
    let hset: BTreeSet<u64> = history.iter().copied().collect();
    let holes: Vec<u64> = all.difference(&hset).copied().collect();
    assert_clean(
        "2 mongo-stopped-30s",
        &t,
        &s,
        &format!(
            "down {:.1}s acks-while-down {during} backlog-stored {:.1}s-after-restart history {} holes {} live-missing {}",
            down.as_secs_f64(),
            drained.as_secs_f64(),
            history.len(),
            holes.len(),
            missing.values().map(Vec::len).sum::<usize>()
        ),
    );
    assert_eq!(
        t.unavailable, 0,
        "sends answered unavailable while only MongoDB was down"
    );
    assert_eq!(t.acked, 3000, "every send acked");
    assert!(during >= 1000, "only {during} acks while MongoDB was down");
    assert!(holes.is_empty(), "history lacks acked seqs: {holes:?}");
    assert_strictly_increasing(&history, "history");
    assert!(
        missing.is_empty(),
        "clients missing acked messages: {missing:?}"
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------- 3. Redis

/// Sends probes from node 0 until one reaches a client on node 1; returns
/// how long that took.
async fn cross_node_delivery(
    sender: &mut Client,
    receiver: &mut Client,
    room: &str,
    tag: &str,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < within {
        n += 1;
        let cid = format!("{tag}-probe-{n}");
        let frame = json!({ "op": "send", "room": room, "text": "probe", "cid": cid });
        if sender
            .ws
            .send(Message::Text(frame.to_string()))
            .await
            .is_err()
        {
            return None;
        }
        let until = Instant::now() + Duration::from_millis(200);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match receiver.next_event(left).await {
                Event::Json(v) if v["op"] == "msg" && v["cid"] == cid => {
                    return Some(started.elapsed())
                }
                Event::Json(_) | Event::Other(_) | Event::Timeout => {}
                _ => return None,
            }
        }
        // Drain the sender's answers.
        while let Event::Json(_) = sender.next_event(Duration::from_millis(1)).await {}
    }
    None
}

async fn redis_restart(empty: bool) {
    let (what, label) = if empty {
        ("redis-empty", "3b redis-restarted-empty")
    } else {
        ("redis-restart", "3a redis-restarted")
    };
    let f = Faulty::start(what, &[&["persist", "sweep"], &["persist", "sweep"]], &[]).await;
    let tokens = f.tokens(10, "r").await;
    let (ptoken, _) = f.nodes[0].guest("probe-a").await;
    let (qtoken, _) = f.nodes[1].guest("probe-b").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    let mut pa = try_connect(f.nodes[0].port, &ptoken).await.unwrap();
    let mut pb = try_connect(f.nodes[1].port, &qtoken).await.unwrap();
    try_join(&mut pa, &f.room, 0).await.unwrap();
    try_join(&mut pb, &f.room, 0).await.unwrap();
    let reconnects_before = f.nodes[1]
        .metric("scalable_chat_redis_reconnects_total", &[])
        .await
        .unwrap_or(0.0);

    let plans = plans(&f.room, &tokens, 200, |p| {
        p.pace = Duration::from_millis(50);
        p.retry_after = Some(Duration::from_millis(500));
    });
    let load = drive_all(plans, &ports);
    let fault = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stopping = Instant::now();
        services(&["stop", "redis"]).await;
        if empty {
            wipe_redis_data();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        services(&["start", "redis"]).await;
        let started = Instant::now();
        // Cross-node delivery comes back: a probe from node a reaches node b.
        let back =
            cross_node_delivery(&mut pa, &mut pb, &f.room, what, Duration::from_secs(30)).await;
        (back, stopping, started)
    };
    let (mut results, (resumed, stopping, started)) = tokio::join!(load, fault);
    let (before, _) = acked_seqs_around(&results, stopping);
    let (_, after) = acked_seqs_around(&results, started + Duration::from_secs(1));
    let max_before = before.iter().max().copied().unwrap_or(0);
    let min_after = after.iter().min().copied().unwrap_or(u64::MAX);
    let reconnects = f.nodes[1]
        .metric("scalable_chat_redis_reconnects_total", &[])
        .await
        .unwrap_or(0.0)
        - reconnects_before;
    let t = totals(&results, 2000);
    let mut acked = t.acked_map.clone();
    // The probes acked count as acked messages too; read them from history.
    let all: BTreeSet<u64> = acked.values().map(|(s, _)| *s).collect();
    let missing = settle(&mut results, &f.room, &all, Duration::from_secs(20)).await;
    let history = history_seqs(f.nodes[0].port, &tokens[0], &f.room).await;
    let hset: BTreeSet<u64> = history.iter().copied().collect();
    let holes: Vec<u64> = all.difference(&hset).copied().collect();
    // What a client resuming just below the first seq that some client
    // missed would be replayed.
    let first_missing = missing.values().filter_map(|m| m.first()).min().copied();
    let resume_holes: Vec<u64> = match first_missing {
        Some(first) => {
            let since = first - 1;
            let mut c = try_connect(f.nodes[1].port, &tokens[1]).await.unwrap();
            let replay: BTreeSet<u64> = try_join(&mut c, &f.room, since)
                .await
                .unwrap()
                .into_iter()
                .collect();
            c.close().await;
            all.iter()
                .filter(|s| **s > since && !replay.contains(s))
                .copied()
                .collect()
        }
        None => Vec::new(),
    };
    acked.retain(|cid, _| !cid.contains("probe"));
    let s = check_stored(&f.opts, &f.room, &acked, Duration::from_secs(60)).await;
    assert_clean(
        label,
        &t,
        &s,
        &format!(
            "cross-node-delivery-back-in {:?} redis-reconnects(node b) {reconnects} \
             max-seq-acked-before-stop {max_before} min-seq-acked-1s-after-start {min_after} \
             history {} holes {} live-missing {:?} join-since-{:?}-holes {resume_holes:?}",
            resumed.map(|d| format!("{:.2}s", d.as_secs_f64())),
            history.len(),
            holes.len(),
            missing
                .iter()
                .map(|(k, v)| format!("{k}:{}", v.len()))
                .collect::<Vec<_>>(),
            first_missing.map(|s| s - 1),
        ),
    );
    let resumed = resumed.expect("cross-node delivery did not come back within 30 s");
    assert!(
        resumed <= Duration::from_secs(5),
        "cross-node delivery came back only after {resumed:?}"
    );
    assert_eq!(t.acked, 2000, "every cid acked after retries");
    // (With the data kept, a retry of a cid Redis took just before it
    // stopped rightly gets its earlier seq; emptied, Redis forgets it.)
    assert!(
        !empty || min_after > max_before,
        "seq went back: acked up to {max_before} before Redis stopped, {min_after} after"
    );
    assert!(holes.is_empty(), "history lacks acked seqs: {holes:?}");
    assert_strictly_increasing(&history, "history");
    assert!(
        missing.is_empty(),
        "clients missing acked messages (not delivered live, not backfilled): {missing:?}; \
         join since {:?} on a fresh connection lacks {resume_holes:?}",
        first_missing.map(|s| s - 1)
    );
    pa.close().await;
    pb.close().await;
    f.cleanup().await;
}

/// 3a. Redis restarted (its data kept) under load.
#[tokio::test]
#[ignore = "restarts Redis: make test-faults"]
async fn redis_restarted_nodes_resubscribe_and_clients_backfill() {
    services_up().await;
    redis_restart(false).await;
}

/// 3b. Redis restarted empty under load: seqs never go back.
#[tokio::test]
#[ignore = "restarts Redis without its data: make test-faults"]
async fn redis_restarted_empty_seq_never_goes_back() {
    services_up().await;
    redis_restart(true).await;
}

/// 3c. A room's seq lost from Redis (as when Redis comes back empty) while
/// the clients of both nodes send to it: each node that finds it missing
/// seeds it again above what the log holds, and no send waits long for
/// that. No node runs persist workers, so the whole log is unpersisted and
/// each seed scans it; the node that seeds second scans while the first
/// one already produces to the room again.
#[tokio::test]
#[ignore = "loads Kafka and times the answers: make test-faults"]
async fn room_seq_lost_under_load_seeded_again_within_seconds() {
    const CLIENTS: usize = 10;
    const PER_CLIENT: usize = 400;
    services_up().await;
    let f = Faulty::start("reseed", &[&["sweep"], &["sweep"]], &[]).await;
    let tokens = f.tokens(CLIENTS, "s").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    // 400 messages per client, 50 per second each: about 8 s of load.
    let plans = plans(&f.room, &tokens, PER_CLIENT, |p| {
        p.pace = Duration::from_millis(20);
        p.retry_after = Some(Duration::from_millis(500));
        p.within = Duration::from_secs(120);
    });
    let load = drive_all(plans, &ports);
    let redis = redis::Client::open(f.opts.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let seq_key = keys::seq(&f.room);
    let fault = async {
        // Lost again every second: each time both nodes seed it.
        for _ in 0..7 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _: () = redis::cmd("DEL")
                .arg(&seq_key)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    let began = Instant::now();
    let (results, ()) = tokio::join!(load, fault);
    let run = began.elapsed();
    let t = totals(&results, CLIENTS * PER_CLIENT);
    let shared = shared_seqs(&t.acked_map);
    eprintln!(
        "FAULTS 3c room-seq-lost: sends {} acked {} unavailable-answers {} (cids {}) \
         gave-up {} ack-p50 {:.1}ms ack-p99 {:.1}ms slowest-answer {:.1}s run {:.1}s",
        t.sends,
        t.acked,
        t.unavailable,
        t.unavailable_cids,
        t.gave_up,
        t.p50_ms,
        t.p99_ms,
        t.slowest_answer.as_secs_f64(),
        run.as_secs_f64(),
    );
    assert!(t.errors.is_empty(), "unexpected errors: {:?}", t.errors);
    assert!(t.order.is_empty(), "views out of seq order: {:?}", t.order);
    assert!(shared.is_empty(), "seqs acked for two cids: {shared:?}");
    assert_eq!(t.gave_up, 0, "sends with neither ack nor unavailable");
    assert_eq!(
        t.acked,
        CLIENTS * PER_CLIENT,
        "every cid acked after retries"
    );
    assert!(
        t.slowest_answer <= Duration::from_secs(3),
        "a send waited {:?} for its answer while the room was seeded again",
        t.slowest_answer
    );
    f.cleanup().await;
}

/// 3d. The relay drops while a room holds a message back for a missing
/// seq, and stays down past the hold-back; the missing seq is in the cache,
/// published, but its publish never reached the nodes (as happens to one
/// published while Redis stops, B12 in docs/RELIABILITY.md). The rooms must
/// not give it up while they cannot hear from Redis: after the reconnect
/// the backfill delivers it, in order, on both nodes.
#[tokio::test]
#[ignore = "pauses every Redis client for 2.5 s: make test-faults"]
async fn relay_down_past_the_hold_back_loses_no_seq() {
    services_up().await;
    let f = Faulty::start(
        "relay-down",
        &[&["persist", "sweep"], &["persist", "sweep"]],
        &[],
    )
    .await;
    let (token, user) = f.nodes[0].guest("sender").await;
    let mut sender = try_connect(f.nodes[0].port, &token).await.unwrap();
    let (ta, _) = f.nodes[0].guest("reader-a").await;
    let (tb, _) = f.nodes[1].guest("reader-b").await;
    let mut readers = [
        try_connect(f.nodes[0].port, &ta).await.unwrap(),
        try_connect(f.nodes[1].port, &tb).await.unwrap(),
    ];
    try_join(&mut sender, &f.room, 0).await.unwrap();
    for r in &mut readers {
        try_join(r, &f.room, 0).await.unwrap();
    }
    let first = sender.send_acked(&f.room, "first", "first").await["seq"]
        .as_u64()
        .unwrap();

    // What the deliver script leaves of a message published as Redis
    // stops: the seq taken, the message cached and its cid marked as
    // published, and no publish that any node heard.
    let redis = redis::Client::open(f.opts.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let cached: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(keys::recent(&f.room))
        .arg(first)
        .arg(first)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut lost: serde_json::Value = serde_json::from_str(&cached[0]).unwrap();
    let seq: u64 = redis::cmd("INCR")
        .arg(keys::seq(&f.room))
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = ulid::Ulid::new().to_string();
    lost["seq"] = json!(seq);
    lost["id"] = json!(id);
    lost["cid"] = json!("lost");
    lost["text"] = json!("lost");
    let ts = lost["ts"].as_i64().unwrap();
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(keys::recent(&f.room))
        .arg(seq)
        .arg(lost.to_string())
        .cmd("HSET")
        .arg(keys::cids(&f.room))
        .arg(format!("{}:lost", user["id"].as_str().unwrap()))
        .arg(format!("{seq} {id} {ts} d"))
        .query_async(&mut conn)
        .await
        .unwrap();

    // A later message: both rooms hold it back, waiting for `seq`.
    let later = sender.send_acked(&f.room, "later", "later").await["seq"]
        .as_u64()
        .unwrap();
    assert!(later > seq, "later {later} above the lost {seq}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The relay drops and cannot come back for 2.5 s, past the 1 s
    // hold-back.
    let down = Instant::now();
    let _: () = redis::pipe()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .ignore()
        .cmd("CLIENT")
        .arg("PAUSE")
        .arg(2500)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut seen = Vec::new();
    for (r, who) in readers
        .iter_mut()
        .zip(["reader on node a", "reader on node b"])
    {
        let mut seqs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seqs.contains(&later) {
            let left = deadline.saturating_duration_since(Instant::now());
            match r.next_event(left).await {
                Event::Json(v) if v["op"] == "msg" && v["room"] == f.room.as_str() => {
                    seqs.push(v["seq"].as_u64().unwrap());
                }
                Event::Json(_) | Event::Other(_) => {}
                other => panic!("{who}: no `later` within 20 s ({other:?}), saw {seqs:?}"),
            }
        }
        assert_eq!(
            seqs,
            vec![first, seq, later],
            "{who}: the lost seq given up while the relay was down"
        );
        seen.push(seqs);
    }
    println!(
        "FAULTS 3d relay-down: lost seq {seq} between {first} and {later}; relay down for the \
         pause, both readers got {seen:?} {:.1}s after the drop",
        down.elapsed().as_secs_f64()
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------- 4. persist

/// Messages a node's persist workers stored since it started.
async fn persisted_by(node: &Node) -> f64 {
    node.metric("scalable_chat_persist_messages_total", &[])
        .await
        .unwrap_or(0.0)
}

/// 4. A persist worker killed with SIGKILL over and over during a
/// 10,000-message run: MongoDB ends with exactly 10,000 documents.
///
/// Each persist worker is a process of its own: a node with only the
/// `persist` role and `kafka.persist_workers = 1`, so that the process is
/// the worker (one Kafka consumer of the group) and nothing else. Node a
/// (role `sweep` only) serves the clients. Whichever of workers b and c is
/// storing is killed, and started again half a second later; the other
/// one runs meanwhile.
#[tokio::test]
#[ignore = "long: make test-faults"]
async fn persist_worker_killed_repeatedly_exactly_10000_documents() {
    services_up().await;
    let mut f = Faulty::start(
        "persist-kill",
        &[&["sweep"], &["persist"], &["persist"]],
        &[("SCALABLE_CHAT__KAFKA__PERSIST_WORKERS", "1")],
    )
    .await;
    let tokens = f.tokens(10, "p").await;
    let ports = Arc::new(Mutex::new(vec![f.nodes[0].port]));
    // 10 clients, 1,000 messages each, at most 20 a second per client: the
    // run lasts 50 s or more however fast the machine. A killed worker holds
    // its partitions until its session times out (10 s), so the workers
    // store again 10 to 15 s after each kill: room for three kills or more.
    let plans = plans(&f.room, &tokens, 1000, |p| {
        p.pace = Duration::from_millis(50);
        p.window = 20;
        p.home = 0;
    });
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        async move {
            let r = drive_all(plans, &ports).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        }
    };
    // Each kill: when, and how many messages the worker had stored since it
    // was (re)started. A worker is killed while it stores: once its count
    // of stored messages rose within the last 300 ms. (The room's messages
    // are all in one partition, so one worker at a time has them to store.)
    let mut kills: Vec<(Instant, usize, f64)> = Vec::new();
    let killer = async {
        let running = || !stop.load(std::sync::atomic::Ordering::SeqCst);
        while running() && kills.len() < 20 {
            let mut busy = None;
            while running() && busy.is_none() {
                let before = [
                    persisted_by(&f.nodes[1]).await,
                    persisted_by(&f.nodes[2]).await,
                ];
                tokio::time::sleep(Duration::from_millis(300)).await;
                for which in [1, 2] {
                    let after = persisted_by(&f.nodes[which]).await;
                    if busy.is_none() && after > before[which - 1] {
                        busy = Some((which, after));
                    }
                }
            }
            let Some((which, count)) = busy else { break };
            f.nodes[which].kill9();
            kills.push((Instant::now(), which, count));
            tokio::time::sleep(Duration::from_millis(500)).await;
            f.nodes[which].restart().await;
        }
    };
    let (results, ()) = tokio::join!(load, killer);
    let sent_in = started.elapsed();
    let t = totals(&results, 10_000);
    let last_ack = results
        .iter()
        .flat_map(|(o, _)| o.ack_times.iter().map(|(at, _)| *at))
        .max()
        .unwrap_or(started);
    // Kills during the run (of a worker that was storing messages).
    let busy_kills = kills.iter().filter(|(at, _, _)| *at < last_ack).count();
    let s = check_stored(&f.opts, &f.room, &t.acked_map, Duration::from_secs(120)).await;
    assert_clean(
        "4 persist-worker-killed",
        &t,
        &s,
        &format!(
            "kills {} (before the last ack: {busy_kills}) \
             killed-worker:messages-it-had-stored-since-its-start {:?} run {:.1}s",
            kills.len(),
            kills
                .iter()
                .map(|(_, w, n)| format!("{}:{n}", char::from(b'a' + *w as u8)))
                .collect::<Vec<_>>(),
            sent_in.as_secs_f64()
        ),
    );
    assert_eq!(t.acked, 10_000);
    assert!(
        busy_kills >= 3,
        "only {busy_kills} kills of a busy worker during the run"
    );
    assert_eq!(s.docs, 10_000, "exactly 10,000 documents");
    f.cleanup().await;
}

// ---------------------------------------------------------------- 5. SIGKILL

/// 5. A node killed with SIGKILL in the middle of a burst: every message it
/// acked is stored, and its clients resume on the other node with nothing
/// missing.
#[tokio::test]
#[ignore = "kills a node: make test-faults"]
async fn node_killed_mid_burst_acked_stored_clients_resume() {
    services_up().await;
    let mut f = Faulty::start(
        "kill9",
        &[&["persist", "sweep"], &["persist", "sweep"]],
        &[],
    )
    .await;
    let tokens = f.tokens(10, "s").await;
    let ports = Arc::new(Mutex::new(f.ports()));
    let plans = plans(&f.room, &tokens, 200, |p| {
        p.pace = Duration::from_millis(10);
        p.window = 20;
    });
    let load = drive_all(plans, &ports);
    let victim_port = f.nodes[0].port;
    let killed = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.nodes[0].kill9();
    };
    let (mut results, ()) = tokio::join!(load, killed);
    let t = totals(&results, 2000);
    let all: BTreeSet<u64> = t.acked_map.values().map(|(s, _)| *s).collect();
    let missing = settle(&mut results, &f.room, &all, Duration::from_secs(20)).await;
    let s = check_stored(&f.opts, &f.room, &t.acked_map, Duration::from_secs(60)).await;
    let moved = results.iter().filter(|(o, _)| o.reconnects > 0).count();
    assert_clean(
        "5 node-sigkill",
        &t,
        &s,
        &format!(
            "clients-moved {moved} (from port {victim_port}) live-missing {}",
            missing.values().map(Vec::len).sum::<usize>()
        ),
    );
    assert_eq!(t.acked, 2000);
    assert!(moved >= 5, "only {moved} clients had to move");
    assert!(
        missing.is_empty(),
        "clients missing acked messages: {missing:?}"
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------- 6. SIGTERM

/// 6. SIGTERM under load: every send the node accepted is answered (ack or
/// `unavailable`) before its connection closes, and the node exits 0 within
/// 30 s.
#[tokio::test]
async fn sigterm_under_load_drains_and_exits_0() {
    let mut f = Faulty::start(
        "drain",
        &[&["persist", "sweep"], &["persist", "sweep"]],
        &[],
    )
    .await;
    let tokens = f.tokens(10, "d").await;
    // Every client on node a, which is drained.
    let ports = Arc::new(Mutex::new(vec![f.nodes[0].port]));
    let plans = plans(&f.room, &tokens, 5_000, |p| {
        p.pace = Duration::from_millis(5);
        p.window = 20;
        p.home = 0;
        p.stop_on_close = true;
        p.retry_after = None;
        p.within = Duration::from_secs(60);
    });
    let load = drive_all(plans, &ports);
    let drain = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let began = Instant::now();
        let status = f.nodes[0].sigterm_within(Duration::from_secs(30)).await;
        (status, began.elapsed())
    };
    let (results, (status, took)) = tokio::join!(load, drain);
    let mut t = totals(&results, 0);
    t.sends = t.acked + t.refused + t.unanswered;
    t.gave_up = 0;
    let s = check_stored(&f.opts, &f.room, &t.acked_map, Duration::from_secs(60)).await;
    // A send still unanswered when the connection closed is one the node
    // never read (it was on its way when the node closed), unless MongoDB
    // holds it: then the node accepted it and did not answer.
    let unanswered: Vec<&String> = results.iter().flat_map(|(o, _)| &o.unanswered).collect();
    let accepted_unanswered: Vec<&&String> =
        unanswered.iter().filter(|c| s.cids.contains(**c)).collect();
    assert_clean(
        "6 sigterm-drain",
        &t,
        &s,
        &format!(
            "exit {status} in {:.2}s; unanswered-at-close {} of which stored {}",
            took.as_secs_f64(),
            unanswered.len(),
            accepted_unanswered.len()
        ),
    );
    assert!(status.success(), "exit status {status}");
    assert!(took <= Duration::from_secs(30));
    assert!(
        accepted_unanswered.is_empty(),
        "the node stored these sends but closed without answering them: {accepted_unanswered:?}"
    );
    assert!(t.acked > 0);
    f.cleanup().await;
}

// ---------------------------------------------------------------- 7. slow

/// Senders of each scenario 7 run, and the messages each sends.
const SLOW_SENDERS: usize = 5;
const SLOW_MESSAGES: usize = 600;
/// Scenario 7 alternates runs without and with the silent client this many
/// times (each round both, in alternating order), so that a burst of
/// background load on the machine falls on both sides.
const SLOW_ROUNDS: usize = 5;
/// How much more memory the node may use with the silent client: ten times
/// `limits.outbound_hard_bytes` (1 MiB). With the cut-off disabled it holds
/// everything queued for that client: 15 to 17 MiB more in a run.
const SLOW_RSS_SLACK_KIB: u64 = 10 * 1024;

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A client that joins `room` and then never reads its socket, until `read`
/// fires: then it reads to the end of the connection and returns the close
/// code (or why there was none). It runs on a thread and runtime of its own,
/// so that parsing the megabytes queued for it never delays the clients whose
/// latency is measured. `joined` fires once it is in the room.
fn silent_client(
    port: u16,
    token: String,
    room: String,
    joined: tokio::sync::oneshot::Sender<()>,
    read: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<Result<u16, String>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut c = try_connect(port, &token)
                .await
                .ok_or("the silent client could not connect")?;
            try_join(&mut c, &room, 0)
                .await
                .ok_or("the silent client could not join")?;
            let _ = joined.send(());
            if read.await.is_err() {
                return Err("never cut off".to_string());
            }
            // What was queued for it comes first, then the close frame.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match c.next_event(left).await {
                    Event::Json(_) | Event::Other(_) => {}
                    Event::Closed(Some(f)) => return Ok(u16::from(f.code)),
                    Event::Closed(None) => return Err("closed without a close frame".into()),
                    Event::Error(e) => return Err(format!("closed by an error: {e}")),
                    Event::Timeout => return Err("not closed within 20 s of the cut-off".into()),
                }
            }
        })
    })
}

/// What one scenario 7 run measured.
struct SlowRun {
    with_slow: bool,
    room: String,
    t: Totals,
    /// What MongoDB held of the run's room after it.
    stored: Stored,
    /// Peak VmRSS of the node during the run, KiB.
    peak_kib: u64,
    /// Slow-reader closes the node counted during the run.
    cut_offs: f64,
    /// The silent client's close code (or why there was none), and when the
    /// node's counter showed it cut off, from the start of the load.
    close: Option<(Result<u16, String>, Option<Duration>)>,
}

/// One run: SLOW_SENDERS clients send SLOW_MESSAGES messages of 3.9 kB
/// each, with or without a client in the room that never reads.
async fn slow_reader_run(f: &Faulty, with_slow: bool, tag: &str) -> SlowRun {
    let room = format!("{}-{tag}", f.room);
    let tokens = f.tokens(SLOW_SENDERS, tag).await;
    let node = &f.nodes[0];
    let mut silent = None;
    let mut read_tx = None;
    if with_slow {
        let (token, _) = node.guest(&format!("{tag}-slow")).await;
        let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = tokio::sync::oneshot::channel();
        silent = Some(silent_client(node.port, token, room.clone(), joined_tx, rx));
        let joining = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), joined_rx)
            .await
            .expect("the silent client joins within 60 s")
            .expect("the silent client joins");
        eprintln!(
            "scenario 7 run {tag}: the silent client joined in {:?}",
            joining.elapsed()
        );
        read_tx = Some(tx);
    }
    let metric = || async move {
        node.metric("scalable_chat_slow_reader_closes_total", &[])
            .await
            .unwrap_or(0.0)
    };
    let cut_before = metric().await;
    let ports = Arc::new(Mutex::new(vec![node.port]));
    let plans = plans(&room, &tokens, SLOW_MESSAGES, |p| {
        p.pace = Duration::from_millis(10);
        p.window = 5;
        p.home = 0;
        p.text_len = 3900;
        p.within = Duration::from_secs(120);
    });
    let pid = node.pid();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid)));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        async move {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Polls the node's slow-reader counter (in both kinds of run, so that
    // both carry the same extra load) and lets the silent client read once
    // it was cut off.
    let watcher = {
        let done = done.clone();
        async move {
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                if metric().await > cut_before {
                    if let Some(tx) = read_tx.take() {
                        let _ = tx.send(());
                    }
                    return Some(started.elapsed());
                }
                if finished {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let load = async {
        let r = drive_all(plans, &ports).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let (results, (), cut_at) = tokio::join!(load, sampler, watcher);
    let cut_offs = metric().await - cut_before;
    let close = match silent {
        Some(handle) => {
            let code = tokio::task::spawn_blocking(move || handle.join())
                .await
                .unwrap()
                .unwrap_or_else(|_| Err("the silent client's thread panicked".into()));
            Some((code, cut_at))
        }
        None => None,
    };
    let t = totals(&results, SLOW_SENDERS * SLOW_MESSAGES);
    // Once every acked message is stored, the room's documents are removed,
    // so that every run starts with the same (small) collection: FerretDB
    // reads a room's messages by scanning the collection.
    let stored = check_stored(&f.opts, &room, &t.acked_map, Duration::from_secs(60)).await;
    let removed = mongo_client(&f.opts)
        .await
        .database(&f.opts.database)
        .collection::<Document>("messages")
        .delete_many(doc! { "room": &room })
        .await;
    if let Err(e) = removed {
        eprintln!("removing the documents of {room}: {e}");
    }
    eprintln!(
        "scenario 7 run {tag}: {:.1}s acked {} others' ack p99 {:.1}ms peak RSS {}MiB cut-offs {} silent client {:?}",
        started.elapsed().as_secs_f64(),
        t.acked,
        t.p99_ms,
        peak.load(std::sync::atomic::Ordering::SeqCst) / 1024,
        cut_offs,
        close
    );
    SlowRun {
        with_slow,
        room,
        t,
        stored,
        peak_kib: peak.load(std::sync::atomic::Ordering::SeqCst),
        cut_offs,
        close,
    }
}

/// The median of some values (the upper one of the middle two).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 7. A client that never reads is cut off (1008) when its queue fills; the
/// node's memory stays bounded and the other clients' p99 ack latency stays
/// within 2x of runs without the slow client. The runs without and with it
/// alternate, and the medians of their p99s are compared, so that load from
/// outside the test affects both sides alike.
#[tokio::test]
#[ignore = "timing comparison: make test-faults"]
async fn slow_reader_cut_off_memory_bounded_others_unaffected() {
    services_up().await;
    let mut f = Faulty::start("slow", &[&["persist", "sweep"]], &[]).await;
    let pid = f.nodes[0].pid();
    let rss_start = rss_kib(pid);
    let warm = slow_reader_run(&f, false, "warm").await;
    let mut runs = Vec::new();
    for round in 0..SLOW_ROUNDS {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_slow in order {
            let kind = if with_slow { "slow" } else { "base" };
            runs.push(slow_reader_run(&f, with_slow, &format!("{kind}{round}")).await);
        }
    }
    let (slow, base): (Vec<&SlowRun>, Vec<&SlowRun>) = runs.iter().partition(|r| r.with_slow);
    let p99s = |rs: &[&SlowRun]| rs.iter().map(|r| r.t.p99_ms).collect::<Vec<f64>>();
    let (base_p99s, slow_p99s) = (p99s(&base), p99s(&slow));
    let (base_p99, slow_p99) = (median(&base_p99s), median(&slow_p99s));
    let peak = |rs: &[&SlowRun]| rs.iter().map(|r| r.peak_kib).max().unwrap_or(0);
    let (base_peak, slow_peak) = (peak(&base), peak(&slow));
    // The node's peak before any silent client: the warm-up and the first
    // run, which has none (later runs without one may keep memory that an
    // earlier silent client made the allocator take).
    let before_slow_peak = warm.peak_kib.max(runs[0].peak_kib);
    let closes: Vec<String> = slow
        .iter()
        .map(|r| match &r.close {
            Some((Ok(code), at)) => format!("{code}@{:.1}s", at.unwrap_or_default().as_secs_f64()),
            Some((Err(e), _)) => e.clone(),
            None => "none".into(),
        })
        .collect();
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    let summary = format!(
        "rounds {SLOW_ROUNDS} closes [{}] rss-start {}MiB peak-before-any-silent-client {}MiB \
         peak-base {}MiB peak-with-slow {}MiB \
         others-p99-base {}ms (median {base_p99:.1}ms) others-p99-with-slow {}ms (median {slow_p99:.1}ms)",
        closes.join(" "),
        rss_start / 1024,
        before_slow_peak / 1024,
        base_peak / 1024,
        slow_peak / 1024,
        fmt(&base_p99s),
        fmt(&slow_p99s),
    );
    eprintln!("FAULTS 7 slow-reader: {summary}");
    // Every run: nothing refused, every view in order, every acked message
    // stored once (before its documents were removed), and no sender cut off.
    for r in &runs {
        assert_clean(&format!("7 slow-reader {}", r.room), &r.t, &r.stored, "");
        assert_eq!(r.t.acked, SLOW_SENDERS * SLOW_MESSAGES, "{}", r.room);
    }
    for r in &base {
        assert_eq!(r.cut_offs, 0.0, "{}: a sender was cut off", r.room);
    }
    for r in &slow {
        assert_eq!(
            r.cut_offs, 1.0,
            "{}: the node should cut off the silent client, and only it",
            r.room
        );
        match &r.close {
            Some((Ok(code), _)) => assert_eq!(*code, 1008, "{}: close code", r.room),
            other => panic!(
                "{}: the silent client was not closed with 1008: {other:?}",
                r.room
            ),
        }
    }
    assert!(
        slow_peak <= before_slow_peak + SLOW_RSS_SLACK_KIB,
        "RSS grew from {before_slow_peak} KiB to {slow_peak} KiB with a slow reader"
    );
    // A floor of 5 ms keeps a sub-millisecond baseline from failing on noise.
    let limit = (2.0 * base_p99).max(5.0);
    assert!(
        slow_p99 <= limit,
        "others' p99 {slow_p99:.1} ms with a slow reader vs {base_p99:.1} ms without \
         (medians of {SLOW_ROUNDS} runs each: {} vs {})",
        fmt(&slow_p99s),
        fmt(&base_p99s)
    );
    f.more_rooms = std::iter::once(warm.room)
        .chain(runs.into_iter().map(|r| r.room))
        .collect();
    f.cleanup().await;
}
