//! chatbench: a load generator for chat servers over WebSocket.
//!
//! ```text
//! chatbench run --workload fanout|crossnode|rooms|idle|durable|storm --system NAME
//!               --proto ours|raw|socketio|centrifugo|centrifugo-pb
//!               --url 127.0.0.1:8080[,127.0.0.1:8081] --pid PID[,PID] --out DIR [options]
//! chatbench report DIR                      # DIR/results.md and charts, every repetition
//! chatbench doc DOCUMENT bench/results/NAME # refresh the document's tables of NAME
//! ```
//!
//! Options: `--clients N`, `--rooms R`, `--rates r1,r2,…` (publisher steps, msgs/s),
//! `--step-secs S`, `--payload BYTES`, `--period SECS` (rooms: one message per
//! client per period), `--secs S` (rooms, durable), `--window W` (durable: unacked
//! sends per client), `--ramp C` (connects in flight), `--rep N` (which
//! repetition, recorded), `--helpers TEXT` (where the services ran, recorded).

mod proto;
mod report;
mod stats;
mod storm;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use proto::{Error, Proto, Target, Ws};
use stats::{now_us, payload, proc_sample, Stats, HZ};

const QS: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

struct Opts {
    args: HashMap<String, String>,
}

impl Opts {
    fn parse(list: &[String]) -> Result<Opts, Error> {
        let mut args = HashMap::new();
        let mut it = list.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {k}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            args.insert(key.to_string(), v.clone());
        }
        Ok(Opts { args })
    }
    fn str(&self, k: &str) -> Result<String, Error> {
        self.args
            .get(k)
            .cloned()
            .ok_or_else(|| format!("--{k} is required").into())
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, Error> {
        match self.args.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{k}: bad number {v}").into()),
        }
    }
    fn list<T: std::str::FromStr>(&self, k: &str) -> Result<Vec<T>, Error> {
        self.str(k)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| format!("--{k}: bad value {s}").into())
            })
            .collect()
    }
}

struct Bench {
    workload: String,
    system: String,
    targets: Vec<Target>,
    pids: Vec<u32>,
    stats: Arc<Stats>,
    payload: usize,
    ramp: usize,
}

/// The value of the first `key: value` line of a /proc file whose key is `key`.
fn proc_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    })
}

/// The processor, its count and the memory of this machine.
fn machine() -> String {
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_default();
    let mem = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    format!("{cpu}, cpus {} online, {} MiB", online.trim(), mem / 1024)
}

