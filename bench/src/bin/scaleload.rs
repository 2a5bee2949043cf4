//! scaleload: the load of `bench/scaling`. A fixed number of messages at a
//! fixed offered rate through ScalableChat nodes, or N idle connections,
//! started and ended on cue so that the caller can read the counters of
//! every process just before and just after.
//!
//! ```text
//! scaleload send --url A[,B] --clients C --rooms R --rate MSGS_PER_S --count N --out FILE
//!                [--listeners L] [--same-node 1] [--payload BYTES] [--window W] [--max-secs T]
//!                [--prefix P] [--ramp K]
//! scaleload idle --url A --clients N --out FILE [--room-size S] [--prefix P] [--ramp K]
//! ```
//!
//! Both connect and join every client, print `ready` on stdout and wait for
//! a line on stdin. `send` then sends N messages in all, each sender
//! `N / C` of them at `rate / C` per second, waits for their acks and for
//! their deliveries, writes FILE, prints `done` and waits for stdin to
//! close (the connections stay open until then). `idle` writes FILE when
//! stdin closes.
//!
//! Layout of `send`: sender `i` joins room `i % R`; the senders of a room
//! alternate between the nodes, so with two nodes and C >= 2R every room
//! has members on both and every message crosses Redis to both. Each room
//! also gets L listeners (members that only read), alternating the same way.
//! With `--same-node 1` all the members of room `r` are on node `r % nodes`
//! instead: each message is relayed to one node.

#[allow(dead_code)]
#[path = "../proto.rs"]
mod proto;
#[allow(dead_code)]
#[path = "../stats.rs"]
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use proto::{Error, Proto, Target, Ws};
use stats::{now_us, payload, Hist, Stats};

const QS: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

fn opts(list: &[String]) -> Result<HashMap<String, String>, Error> {
    let mut args = HashMap::new();
    let mut it = list.iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {k}"))?;
        let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        args.insert(key.to_string(), v.clone());
    }
    Ok(args)
}

fn num<T: std::str::FromStr>(a: &HashMap<String, String>, k: &str, default: T) -> Result<T, Error> {
    match a.get(k) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{k}: bad number {v}").into()),
    }
}

fn need(a: &HashMap<String, String>, k: &str) -> Result<String, Error> {
    a.get(k)
        .cloned()
        .ok_or_else(|| format!("--{k} is required").into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match args.first().map(String::as_str) {
                    Some("send") => send(&opts(&args[1..])?).await,
                    Some("idle") => idle(&opts(&args[1..])?).await,
                    _ => Err("usage: scaleload send|idle --url … (see the source)".into()),
                }
            })
        });
    if let Err(e) = result {
        eprintln!("scaleload: {e}");
        std::process::exit(1);
    }
}

fn targets(a: &HashMap<String, String>) -> Result<Vec<Target>, Error> {
    need(a, "url")?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<SocketAddr>()
                .map(|addr| Target {
                    proto: Proto::Ours,
                    addr,
                })
                .map_err(|_| format!("--url: bad address {s}").into())
        })
        .collect()
}

/// Connection attempts per client before it counts as failed.
const ATTEMPTS: usize = 3;

