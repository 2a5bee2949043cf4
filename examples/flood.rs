//! What one flooding client address costs everyone else: the ack latency of
//! a measured user, alone and while another address floods the node.
//!
//! ```text
//! cargo run --release --example flood -- http://127.0.0.1:8080 [seconds]
//! ```
//! Starts nothing itself. The measured user connects from 127.0.0.3 and
//! sends one message every 100 ms for `seconds` (default 10), first alone,
//! then while the flooder from 127.0.0.2 signs in guests, reads history and,
//! over its own WebSocket, sends pings, binary frames and unparsable frames
//! as fast as it can for the same time. Prints one JSON line: the
//! flooder's answered and refused requests per kind, and the measured
//! user's ack latency p50/p99 both ways, over the sends that were acked
//! (`unacked` counts the others; at 10 sends a second the measured user
//! stays within the default per-connection and per-user rates). Both
//! addresses must be loopback addresses of this machine (they are on
//! Linux).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const MEASURED: &str = "127.0.0.3";
const FLOODER: &str = "127.0.0.2";
/// Concurrent request loops per flooded HTTP kind.
const HTTP_LOOPS: usize = 4;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn http_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn token(base: &str, source: &str) -> String {
    let v: Value = http_from(source)
        .post(format!("{base}/api/v1/auth/guest"))
        .json(&json!({ "name": "bench" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["token"].as_str().expect("a token").to_string()
}

/// A WebSocket from `source`, past its `welcome`.
async fn connect(base: &str, source: &str, token: &str) -> Ws {
    let server: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(server).await.unwrap();
    let url = format!("ws://{server}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if matches!(m, Message::Text(ref t) if t.contains("\"welcome\"")) {
            break;
        }
    }
    ws
}

/// Sends one message every 100 ms for `secs`; returns the ack latencies in
/// milliseconds, sorted, and how many sends got no ack.
async fn measured(base: &str, secs: u64, room: &str) -> (Vec<f64>, usize) {
    let token = token(base, MEASURED).await;
    let ws = connect(base, MEASURED, &token).await;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        json!({"op": "join", "room": room}).to_string(),
    ))
    .await
    .unwrap();
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let acks = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(5), rx.next()).await
            {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["op"] == "ack" {
                    let cid = v["cid"].as_str().unwrap_or_default();
                    if let Some(at) = sent.lock().unwrap().remove(cid) {
                        latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            latencies
        })
    };
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut i = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let cid = format!("m{i}");
        i += 1;
        sent.lock().unwrap().insert(cid.clone(), Instant::now());
        let frame = json!({"op": "send", "room": room, "text": "measured", "cid": cid});
        if tx.send(Message::Text(frame.to_string())).await.is_err() {
            break;
        }
    }
    // The reader stops 5 s after the last frame.
    let mut latencies = acks.await.unwrap();
    let _ = tx.close().await;
    latencies.sort_by(f64::total_cmp);
    let lost = sent.lock().unwrap().len();
    (latencies, lost)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some((sorted[i] * 100.0).round() / 100.0)
}

/// Answered (2xx, or a reply that is not a refusal) and refused (429, or
/// a `rate_limited` error frame) counts of one kind of flood.
#[derive(Default)]
struct Count {
    answered: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

impl Count {
    fn json(&self) -> Value {
        json!({
            "answered": self.answered.load(Relaxed),
            "refused": self.refused.load(Relaxed),
            "other": self.other.load(Relaxed),
        })
    }