/// The cores a process may run on (`self` or a pid), as the kernel lists them.
fn cpus_allowed(pid: &str) -> String {
    proc_field(&format!("/proc/{pid}/status"), "Cpus_allowed_list").unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("report") => match args.get(1) {
            Some(dir) => report::write(dir),
            None => Err("usage: chatbench report DIR".into()),
        },
        Some("doc") => match (args.get(1), args.get(2)) {
            (Some(doc), Some(dir)) => {
                let name = std::path::Path::new(dir.trim_end_matches('/'))
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                report::doc(doc, &name, dir)
            }
            _ => Err("usage: chatbench doc DOCUMENT bench/results/NAME".into()),
        },
        Some("run") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Error::from)
            .and_then(|rt| rt.block_on(run(&args[1..]))),
        _ => {
            Err("usage: chatbench run --workload … | chatbench report DIR (see the source)".into())
        }
    };
    if let Err(e) = result {
        eprintln!("chatbench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), Error> {
    let o = Opts::parse(args)?;
    let proto = Proto::parse(&o.str("proto")?)
        .ok_or("--proto: ours, raw, socketio, centrifugo or centrifugo-pb")?;
    let targets = o
        .list::<SocketAddr>("url")?
        .into_iter()
        .map(|addr| Target { proto, addr })
        .collect::<Vec<_>>();
    let pids = if o.args.contains_key("pid") {
        o.list::<u32>("pid")?
    } else {
        Vec::new()
    };
    let b = Bench {
        workload: o.str("workload")?,
        system: o.str("system")?,
        targets,
        pids,
        stats: Arc::new(Stats::new()),
        payload: o.num("payload", 100)?,
        ramp: o.num("ramp", 100)?,
    };
    let load = load_average();
    let mut out = match b.workload.as_str() {
        "fanout" | "crossnode" => fanout(&b, &o).await?,
        "rooms" => rooms(&b, &o).await?,
        "idle" => idle(&b, &o).await?,
        "durable" => durable(&b, &o).await?,
        "storm" => storm::storm(&b, &o).await?,
        w => return Err(format!("unknown workload {w}").into()),
    };
    out["workload"] = json!(b.workload);
    out["system"] = json!(b.system);
    out["proto"] = json!(format!("{proto:?}"));
    out["nodes"] = json!(b.targets.len());
    out["payload_bytes"] = json!(b.payload);
    out["load_average_start"] = json!(load);
    out["load_average_end"] = json!(load_average());
    out["machine"] = json!(machine());
    out["load_generator_cpus"] = json!(cpus_allowed("self"));
    out["server_cpus"] = json!(b
        .pids
        .iter()
        .map(|p| cpus_allowed(&p.to_string()))
        .collect::<Vec<_>>());
    out["helper_cpus"] = json!(o.args.get("helpers").cloned().unwrap_or_default());
    out["rep"] = json!(o.num("rep", 1u32)?);
    let dir = o.str("out")?;
    std::fs::create_dir_all(&dir)?;
    let path = format!("{dir}/{}-{}.json", b.workload, b.system);
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    eprintln!("wrote {path}");
    Ok(())
}

/// Opens `n` clients (client `i` joins `room(i)` on target `i % targets`),
/// at most `ramp` handshakes in flight. Returns the clients and connects/s.
async fn connect_all(
    b: &Bench,
    n: usize,
    room: impl Fn(usize) -> Option<String>,
) -> (Vec<(usize, Ws)>, f64) {
    let sem = Arc::new(Semaphore::new(b.ramp.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for i in 0..n {
        let t = b.targets[i % b.targets.len()].clone();
        let r = room(i);
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, proto::open(&t, i, r.as_deref()).await)
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut last = Instant::now();
    let mut first_err = None;
    while let Some(res) = set.join_next().await {
        match res {
            Ok((i, Ok(ws))) => {
                b.stats.open.fetch_add(1, Relaxed);
                out.push((i, ws));
            }
            Ok((_, Err(e))) => {
                b.stats.errors.fetch_add(1, Relaxed);
                first_err.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                b.stats.errors.fetch_add(1, Relaxed);
            }
        }
        if last.elapsed() > Duration::from_millis(500) {
            last = Instant::now();
            eprint!(
                "\r[{} {}] connecting {}/{} errors {}   ",
                b.workload,
                b.system,
                out.len(),
                n,
                b.stats.errors.load(Relaxed)
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "\r[{} {}] connected {}/{} in {:.1}s ({:.0}/s), errors {}{}",
        b.workload,
        b.system,
        out.len(),
        n,
        secs,
        out.len() as f64 / secs,
        b.stats.errors.load(Relaxed),
        first_err
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    let rate = out.len() as f64 / secs;
    (out, rate)
}

/// Reads a subscriber until it closes: counts messages, answers heartbeats.
fn spawn_reader(mut ws: Ws, p: Proto, stats: Arc<Stats>) {
    tokio::spawn(async move {
        let mut cause = "end of stream".to_string();
        'read: while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(frame)) => {
                    cause = match frame {
                        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
                        None => "close without a code".to_string(),
                    };
                    break;
                }
                Err(e) => {
                    cause = format!("error: {e}");
                    break;
                }
                Ok(m) => {
                    for reply in p.replies(&m) {
                        if let Some(answer) = p.heartbeat_reply(&reply) {
                            if ws.send(answer).await.is_err() {
                                cause = "send failed".to_string();
                                break 'read;
                            }
                        } else {
                            if p.is_error(&reply) {
                                stats.errors.fetch_add(1, Relaxed);
                            }
                            stats.on_frame(&reply, now_us());
                        }
                    }
                }
            }
        }
        stats.open.fetch_sub(1, Relaxed);
        stats.dropped.fetch_add(1, Relaxed);
        stats.drop_cause(cause);
    });
}

/// Prints a progress line every second until the returned sender is dropped.
fn progress(b: &Bench, label: String) -> watch::Sender<()> {
    let (tx, mut rx) = watch::channel(());
    let stats = b.stats.clone();
    let name = format!("{} {}", b.workload, b.system);
    let pids = b.pids.clone();
    tokio::spawn(async move {
        let mut prev = (stats.sent.load(Relaxed), stats.delivered.load(Relaxed));
        let mut cpu = proc_sample(&pids).0;
        let start = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = rx.changed() => if r.is_err() { break },
            }
            let now = (stats.sent.load(Relaxed), stats.delivered.load(Relaxed));
            let (c, rss) = proc_sample(&pids);
            let p = stats.hist.quantiles(&[0.99]);
            eprint!(
                "\r[{name}] {label} {:>3.0}s open {} sent/s {} delivered/s {} p99 {:.1}ms errors {} dropped {} cpu {:.0}% rss {} MiB   ",
                start.elapsed().as_secs_f64(),
                stats.open.load(Relaxed),
                now.0.saturating_sub(prev.0),
                now.1.saturating_sub(prev.1),
                p[0],
                stats.errors.load(Relaxed),
                stats.dropped.load(Relaxed),
                (c.saturating_sub(cpu)) as f64 / HZ * 100.0,
                rss / 1024
            );
            prev = now;
            cpu = c;
        }
        eprintln!();
    });
    tx
}

/// One measured interval: counters and server CPU/RSS over `secs`.
async fn measure(b: &Bench, label: &str, secs: f64) -> Value {
    let s = &b.stats;
    s.hist.reset();
    let d0 = s.delivered.load(Relaxed);
    let s0 = s.sent.load(Relaxed);
    let a0 = s.acked.load(Relaxed);
    let e0 = s.errors.load(Relaxed);
    let x0 = s.dropped.load(Relaxed);
    let (c0, _) = proc_sample(&b.pids);
    let me = [std::process::id()];
    let (l0, _) = proc_sample(&me);
    let start = Instant::now();
    let bar = progress(b, label.to_string());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let el = start.elapsed().as_secs_f64();
    drop(bar);
    let (c1, rss) = proc_sample(&b.pids);
    let (l1, _) = proc_sample(&me);
    let q = s.hist.quantiles(&QS);
    tokio::time::sleep(Duration::from_millis(20)).await;
    json!({
        "secs": el,
        "sent_per_sec": (s.sent.load(Relaxed) - s0) as f64 / el,
        "acked_per_sec": (s.acked.load(Relaxed) - a0) as f64 / el,
        "delivered_per_sec": (s.delivered.load(Relaxed) - d0) as f64 / el,
        "p50_ms": q[0], "p90_ms": q[1], "p99_ms": q[2], "p999_ms": q[3],
        "errors": s.errors.load(Relaxed) - e0,
        "dropped": s.dropped.load(Relaxed) - x0,
        "drop_causes": s.take_drop_causes(),
        "open": s.open.load(Relaxed),
        "server_cpu_pct": (c1.saturating_sub(c0)) as f64 / HZ / el * 100.0,
        "server_rss_mib": rss as f64 / 1024.0,
        // The load generator's own CPU: near 100% pinned, it is the limit.
        "load_generator_cpu_pct": (l1.saturating_sub(l0)) as f64 / HZ / el * 100.0,
    })
}

/// Publishes at the rate in `rate` (msgs/s; 0 pauses) until the program ends.
fn spawn_publisher(
    mut ws: Ws,
    p: Proto,
    room: String,
    size: usize,
    stats: Arc<Stats>,
    mut rate: watch::Receiver<f64>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n: u64 = 0;
        let mut r = 0.0;
        let mut since = Instant::now();
        let mut done: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let due = (r * since.elapsed().as_secs_f64()) as u64;
                    // Never burst more than 50 ms worth after a stall.
                    let cap = ((r * 0.05) as u64).max(1);
                    let todo = due.saturating_sub(done).min(cap);
                    if due > done + cap { done = due - cap; }
                    for _ in 0..todo {
                        n += 1;
                        let f = p.publish(&room, &payload(size), n);
                        if ws.feed(f).await.is_err() { return; }
                        stats.sent.fetch_add(1, Relaxed);
                    }
                    done += todo;
                    if todo > 0 && ws.flush().await.is_err() { return; }
                }
                c = rate.changed() => {
                    if c.is_err() { return; }
                    r = *rate.borrow();
                    since = Instant::now();
                    done = 0;
                }
                m = ws.next() => match m {
                    Some(Ok(m)) => {
                        for r in p.replies(&m) {
                            if let Some(answer) = p.heartbeat_reply(&r) {
                                if ws.send(answer).await.is_err() { return; }
                            } else if p.is_ack(&r) {
                                stats.acked.fetch_add(1, Relaxed);
                            } else if p.is_error(&r) {
                                stats.errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    _ => { stats.errors.fetch_add(1, Relaxed); return; }
                },
            }
        }
    });
}