/// Opens every client `(index, target, room)`, at most `ramp` handshakes in
/// flight, each tried up to [`ATTEMPTS`] times. With `all`, fails if any
/// cannot connect and join (a partial layout would change the fan-out being
/// measured); otherwise returns those that did and the number that did not.
async fn connect(
    plan: Vec<(usize, Target, String)>,
    ramp: usize,
    all: bool,
) -> Result<(Vec<(usize, Ws)>, usize), Error> {
    let sem = Arc::new(Semaphore::new(ramp.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    let n = plan.len();
    for (i, t, room) in plan {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut last = None;
            for _ in 0..ATTEMPTS {
                match proto::open(&t, i, Some(&room)).await {
                    Ok(ws) => return (i, Ok(ws)),
                    Err(e) => last = Some(e),
                }
            }
            (i, Err(last.unwrap_or_else(|| "no attempt".into())))
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(res) = set.join_next().await {
        match res {
            Ok((i, Ok(ws))) => out.push((i, ws)),
            Ok((i, Err(e))) if all => return Err(format!("client {i} did not connect: {e}").into()),
            Ok((i, Err(e))) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("scaleload: client {i} did not connect: {e}");
                }
            }
            Err(e) => return Err(format!("a connecting task failed: {e}").into()),
        }
    }
    eprintln!(
        "scaleload: {} of {n} clients connected and joined in {:.1}s",
        out.len(),
        start.elapsed().as_secs_f64()
    );
    Ok((out, failed))
}

/// Prints `word` on stdout for the caller, then waits for a line on stdin
/// (or its end).
async fn cue(word: &str) -> Result<(), Error> {
    println!("{word}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    Ok(())
}

/// Reads a member's frames until it closes, counting deliveries.
fn spawn_reader(mut ws: Ws, stats: Arc<Stats>) {
    tokio::spawn(async move {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    if Proto::Ours.is_error(&t) {
                        stats.errors.fetch_add(1, Relaxed);
                    }
                    stats.on_frame(&t, now_us());
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        stats.dropped.fetch_add(1, Relaxed);
    });
}

/// What every sender adds to.
struct Shared {
    stats: Arc<Stats>,
    ack_hist: Hist,
    /// Deliveries due: each acked message times its room's members.
    expected: AtomicU64,
    /// Ticks on which a sender was due to send but had `window` unacked.
    window_full: AtomicU64,
    /// Microseconds since the start of the first and of the last send.
    last_send_us: AtomicU64,
}

/// The number in a frame's `"<key>":"c<n>"`: acks carry the sender's cid as
/// `cid`, refusals as `ref`.
fn cid_in(frame: &str, key: &str) -> Option<u64> {
    let pat = format!(r#""{key}":"c"#);
    let at = frame.find(&pat)? + pat.len();
    let digits: String = frame[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    mut ws: Ws,
    id: u64,
    room: String,
    members: u64,
    per_sec: f64,
    quota: u64,
    window: usize,
    size: usize,
    start: tokio::time::Instant,
    deadline: tokio::time::Instant,
    sh: Arc<Shared>,
) {
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    loop {
        let sending = sent < quota && tokio::time::Instant::now() < deadline;
        tokio::select! {
            _ = tick.tick(), if sending => {
                let elapsed = start.elapsed().as_secs_f64();
                let due = ((per_sec * elapsed) as u64 + 1).min(quota);
                let mut fed = false;
                while sent < due {
                    if pending.len() >= window {
                        sh.window_full.fetch_add(1, Relaxed);
                        break;
                    }
                    sent += 1;
                    let n = (id << 32) + sent;
                    let frame = Proto::Ours.publish(&room, &payload(size), n);
                    if ws.feed(frame).await.is_err() {
                        sh.stats.errors.fetch_add(1, Relaxed);
                        return;
                    }
                    pending.insert(n, Instant::now());
                    sh.stats.sent.fetch_add(1, Relaxed);
                    fed = true;
                }
                if fed {
                    sh.last_send_us.fetch_max(now_us(), Relaxed);
                    if ws.flush().await.is_err() {
                        sh.stats.errors.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if Proto::Ours.is_ack(&t) {
                        if let Some(at) = cid_in(&t, "cid").and_then(|n| pending.remove(&n)) {
                            sh.ack_hist.record(at.elapsed().as_micros() as u64);
                        }
                        sh.stats.acked.fetch_add(1, Relaxed);
                        sh.expected.fetch_add(members, Relaxed);
                    } else if Proto::Ours.is_error(&t) {
                        sh.stats.errors.fetch_add(1, Relaxed);
                        if let Some(n) = cid_in(&t, "ref") {
                            pending.remove(&n);
                        }
                    } else {
                        sh.stats.on_frame(&t, now_us());
                    }
                }
                Some(Ok(_)) => {}
                _ => {
                    sh.stats.dropped.fetch_add(1, Relaxed);
                    return;
                }
            },
        }
    }
}

async fn send(a: &HashMap<String, String>) -> Result<(), Error> {
    let targets = targets(a)?;
    let clients: usize = num(a, "clients", 16)?;
    let rooms: usize = num::<usize>(a, "rooms", 8)?.max(1);
    let listeners: usize = num(a, "listeners", 0)?;
    let rate: f64 = num(a, "rate", 1000.0)?;
    let count: u64 = num(a, "count", 10_000)?;
    let size: usize = num(a, "payload", 100)?;
    let window: usize = num(a, "window", 256)?;
    let max_secs: f64 = num(a, "max-secs", 300.0)?;
    let prefix = a.get("prefix").cloned().unwrap_or_else(|| "scale".into());
    let ramp: usize = num(a, "ramp", 100)?;
    let same_node = num::<u8>(a, "same-node", 0)? != 0;
    let out = need(a, "out")?;
    if clients == 0 || rate <= 0.0 || count == 0 {
        return Err("--clients, --rate and --count must be positive".into());
    }
    let room_of = |i: usize| format!("{prefix}{}", i % rooms);
    // Member j of a room (senders first, then listeners) is on node
    // (room + j) % nodes: consecutive members of a room alternate nodes.
    let node_of = |room: usize, j: usize| {
        let k = if same_node { room } else { room + j };
        targets[k % targets.len()].clone()
    };
    let mut plan = Vec::new();
    for i in 0..clients {
        plan.push((i, node_of(i % rooms, i / rooms), room_of(i)));
    }
    let senders_in = |r: usize| (clients + rooms - 1 - r) / rooms;
    for r in 0..rooms {
        for k in 0..listeners {
            let i = clients + r * listeners + k;
            plan.push((i, node_of(r, senders_in(r) + k), room_of(r)));
        }
    }
    let (mut conns, _) = connect(plan, ramp, true).await?;
    conns.sort_by_key(|(i, _)| *i);
    let sh = Arc::new(Shared {
        stats: Arc::new(Stats::new()),
        ack_hist: Hist::new(),
        expected: AtomicU64::new(0),
        window_full: AtomicU64::new(0),
        last_send_us: AtomicU64::new(0),
    });
    // Let the join's presence frames pass before the counters are read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cue("ready").await?;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let start_us = now_us() + 50_000;
    let deadline = start + Duration::from_secs_f64(max_secs);
    let per_sec = rate / clients as f64;
    let mut handles = Vec::new();
    for (i, ws) in conns {
        if i >= clients {
            spawn_reader(ws, sh.stats.clone());
            continue;
        }
        let r = i % rooms;
        let quota = count / clients as u64 + u64::from((i as u64) < count % clients as u64);
        // Stagger the senders' first messages over one sending interval.
        let offset = Duration::from_secs_f64(i as f64 / clients as f64 / per_sec.max(1e-9));
        handles.push(tokio::spawn(sender(
            ws,
            i as u64 + 1,
            room_of(i),
            (senders_in(r) + listeners) as u64,
            per_sec,
            quota,
            window,
            size,
            start + offset.min(Duration::from_secs(1)),
            deadline,
            sh.clone(),
        )));
    }
    // Until every message is answered (ack or refusal), or the time is up.
    let s = &sh.stats;
    let grace = deadline + Duration::from_secs(30);
    let mut last = Instant::now();
    loop {
        let answered = s.acked.load(Relaxed) + s.errors.load(Relaxed);
        if answered >= count || tokio::time::Instant::now() > grace {
            break;
        }
        if s.dropped.load(Relaxed) > 0 {
            eprintln!("scaleload: a connection closed during the run");
            break;
        }
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "scaleload: sent {} acked {} delivered {} errors {}",
                s.sent.load(Relaxed),
                s.acked.load(Relaxed),
                s.delivered.load(Relaxed),
                s.errors.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_at_us = now_us();
    // Deliveries trail the acks by the relay: up to 10 s for the last ones.
    let settle = Instant::now();
    while s.delivered.load(Relaxed) < sh.expected.load(Relaxed)
        && settle.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let send_secs = (sh.last_send_us.load(Relaxed).saturating_sub(start_us)) as f64 / 1e6;
    let ack_secs = (acked_at_us.saturating_sub(start_us)) as f64 / 1e6;
    let acked = s.acked.load(Relaxed);
    let expected = sh.expected.load(Relaxed);
    let delivered = s.delivered.load(Relaxed);
    let ack_q = sh.ack_hist.quantiles(&QS);
    let del_q = s.hist.quantiles(&QS);
    let achieved = if send_secs > 0.0 {
        s.sent.load(Relaxed) as f64 / send_secs
    } else {
        0.0
    };
    let result = json!({
        "nodes": targets.len(),
        "clients": clients,
        "rooms": rooms,
        "listeners_per_room": listeners,
        "members_per_room": (clients as f64 / rooms as f64) + listeners as f64,
        "nodes_per_room": if same_node { 1 } else { targets.len().min(clients / rooms + listeners) },
        "payload_bytes": size,
        "offered_rate": rate,
        "count": count,
        "window": window,
        "sent": s.sent.load(Relaxed),
        "acked": acked,
        "errors": s.errors.load(Relaxed),
        "dropped": s.dropped.load(Relaxed),
        "window_full_ticks": sh.window_full.load(Relaxed),
        "send_secs": send_secs,
        "ack_secs": ack_secs,
        "achieved_send_rate": achieved,
        "delivered": delivered,
        "expected_deliveries": expected,
        "delivery_ratio": if expected > 0 { delivered as f64 / expected as f64 } else { 0.0 },
        "ack_ms": {"p50": ack_q[0], "p90": ack_q[1], "p99": ack_q[2], "p999": ack_q[3]},
        "delivery_ms": {"p50": del_q[0], "p90": del_q[1], "p99": del_q[2], "p999": del_q[3]},
        // Below the offered rate, or a queue of unacked sends: saturated.
        "saturated": achieved < rate * 0.97
            || sh.window_full.load(Relaxed) > 0
            || acked < count,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    eprintln!("scaleload: wrote {out}");
    cue("done").await?;
    for h in handles {
        h.abort();
    }
    Ok(())
}

async fn idle(a: &HashMap<String, String>) -> Result<(), Error> {
    let targets = targets(a)?;
    let n: usize = num(a, "clients", 10_000)?;
    let room_size: usize = num::<usize>(a, "room-size", 100)?.max(1);
    let prefix = a.get("prefix").cloned().unwrap_or_else(|| "idle".into());
    let ramp: usize = num(a, "ramp", 200)?;
    let out = need(a, "out")?;
    let plan = (0..n)
        .map(|i| {
            (
                i,
                targets[i % targets.len()].clone(),
                format!("{prefix}{}", i / room_size),
            )
        })
        .collect();
    let (conns, failed) = connect(plan, ramp, false).await?;
    let stats = Arc::new(Stats::new());
    let connected = conns.len();
    for (_, ws) in conns {
        spawn_reader(ws, stats.clone());
    }
    let started = Instant::now();
    cue("ready").await?;
    let result: Value = json!({
        "clients": n,
        "connected": connected,
        "connect_failures": failed,
        "room_size": room_size,
        "held_secs": started.elapsed().as_secs_f64(),
        "dropped": stats.dropped.load(Relaxed),
        "errors": stats.errors.load(Relaxed),
    });
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    Ok(())
}
