//! Measures a running node: resident memory per idle connection and the
//! accept→ack latency of sequential sends, as reported in the README.
//!
//! ```text
//! cargo run --release --example measure -- http://127.0.0.1:8080 <node pid> [idle] [sends]
//! cargo run --release --example measure -- burst <base URL>[,<base URL>…] <clients> <messages each> <window>
//! ```
//! `burst` keeps `window` sends in flight on each client, spread over the
//! given nodes, and reports accepted messages per second.
//! The node must accept connections without an Origin header (the default),
//! and allow the send rate: start it with a high `limits.rate_per_sec`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn token(base: &str, name: &str) -> String {
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/guest"))
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// One client of a burst: `count` sends, `window` of them unacked at most.
async fn burst_client(
    base: String,
    name: String,
    room: String,
    count: usize,
    window: usize,
) -> Vec<Duration> {
    let tok = token(&base, &name).await;
    let ws = base.replacen("http", "ws", 1);
    let (mut c, _) = tokio_tungstenite::connect_async(format!("{ws}/ws?token={tok}"))
        .await
        .unwrap();
    c.next().await.unwrap().unwrap();
    c.send(Message::text(json!({"op":"join","room":room}).to_string()))
        .await
        .unwrap();
    loop {
        let Message::Text(m) = c.next().await.unwrap().unwrap() else {
            continue;
        };
        if m.contains("\"joined\"") {
            break;
        }
    }
    let mut sent_at = std::collections::HashMap::new();
    let mut lat = Vec::with_capacity(count);
    let mut sent = 0;
    while lat.len() < count {
        while sent < count && sent_at.len() < window {
            let cid = format!("{name}-{sent}");
            let frame = json!({"op":"send","room":room,"text":"burst","cid":cid}).to_string();
            sent_at.insert(cid, Instant::now());
            c.send(Message::text(frame)).await.unwrap();
            sent += 1;
        }
        let Message::Text(m) = c.next().await.unwrap().unwrap() else {
            continue;
        };
        let v: Value = serde_json::from_str(&m).unwrap();
        assert_ne!(v["op"], "error", "{v}");
        if v["op"] == "ack" {
            if let Some(t0) = sent_at.remove(v["cid"].as_str().unwrap()) {
                lat.push(t0.elapsed());
            }
        }
    }
    lat
}

async fn burst(args: &[String]) {
    let bases: Vec<String> = args[2].split(',').map(str::to_string).collect();
    let clients: usize = args[3].parse().unwrap();
    let each: usize = args[4].parse().unwrap();
    let window: usize = args[5].parse().unwrap();
    let run = std::process::id();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let base = bases[i % bases.len()].clone();
            let room = format!("burst-{run}-{}", i % 10);
            tokio::spawn(burst_client(
                base,
                format!("b{run}x{i}"),
                room,
                each,
                window,
            ))
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "burst: {} messages acked in {secs:.1} s = {:.0} msgs/s; accept->ack p50 {:?}, p99 {:?}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("burst") {
        return burst(&args).await;
    }
    let base = args
        .get(1)
        .cloned()
        .unwrap_or("http://127.0.0.1:8080".into());
    let pid: u32 = args.get(2).expect("node pid").parse().unwrap();
    let idle: usize = args.get(3).map_or(2000, |v| v.parse().unwrap());
    let sends: usize = args.get(4).map_or(10_000, |v| v.parse().unwrap());
    let ws = base.replacen("http", "ws", 1);

    // Idle connections: connected, welcomed, one room joined.
    let tok = token(&base, "idle").await;
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(idle);
    for i in 0..idle {
        let (mut c, _) = tokio_tungstenite::connect_async(format!("{ws}/ws?token={tok}"))
            .await
            .unwrap();
        c.next().await.unwrap().unwrap(); // welcome
        let room = format!("idle-{}", i % 100);
        c.send(Message::text(json!({"op":"join","room":room}).to_string()))
            .await
            .unwrap();
        c.next().await.unwrap().unwrap(); // joined
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    println!(
        "idle: {idle} connections, RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
        (after.saturating_sub(before)) as f64 / idle as f64
    );
    drop(conns);

    // Sequential sends: each waits for its ack before the next.
    let tok = token(&base, "sender").await;
    let (mut c, _) = tokio_tungstenite::connect_async(format!("{ws}/ws?token={tok}"))
        .await
        .unwrap();
    c.next().await.unwrap().unwrap();
    c.send(Message::text(r#"{"op":"join","room":"latency"}"#))
        .await
        .unwrap();
    c.next().await.unwrap().unwrap();
    let mut lat = Vec::with_capacity(sends);
    let run = format!("{}", Instant::now().elapsed().as_nanos());
    for i in 0..sends {
        let cid = format!("m{run}-{i}");
        let frame = json!({"op":"send","room":"latency","text":"x","cid":cid}).to_string();
        let t0 = Instant::now();
        c.send(Message::text(frame)).await.unwrap();
        loop {
            let Message::Text(m) = c.next().await.unwrap().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(&m).unwrap();
            if v["op"] == "ack" && v["cid"] == cid.as_str() {
                break;
            }
            assert_ne!(v["op"], "error", "{v}");
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "sequential sends: {sends}, accept->ack p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