/// W1 and W4: one room, N subscribers, one publisher stepping its rate up.
async fn fanout(b: &Bench, o: &Opts) -> Result<Value, Error> {
    let n: usize = o.num("clients", 1000)?;
    let rates: Vec<f64> = o.list("rates")?;
    let step: f64 = o.num("step-secs", 5.0)?;
    let (subs, connect_rate) = connect_all(b, n, |_| Some("fan".to_string())).await;
    let subscribers = subs.len();
    for (_, ws) in subs {
        spawn_reader(ws, b.targets[0].proto, b.stats.clone());
    }
    let pub_room = match b.targets[0].proto {
        Proto::Ours => Some("fan"),
        _ => None,
    };
    let publisher = proto::open(&b.targets[0], n, pub_room).await?;
    let (rate_tx, rate_rx) = watch::channel(0.0);
    spawn_publisher(
        publisher,
        b.targets[0].proto,
        "fan".into(),
        b.payload,
        b.stats.clone(),
        rate_rx,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Warm-up, not measured: the first messages of a fresh room pay one-off
    // costs (a cluster node seeds the room's sequence, connects its producer).
    rate_tx.send(10.0)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rate_tx.send(0.0)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut steps = Vec::new();
    let mut best = 0.0f64;
    let mut sustained_rate = 0.0f64;
    let mut misses = 0;
    let mut drops_below_saturation = 0u64;
    for rate in rates {
        let open0 = b.stats.open.load(Relaxed) as f64;
        rate_tx.send(rate)?;
        let d0 = b.stats.delivered.load(Relaxed);
        let s0 = b.stats.sent.load(Relaxed);
        let mut m = measure(b, &format!("rate {rate}/s"), step).await;
        rate_tx.send(0.0)?;
        // Messages of this step still in flight count for the delivery ratio
        // (not for delivered/s): give them a moment to arrive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let sent_total = (b.stats.sent.load(Relaxed) - s0) as f64;
        let got_total = (b.stats.delivered.load(Relaxed) - d0) as f64;
        let sent = m["sent_per_sec"].as_f64().unwrap_or(0.0);
        let got = m["delivered_per_sec"].as_f64().unwrap_or(0.0);
        // Every subscriber open when the step began owes every message.
        let ratio = if sent_total > 0.0 {
            got_total / (sent_total * open0.max(1.0))
        } else {
            0.0
        };
        let p99 = m["p99_ms"].as_f64().unwrap_or(0.0);
        let dropped = m["dropped"].as_u64().unwrap_or(0);
        // Sustained: the publisher kept its rate, >= 99.9% of the deliveries
        // arrived, no subscriber was dropped and p99 <= 100 ms.
        let sustained = sent >= rate * 0.98 && ratio >= 0.999 && dropped == 0 && p99 <= 100.0;
        // Saturated: far past what the server can take; higher steps would
        // only measure its queues.
        let saturated = ratio < 0.97 || sent < rate * 0.9 || p99 > 1000.0;
        // A subscriber dropped while the server kept up is a fault (of the
        // server or of this harness), never a data point.
        if dropped > 0 && !saturated {
            drops_below_saturation += dropped;
        }
        m["rate"] = json!(rate);
        m["delivery_ratio"] = json!(ratio);
        m["sustained"] = json!(sustained);
        m["saturated"] = json!(saturated);
        best = best.max(got);
        if sustained {
            sustained_rate = rate;
            misses = 0;
        } else {
            misses += 1;
        }
        steps.push(m);
        // One step that misses may be noise; two in a row, or saturation, end the ladder.
        if saturated || misses >= 2 {
            break;
        }
    }
    Ok(json!({
        "clients": n,
        "subscribers": subscribers,
        "connect_per_sec": connect_rate,
        "connect_errors": n - subscribers,
        "max_delivered_per_sec": best,
        "sustained_rate": sustained_rate,
        "drops_below_saturation": drops_below_saturation,
        "steps": steps,
    }))
}

/// W2: N clients in R rooms, each sending one message every `period` seconds.
async fn rooms(b: &Bench, o: &Opts) -> Result<Value, Error> {
    let n: usize = o.num("clients", 5000)?;
    let r: usize = o.num("rooms", 500)?;
    let period: f64 = o.num("period", 5.0)?;
    let secs: f64 = o.num("secs", 30.0)?;
    let (clients, connect_rate) = connect_all(b, n, |i| Some(format!("r{}", i % r))).await;
    let connected = clients.len();
    let p = b.targets[0].proto;
    let (go_tx, go_rx) = watch::channel(false);
    for (i, mut ws) in clients {
        let stats = b.stats.clone();
        let mut go = go_rx.clone();
        let room = format!("r{}", i % r);
        let size = b.payload;
        tokio::spawn(async move {
            let _ = go.wait_for(|v| *v).await;
            let offset = Duration::from_secs_f64(period * (i % n.max(1)) as f64 / n.max(1) as f64);
            let mut next = tokio::time::Instant::now() + offset;
            let mut k: u64 = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {
                        next += Duration::from_secs_f64(period);
                        k += 1;
                        if ws.send(p.publish(&room, &payload(size), k)).await.is_err() { break; }
                        stats.sent.fetch_add(1, Relaxed);
                    }
                    m = ws.next() => match m {
                        Some(Ok(m)) => {
                            let mut failed = false;
                            for r in p.replies(&m) {
                                if let Some(answer) = p.heartbeat_reply(&r) {
                                    if ws.send(answer).await.is_err() { failed = true; break; }
                                } else {
                                    if p.is_ack(&r) { stats.acked.fetch_add(1, Relaxed); }
                                    else if p.is_error(&r) { stats.errors.fetch_add(1, Relaxed); }
                                    stats.on_frame(&r, now_us());
                                }
                            }
                            if failed { break; }
                        }
                        _ => break,
                    },
                }
            }
            stats.open.fetch_sub(1, Relaxed);
            stats.dropped.fetch_add(1, Relaxed);
        });
    }
    go_tx.send(true)?;
    // One period of warm-up so that every client is sending.
    tokio::time::sleep(Duration::from_secs_f64(period)).await;
    let mut m = measure(b, "steady", secs).await;
    let per_room = connected as f64 / r as f64;
    let sent = m["sent_per_sec"].as_f64().unwrap_or(0.0);
    m["expected_delivered_per_sec"] = json!(sent * per_room);
    m["clients"] = json!(n);
    m["rooms"] = json!(r);
    m["period_secs"] = json!(period);
    m["connected"] = json!(connected);
    m["connect_per_sec"] = json!(connect_rate);
    Ok(m)
}

