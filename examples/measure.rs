//! Measures a running node: resident memory per idle connection and the
//! accept→ack latency of sequential sends, as reported in the README.
//!
//! ```text
//! cargo run --release --example measure -- http://127.0.0.1:8080 <node pid> [idle] [sends]
//! ```
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

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
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