    fn status(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.answered,
            429 => &self.refused,
            _ => &self.other,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// One HTTP flood loop until `end`.
async fn http_flood(req: impl Fn() -> reqwest::RequestBuilder, count: Arc<Count>, end: Instant) {
    while Instant::now() < end {
        match req().send().await {
            Ok(resp) => count.status(resp.status().as_u16()),
            Err(_) => {
                count.other.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Pings, binary frames and unparsable frames, round robin, as fast as
/// the socket takes them until `end`; counts the replies by kind.
async fn ws_flood(ws: Ws, counts: Arc<[Count; 3]>, end: Instant) -> (u64, Option<u16>) {
    let (mut tx, mut rx) = ws.split();
    let reader = {
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut close = None;
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end.into(), rx.next()).await {
                match m {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or_default();
                        let kind = match (v["op"].as_str(), v["ref"].as_str()) {
                            (Some("pong"), _) | (_, Some("ping")) => 0,
                            (_, Some("binary")) => 1,
                            (Some("error"), _)
                                if v["message"].as_str().is_some_and(|m| m.contains("binary")) =>
                            {
                                1
                            }
                            _ => 2,
                        };
                        let refused = v["code"] == "rate_limited";
                        let c = &counts[kind];
                        if v["op"] == "pong" || (v["op"] == "error" && !refused) {
                            c.answered.fetch_add(1, Relaxed);
                        } else if refused {
                            c.refused.fetch_add(1, Relaxed);
                        }
                    }
                    Message::Close(f) => {
                        close = f.map(|f| u16::from(f.code));
                        break;
                    }
                    _ => {}
                }
            }
            close
        })
    };
    let mut sent = 0u64;
    while Instant::now() < end {
        let frame = match sent % 3 {
            0 => Message::Text(json!({"op": "ping", "t": sent}).to_string()),
            1 => Message::Binary(vec![0u8; 16]),
            _ => Message::Text("{not json".into()),
        };
        if tx.send(frame).await.is_err() {
            break;
        }
        sent += 1;
    }
    let _ = tx.close().await;
    (sent, reader.await.unwrap())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args
        .first()
        .expect("usage: flood <node URL> [seconds]")
        .clone();
    let secs: u64 = args.get(1).map_or(10, |s| s.parse().unwrap());
    let tag = format!(
        "{}",
        Instant::now().elapsed().as_nanos() ^ std::process::id() as u128
    );
    let room = format!("flood-{tag}");

    let (quiet, quiet_lost) = measured(&base, secs, &room).await;

    // The flooder's own WebSocket first, while its buckets are full.
    let flood_ws = connect(&base, FLOODER, &token(&base, FLOODER).await).await;
    let end = Instant::now() + Duration::from_secs(secs);
    let signin = Arc::new(Count::default());
    let history = Arc::new(Count::default());
    let frames: Arc<[Count; 3]> = Arc::default();
    let mut tasks = Vec::new();
    let signin_url = format!("{base}/api/v1/auth/guest");
    let history_url = format!("{base}/api/v1/rooms/{room}/messages");
    for _ in 0..HTTP_LOOPS {
        let (client, url) = (http_from(FLOODER), signin_url.clone());
        tasks.push(tokio::spawn(http_flood(
            move || client.post(&url).json(&json!({"name": "flood"})),
            signin.clone(),
            end,
        )));
        let (client, url) = (http_from(FLOODER), history_url.clone());
        tasks.push(tokio::spawn(http_flood(
            move || client.get(&url),
            history.clone(),
            end,
        )));
    }
    let ws_task = tokio::spawn(ws_flood(flood_ws, frames.clone(), end));
    let (flooded, flooded_lost) = measured(&base, secs, &room).await;
    for t in tasks {
        t.await.unwrap();
    }
    let (frames_sent, close) = ws_task.await.unwrap();

    let report = json!({
        "seconds": secs,
        "flooder": {
            "signin": signin.json(),
            "history": history.json(),
            "ws_frames_sent": frames_sent,
            "ws_closed_with": close,
            "ping": frames[0].json(),
            "binary": frames[1].json(),
            "unparsable": frames[2].json(),
        },
        "measured": {
            "alone": {"acks": quiet.len(), "unacked": quiet_lost,
                      "p50_ms": percentile(&quiet, 0.5), "p99_ms": percentile(&quiet, 0.99)},
            "flooded": {"acks": flooded.len(), "unacked": flooded_lost,
                        "p50_ms": percentile(&flooded, 0.5), "p99_ms": percentile(&flooded, 0.99)},
        },
    });
    println!("{report}");
}