/// W3: N idle connections (each in a room of `--room-size`, 100 by
/// default); resident memory per connection.
async fn idle(b: &Bench, o: &Opts) -> Result<Value, Error> {
    let n: usize = o.num("clients", 20000)?;
    let room_size: usize = o.num("room-size", 100usize)?.max(1);
    let (_, rss0) = proc_sample(&b.pids);
    let (clients, connect_rate) =
        connect_all(b, n, |i| Some(format!("idle{}", i / room_size))).await;
    let connected = clients.len();
    for (_, ws) in clients {
        spawn_reader(ws, b.targets[0].proto, b.stats.clone());
    }
    let m = measure(b, "idle", o.num("secs", 5.0)?).await;
    let (_, rss1) = proc_sample(&b.pids);
    let per_conn = if connected > 0 {
        (rss1 as f64 - rss0 as f64) / connected as f64
    } else {
        0.0
    };
    Ok(json!({
        "clients": n,
        "room_size": room_size,
        "connected": connected,
        "connect_per_sec": connect_rate,
        "rss_before_mib": rss0 as f64 / 1024.0,
        "rss_after_mib": rss1 as f64 / 1024.0,
        "kib_per_connection": per_conn,
        "server_cpu_pct_idle": m["server_cpu_pct"],
        "dropped": m["dropped"],
        "errors": b.stats.errors.load(Relaxed),
    }))
}

async fn metrics(targets: &[Target]) -> (f64, f64) {
    let mut persisted = 0.0;
    let mut lag = 0.0;
    for t in targets {
        let Ok(body) = proto::http(proto::source_ip(0), t.addr, "GET", "/metrics", "").await else {
            continue;
        };
        for line in body.lines() {
            let mut it = line.split_whitespace();
            let (Some(name), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let v: f64 = v.parse().unwrap_or(0.0);
            if name.starts_with("scalable_chat_persist_messages_total") {
                persisted += v;
            } else if name.starts_with("scalable_chat_consumer_lag") {
                lag += v;
            }
        }
    }
    (persisted, lag)
}

/// W5 (ours): closed-loop senders, `window` unacked each; accepted msgs/s,
/// then the time until the persist workers have stored them all.
async fn durable(b: &Bench, o: &Opts) -> Result<Value, Error> {
    let n: usize = o.num("clients", 50)?;
    let window: usize = o.num("window", 32)?;
    let secs: f64 = o.num("secs", 20.0)?;
    let nrooms: usize = o.num("rooms", 4)?;
    let (persisted0, _) = metrics(&b.targets).await;
    let (clients, connect_rate) =
        connect_all(b, n, |i| Some(format!("dur{}", i % nrooms.max(1)))).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::new();
    for (i, mut ws) in clients {
        let stats = b.stats.clone();
        let stop = stop_rx.clone();
        let room = format!("dur{}", i % nrooms.max(1));
        let size = b.payload;
        let p = b.targets[0].proto;
        handles.push(tokio::spawn(async move {
            let mut inflight = 0usize;
            let mut k: u64 = (i as u64) << 32;
            loop {
                let stopping = *stop.borrow();
                while !stopping && inflight < window {
                    k += 1;
                    if ws.feed(p.publish(&room, &payload(size), k)).await.is_err() {
                        return;
                    }
                    stats.sent.fetch_add(1, Relaxed);
                    inflight += 1;
                }
                if ws.flush().await.is_err() {
                    return;
                }
                if stopping && inflight == 0 {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(m))) => {
                        for r in p.replies(&m) {
                            if let Some(answer) = p.heartbeat_reply(&r) {
                                if ws.send(answer).await.is_err() {
                                    return;
                                }
                            } else if p.is_ack(&r) {
                                stats.acked.fetch_add(1, Relaxed);
                                inflight = inflight.saturating_sub(1);
                            } else if p.is_error(&r) {
                                stats.errors.fetch_add(1, Relaxed);
                                inflight = inflight.saturating_sub(1);
                            }
                        }
                    }
                    _ => {
                        stats.errors.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let mut m = measure(b, "sending", secs).await;
    stop_tx.send(true)?;
    for h in handles {
        let _ = h.await;
    }
    let acked = b.stats.acked.load(Relaxed) as f64;
    let (_, lag_at_stop) = metrics(&b.targets).await;
    let t = Instant::now();
    let mut persisted = 0.0;
    let mut lag = lag_at_stop;
    let mut drain_secs = 0.0;
    while t.elapsed() < Duration::from_secs(120) {
        let (p, l) = metrics(&b.targets).await;
        persisted = p - persisted0;
        drain_secs = t.elapsed().as_secs_f64();
        lag = l;
        eprint!(
            "\r[durable {}] stored {persisted:.0}/{acked:.0} lag {lag:.0}   ",
            b.system
        );
        if persisted >= acked {
            // The lag gauge trails the stores by a measurement or two:
            // give it up to 10 s to reach 0.
            let settle = Instant::now();
            while lag > 0.0 && settle.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                lag = metrics(&b.targets).await.1;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!();
    m["clients"] = json!(n);
    m["window"] = json!(window);
    m["rooms"] = json!(nrooms);
    m["connect_per_sec"] = json!(connect_rate);
    m["acked_total"] = json!(acked);
    m["stored_total"] = json!(persisted);
    m["lost"] = json!((acked - persisted).max(0.0));
    m["lag_at_stop"] = json!(lag_at_stop);
    m["lag_after"] = json!(lag);
    m["drain_secs"] = json!(drain_secs);
    Ok(m)
}
