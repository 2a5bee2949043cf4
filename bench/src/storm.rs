//! W6: a reconnect storm.
//!
//! `--clients N` subscribers and `--steady K` undisturbed ones share one
//! room; one publisher posts `--rate R` messages a second for the whole run
//! and numbers them (`@@n=<k>@@` after the send time in the text). After
//! `--warm S` seconds the N subscribers lose their connections all at once
//! and come straight back, at most `--ramp` connects in flight, each resuming
//! where it was: ours signs in again (a fresh token) and joins with `since` =
//! the highest `seq` it has seen; Centrifugo subscribes with `recover` and the
//! last `epoch` and `offset`. The run goes on for `--after S` seconds, the
//! publisher stops, and then every client's numbers are counted against the
//! messages the server acknowledged: missed = acked − seen, duplicates apart.
//!
//! How the connections are lost (`--drop`):
//! - `reset` (the default): SO_LINGER is set to zero and the socket closed,
//!   so the kernel sends a TCP RST and no WebSocket close frame. That is a
//!   network blip the server hears about at once (a silent blip would leave
//!   the old sessions open until the server's heartbeat timeout).
//! - `close`: a WebSocket close frame, then the socket is closed without
//!   waiting for the server's answer.
//!
//! Only `--proto ours` and `--proto centrifugo` can resume.
//!
//! Options: `--clients N` (10000), `--steady K` (100), `--rate R` (50),
//! `--warm S` (5; its first second is not measured), `--after S` (5),
//! `--drop reset|close`, `--attempts A` (3: connects tried per resume),
//! `--resume-timeout S` (60: a client not back by then gives up), and the
//! common `--ramp C` and `--payload BYTES`.
//!
//! The steady clients' delivery latency is kept apart from the global
//! histogram, for three windows: before the storm, during it (from the drop
//! until the last client has resumed or given up), and after it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::proto::{self, Error, Proto, Target, Ws, MARK};
use crate::stats::{now_us, proc_sample, Stats, HZ};
use crate::{Bench, Opts, QS};

const ROOM: &str = "storm";
/// The marker in front of a message's number in its text.
const NUM: &str = "@@n=";
/// How long one connect (sign-in, handshake, join and replay) may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many distinct error causes are kept; the rest count as "other".
const MAX_CAUSES: usize = 32;

/// The text of message `n`: its send time, its number, padding to `size`.
fn text(size: usize, n: u64) -> String {
    let mut s = format!("{MARK}{}{NUM}{n}@@", now_us());
    while s.len() < size {
        s.push('x');
    }
    s
}

/// The decimal number right after the first `key` in `s`.
fn number_after(s: &str, key: &str) -> Option<u64> {
    let rest = &s[s.find(key)? + key.len()..];
    let end = rest
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The message numbers one client has seen.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    unique: u64,
    dups: u64,
}

impl Seen {
    /// Notes number `n`; false when it was seen before (or is absurd).
    fn note(&mut self, n: u64) -> bool {
        if n > 1 << 26 {
            return false;
        }
        let (w, bit) = ((n / 64) as usize, 1u64 << (n % 64));
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & bit != 0 {
            self.dups += 1;
            return false;
        }
        self.bits[w] |= bit;
        self.unique += 1;
        true
    }

    fn has(&self, n: u64) -> bool {
        self.bits
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    fn numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| (w * 64 + b) as u64)
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DropMode {
    Reset,
    Close,
}

/// Time spent in each step of one (re)connect.
#[derive(Clone, Copy, Default)]
struct Phases {
    /// Waiting for a connect slot (`--ramp`).
    wait: Duration,
    /// Ours: the guest sign-in over HTTP.
    signin: Duration,
    /// TCP connect, WebSocket handshake, and `welcome` / the connect reply.
    ws: Duration,
    /// `join since` up to `joined` / `subscribe` with recovery up to its reply,
    /// the replay included.
    join: Duration,
    replayed: u64,
    /// The size of `joined` / the subscribe reply (ours lists every member).
    reply_bytes: u64,
}

/// How one subscriber came back after the storm.
struct Resume {
    /// From the drop to resumed (replay received).
    total: Duration,
    attempts: usize,
    phases: Phases,
}

/// Where a client stands in the room's stream: ours uses `last` as the
/// highest `seq`; Centrifugo the stream's `epoch` and the last `offset`.
#[derive(Default)]
struct Pos {
    epoch: String,
    last: u64,
}

struct Client {
    i: usize,
    steady: bool,
    stats: Arc<Stats>,
    seen: Seen,
    pos: Pos,
    connected: bool,
    resume: Option<Resume>,
    /// Reconnects after losing the connection other than by the storm.
    unplanned: u64,
}

/// What every client shares.
struct Shared {
    proto: Proto,
    targets: Vec<Target>,
    ramp: Semaphore,
    attempts: usize,
    /// How long after its drop a client may take to resume.
    resume_limit: Duration,
    drop_mode: DropMode,
    connected: AtomicU64,
    /// Of those, the ones the storm will drop.
    storm_connected: AtomicU64,
    failed: AtomicU64,
    resumed: AtomicU64,
    gave_up: AtomicU64,
    /// Subscribes with recovery that Centrifugo answered `recovered: false`.
    not_recovered: AtomicU64,
    /// New message numbers seen, over every client.
    unique: AtomicU64,
    /// Failed connect attempts by cause, the initial connects apart.
    initial_errors: Mutex<BTreeMap<String, u64>>,
    storm_errors: Mutex<BTreeMap<String, u64>>,
}

fn note_cause(map: &Mutex<BTreeMap<String, u64>>, cause: String) {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    let key = if m.len() >= MAX_CAUSES && !m.contains_key(&cause) {
        "other".to_string()
    } else {
        cause
    };
    *m.entry(key).or_insert(0) += 1;
}

fn causes(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    map.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Client {
    /// Takes in one reply if it is a message of the room; true if it was.
    fn on_message(&mut self, sh: &Shared, r: &str, now: u64) -> bool {
        let pos = match sh.proto {
            Proto::Ours if r.starts_with(r#"{"op":"msg""#) => number_after(r, r#""seq":"#),
            Proto::Centrifugo if r.starts_with(r#"{"push":"#) && r.contains(r#""pub":"#) => {
                Some(number_after(r, r#""offset":"#).unwrap_or(0))
            }
            _ => return false,
        };
        if let Some(p) = pos {
            self.pos.last = self.pos.last.max(p);
        }
        self.note(sh, r);
        self.stats.on_frame(r, now);
        true
    }

    fn note(&mut self, sh: &Shared, r: &str) {
        if let Some(n) = number_after(r, NUM) {
            if self.seen.note(n) {
                sh.unique.fetch_add(1, Relaxed);
            }
        }
    }

    /// Reads one frame: messages, heartbeats, refusals.
    async fn on_frame(&mut self, sh: &Shared, ws: &mut Ws, m: &Message) -> Result<(), Error> {
        let now = now_us();
        for r in sh.proto.replies(m) {
            if let Some(answer) = sh.proto.heartbeat_reply(&r) {
                ws.send(answer).await?;
            } else if !self.on_message(sh, &r, now) && sh.proto.is_error(&r) {
                self.stats.errors.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }
}

/// Ours: `join`, with `since` when resuming, up to `joined`. Returns how
/// many messages the replay carried and the size of `joined`.
async fn join_ours(
    sh: &Shared,
    c: &mut Client,
    ws: &mut Ws,
    resume: bool,
) -> Result<(u64, u64), Error> {
    let since = if resume {
        format!(r#","since":{}"#, c.pos.last)
    } else {
        String::new()
    };
    ws.send(Message::text(format!(
        r#"{{"op":"join","room":"{ROOM}"{since}}}"#
    )))
    .await?;
    let mut replayed = 0;
    loop {
        let m = next(ws).await?;
        let now = now_us();
        for r in sh.proto.replies(&m) {
            if r.starts_with(r#"{"op":"joined""#) {
                if !resume {
                    let last = number_after(&r, r#""last_seq":"#).unwrap_or(0);
                    c.pos.last = c.pos.last.max(last);
                }
                return Ok((replayed, r.len() as u64));
            } else if c.on_message(sh, &r, now) {
                replayed += 1;
            } else if sh.proto.is_error(&r) {
                return Err(format!("refused: {r}").into());
            }
        }
    }
}

/// Centrifugo: `subscribe`, with `recover` and the last position when
/// resuming, up to its reply (which carries the missed publications).
/// Returns how many it carried and the size of the reply.
async fn subscribe_centrifugo(
    sh: &Shared,
    c: &mut Client,
    ws: &mut Ws,
    resume: bool,
) -> Result<(u64, u64), Error> {
    let channel = format!("bench:{ROOM}");
    let req = if resume && !c.pos.epoch.is_empty() {
        json!({"id": 2, "subscribe": {"channel": channel, "recover": true,
            "epoch": c.pos.epoch, "offset": c.pos.last}})
    } else {
        json!({"id": 2, "subscribe": {"channel": channel}})
    };
    ws.send(Message::text(req.to_string())).await?;
    loop {
        let m = next(ws).await?;
        let now = now_us();
        let mut replayed = None;
        for r in sh.proto.replies(&m) {
            if let Some(answer) = sh.proto.heartbeat_reply(&r) {
                ws.send(answer).await?;
            } else if replayed.is_none() && r.starts_with(r#"{"id":2,"#) {
                let v: Value = serde_json::from_str(&r)?;
                if !v["error"].is_null() {
                    return Err(format!("refused: {}", v["error"]).into());
                }
                let s = &v["subscribe"];
                if resume && s["recovered"].as_bool() != Some(true) {
                    sh.not_recovered.fetch_add(1, Relaxed);
                }
                let pubs = s["publications"].as_array().map_or(&[][..], |a| a);
                for p in pubs {
                    if let Some(t) = p["data"]["text"].as_str() {
                        c.note(sh, t);
                    }
                }
                c.stats.on_frame(&r, now);
                c.pos.epoch = s["epoch"].as_str().unwrap_or_default().to_string();
                c.pos.last = s["offset"].as_u64().unwrap_or(0);
                replayed = Some((pubs.len() as u64, r.len() as u64));
            } else if !c.on_message(sh, &r, now) && sh.proto.is_error(&r) {
                return Err(format!("refused: {r}").into());
            }
        }
        if let Some(n) = replayed {
            return Ok(n);
        }
    }
}

/// The next data frame; a close frame or the end is an error.
async fn next(ws: &mut Ws) -> Result<Message, Error> {
    match ws.next().await {
        Some(Ok(Message::Close(f))) => Err(close_cause(f.as_ref()).into()),
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(e.into()),
        None => Err("end of stream".into()),
    }
}

fn close_cause(f: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match f {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
        None => "close without a code".to_string(),
    }
}

/// One connect: sign in, open, join (resuming from `c.pos` when `resume`).
async fn attach(sh: &Shared, c: &mut Client, resume: bool) -> Result<(Ws, Phases), Error> {
    let t = &sh.targets[c.i % sh.targets.len()];
    let t0 = Instant::now();
    let token = proto::sign_in(t, c.i).await?;
    let t1 = Instant::now();
    let mut ws = proto::connect(t, c.i, &token).await?;
    let t2 = Instant::now();
    let (replayed, reply_bytes) = match sh.proto {
        Proto::Ours => join_ours(sh, c, &mut ws, resume).await?,
        Proto::Centrifugo => subscribe_centrifugo(sh, c, &mut ws, resume).await?,
        _ => return Err("the storm workload speaks --proto ours or centrifugo".into()),
    };
    let phases = Phases {
        wait: Duration::ZERO,
        signin: t1 - t0,
        ws: t2 - t1,
        join: t2.elapsed(),
        replayed,
        reply_bytes,
    };
    Ok((ws, phases))
}

/// Connects again after a drop at `since`, up to `attempts` times and
/// until `--resume-timeout` after the drop.
async fn reattach(
    sh: &Shared,
    c: &mut Client,
    since: Instant,
    errors: &Mutex<BTreeMap<String, u64>>,
) -> Option<(Ws, Resume)> {
    let deadline = tokio::time::Instant::from_std(since + sh.resume_limit);
    let tries = async {
        for attempt in 1..=sh.attempts {
            let asked = Instant::now();
            let permit = sh.ramp.acquire().await.ok()?;
            let wait = asked.elapsed();
            let r = tokio::time::timeout(ATTACH_TIMEOUT, attach(sh, c, true)).await;
            drop(permit);
            match r {
                Ok(Ok((ws, mut phases))) => {
                    phases.wait = wait;
                    let resume = Resume {
                        total: since.elapsed(),
                        attempts: attempt,
                        phases,
                    };
                    return Some((ws, resume));
                }
                Ok(Err(e)) => note_cause(errors, e.to_string()),
                Err(_) => note_cause(errors, "timed out".to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
        }
        None
    };
    tokio::time::timeout_at(deadline, tries)
        .await
        .ok()
        .flatten()
}

/// Loses the connection as `--drop` says.
async fn sever(mut ws: Ws, mode: DropMode) {
    if mode == DropMode::Close {
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    } else {
        // Cannot fail on a connected socket; a failure leaves a FIN instead.
        let _ = ws.get_ref().set_zero_linger();
    }
    drop(ws);
}

enum Event {
    Stop,
    Storm(Instant),
    Frame(Message),
    Lost(String),
}

/// A client's life: connect, read, and for the N, drop and resume once.
async fn client(
    mut c: Client,
    sh: Arc<Shared>,
    mut storm: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) -> Client {
    let first = {
        let permit = sh.ramp.acquire().await;
        let r = tokio::time::timeout(ATTACH_TIMEOUT, attach(&sh, &mut c, false)).await;
        drop(permit);
        r
    };
    let mut ws = match first {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            note_cause(&sh.initial_errors, e.to_string());
            sh.failed.fetch_add(1, Relaxed);
            return c;
        }
        Err(_) => {
            note_cause(&sh.initial_errors, "timed out".to_string());
            sh.failed.fetch_add(1, Relaxed);
            return c;
        }
    };
    c.connected = true;
    sh.connected.fetch_add(1, Relaxed);
    if !c.steady {
        sh.storm_connected.fetch_add(1, Relaxed);
    }
    let mut armed = !c.steady;
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => Event::Stop,
            r = storm.changed(), if armed => match r {
                Ok(()) => Event::Storm(storm.borrow().unwrap_or_else(Instant::now)),
                Err(_) => Event::Stop,
            },
            m = ws.next() => match m {
                Some(Ok(Message::Close(f))) => Event::Lost(close_cause(f.as_ref())),
                Some(Ok(m)) => Event::Frame(m),
                Some(Err(e)) => Event::Lost(format!("error: {e}")),
                None => Event::Lost("end of stream".to_string()),
            },
        };
        let lost = match ev {
            Event::Stop => break,
            Event::Frame(m) => c
                .on_frame(&sh, &mut ws, &m)
                .await
                .err()
                .map(|e| format!("send failed: {e}")),
            Event::Lost(cause) => Some(cause),
            Event::Storm(at) => {
                armed = false;
                sever(ws, sh.drop_mode).await;
                match reattach(&sh, &mut c, at, &sh.storm_errors).await {
                    Some((w, resume)) => {
                        ws = w;
                        c.resume = Some(resume);
                        sh.resumed.fetch_add(1, Relaxed);
                        None
                    }
                    None => {
                        sh.gave_up.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
        };
        if let Some(cause) = lost {
            // Lost other than by the storm: note why, and resume as a real
            // client would.
            c.stats.dropped.fetch_add(1, Relaxed);
            c.stats.drop_cause(cause);
            c.unplanned += 1;
            drop(ws);
            match reattach(&sh, &mut c, Instant::now(), &sh.storm_errors).await {
                Some((w, _)) => ws = w,
                None => break,
            }
        }
    }
    c
}

#[derive(Default)]
struct PubEnd {
    sent: u64,
    acked: Seen,
    errors: u64,
    lost: bool,
}

/// Publishes at `rate` msgs/s until `stop`, then waits (up to 10 s) for the
/// answers to what it sent.
async fn publisher(
    mut ws: Ws,
    p: Proto,
    rate: f64,
    size: usize,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> PubEnd {
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut end = PubEnd::default();
    let mut done: u64 = 0;
    let mut stopping: Option<Instant> = None;
    loop {
        if let Some(at) = stopping {
            if end.acked.unique + end.errors >= end.sent || at.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        tokio::select! {
            _ = tick.tick(), if stopping.is_none() => {
                let due = (rate * start.elapsed().as_secs_f64()) as u64;
                // Never burst more than 50 ms worth after a stall.
                let cap = ((rate * 0.05) as u64).max(1);
                if due > done + cap {
                    done = due - cap;
                }
                let todo = due.saturating_sub(done);
                for _ in 0..todo {
                    end.sent += 1;
                    let n = end.sent;
                    if ws.feed(p.publish(ROOM, &text(size, n), n)).await.is_err() {
                        end.lost = true;
                        return end;
                    }
                    stats.sent.fetch_add(1, Relaxed);
                }
                done += todo;
                if todo > 0 && ws.flush().await.is_err() {
                    end.lost = true;
                    return end;
                }
            }
            _ = stop.changed(), if stopping.is_none() => stopping = Some(Instant::now()),
            m = ws.next() => match m {
                Some(Ok(m)) => {
                    for r in p.replies(&m) {
                        if let Some(answer) = p.heartbeat_reply(&r) {
                            if ws.send(answer).await.is_err() {
                                end.lost = true;
                                return end;
                            }
                        } else if p.is_ack(&r) {
                            let n = match p {
                                Proto::Centrifugo => number_after(&r, r#"{"id":"#).map(|id| id.saturating_sub(10)),
                                _ => number_after(&r, r#""cid":"c"#),
                            };
                            if let Some(n) = n {
                                end.acked.note(n);
                            }
                            stats.acked.fetch_add(1, Relaxed);
                        } else if p.is_error(&r) {
                            end.errors += 1;
                            stats.errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                _ => {
                    end.lost = true;
                    return end;
                }
            },
        }
    }
    end
}

/// p50/p99/p99.9 (ms) of the steady clients since `d0` delivered, over `secs`.
fn latency(steady: &Stats, d0: u64, secs: f64) -> Value {
    let q = steady.hist.quantiles(&QS);
    json!({
        "secs": secs,
        "samples": steady.delivered.load(Relaxed) - d0,
        "p50_ms": q[0], "p90_ms": q[1], "p99_ms": q[2], "p999_ms": q[3],
    })
}

/// p50, p99 and the largest of `v`, the keys ending in `_unit`.
fn spread(mut v: Vec<f64>, unit: &str) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((v.len() as f64) * q).ceil() as usize;
        v.get(i.clamp(1, v.len().max(1)) - 1)
            .copied()
            .unwrap_or(0.0)
    };
    json!({
        format!("p50_{unit}"): at(0.5),
        format!("p99_{unit}"): at(0.99),
        format!("max_{unit}"): at(1.0),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The ten message numbers the most clients missed, with how many each.
fn most_missed(missing: &BTreeMap<u64, u64>) -> Value {
    let mut v: Vec<(u64, u64)> = missing.iter().map(|(&n, &c)| (n, c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(10);
    Value::Array(
        v.into_iter()
            .map(|(n, c)| json!({"n": n, "clients": c}))
            .collect(),
    )
}

/// Server CPU (%) since `c0` over `secs`, and RSS (MiB) now.
fn server(b: &Bench, c0: u64, secs: f64) -> (f64, f64, u64) {
    let (c1, rss) = proc_sample(&b.pids);
    let cpu = c1.saturating_sub(c0) as f64 / HZ / secs.max(1e-3) * 100.0;
    (cpu, rss as f64 / 1024.0, c1)
}

/// W6, the reconnect storm.
pub async fn storm(b: &Bench, o: &Opts) -> Result<Value, Error> {
    let n: usize = o.num("clients", 10000)?;
    let k: usize = o.num("steady", 100)?;
    // Seconds and rates: finite and not negative.
    let span = |key: &str, default: f64| -> Result<f64, Error> {
        let v: f64 = o.num(key, default)?;
        if (0.0..=1e6).contains(&v) {
            Ok(v)
        } else {
            Err(format!("--{key}: 0 to 1000000, not {v}").into())
        }
    };
    let rate = span("rate", 50.0)?;
    let warm = span("warm", 5.0)?;
    let after = span("after", 5.0)?;
    let limit = span("resume-timeout", 60.0)?;
    let attempts: usize = o.num("attempts", 3usize)?.max(1);
    let drop_mode = match o.args.get("drop").map(String::as_str) {
        None | Some("reset") => DropMode::Reset,
        Some("close") => DropMode::Close,
        Some(d) => return Err(format!("--drop: reset or close, not {d}").into()),
    };
    let p = b.targets[0].proto;
    if !matches!(p, Proto::Ours | Proto::Centrifugo) {
        return Err("the storm workload speaks --proto ours or centrifugo".into());
    }
    let sh = Arc::new(Shared {
        proto: p,
        targets: b.targets.clone(),
        ramp: Semaphore::new(b.ramp.max(1)),
        attempts,
        resume_limit: Duration::from_secs_f64(limit),
        drop_mode,
        connected: AtomicU64::new(0),
        storm_connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        resumed: AtomicU64::new(0),
        gave_up: AtomicU64::new(0),
        not_recovered: AtomicU64::new(0),
        unique: AtomicU64::new(0),
        initial_errors: Mutex::new(BTreeMap::new()),
        storm_errors: Mutex::new(BTreeMap::new()),
    });
    let steady = Arc::new(Stats::new());
    let (storm_tx, storm_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (pub_stop_tx, pub_stop_rx) = watch::channel(false);
    let label = format!("[{} {}]", b.workload, b.system);

    // Connect the N and the K.
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(n + k);
    for i in 0..n + k {
        let c = Client {
            i,
            steady: i >= n,
            stats: if i >= n {
                steady.clone()
            } else {
                b.stats.clone()
            },
            seen: Seen::default(),
            pos: Pos::default(),
            connected: false,
            resume: None,
            unplanned: 0,
        };
        handles.push(tokio::spawn(client(
            c,
            sh.clone(),
            storm_rx.clone(),
            stop_rx.clone(),
        )));
    }
    loop {
        let (ok, failed) = (sh.connected.load(Relaxed), sh.failed.load(Relaxed));
        eprint!("\r{label} connecting {ok}/{} errors {failed}   ", n + k);
        if (ok + failed) as usize >= n + k {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = sh.connected.load(Relaxed);
    eprintln!(
        "\r{label} connected {connected}/{} in {connect_secs:.1}s, errors {}   ",
        n + k,
        sh.failed.load(Relaxed)
    );

    // The publisher (ours must be in the room to post there).
    let room = (p == Proto::Ours).then_some(ROOM);
    let pub_ws = proto::open(&b.targets[0], n + k, room).await?;
    let pub_task = tokio::spawn(publisher(
        pub_ws,
        p,
        rate,
        b.payload,
        b.stats.clone(),
        pub_stop_rx,
    ));

    // Before the storm: the first second warms the room up, unmeasured.
    let settle = warm.min(1.0);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    steady.hist.reset();
    let d0 = steady.delivered.load(Relaxed);
    let (c0, _) = proc_sample(&b.pids);
    let me = [std::process::id()];
    let (m0, _) = proc_sample(&me);
    let before_secs = warm - settle;
    tokio::time::sleep(Duration::from_secs_f64(before_secs)).await;
    let before = latency(&steady, d0, before_secs);
    let (cpu_before, rss_before, c0) = server(b, c0, before_secs);

    // The storm.
    let storm_clients = sh.storm_connected.load(Relaxed);
    steady.hist.reset();
    let d0 = steady.delivered.load(Relaxed);
    let at = Instant::now();
    storm_tx.send(Some(at))?;
    let mut rss_peak = rss_before;
    let mut last_print = Instant::now();
    loop {
        let (done, gave_up) = (sh.resumed.load(Relaxed), sh.gave_up.load(Relaxed));
        if done + gave_up >= storm_clients || at.elapsed().as_secs_f64() > limit {
            break;
        }
        let (_, rss) = proc_sample(&b.pids);
        rss_peak = rss_peak.max(rss as f64 / 1024.0);
        if last_print.elapsed() > Duration::from_millis(500) {
            last_print = Instant::now();
            eprint!(
                "\r{label} storm {:.1}s resumed {done}/{storm_clients} gave up {gave_up}   ",
                at.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let storm_secs = at.elapsed().as_secs_f64();
    let during = latency(&steady, d0, storm_secs);
    let (cpu_storm, rss_storm, c0) = server(b, c0, storm_secs);
    rss_peak = rss_peak.max(rss_storm);
    eprintln!(
        "\r{label} storm over in {storm_secs:.2}s: resumed {}/{storm_clients}, gave up {}   ",
        sh.resumed.load(Relaxed),
        sh.gave_up.load(Relaxed)
    );

    // After the storm.
    steady.hist.reset();
    let d0 = steady.delivered.load(Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(after)).await;
    let after_lat = latency(&steady, d0, after);
    let (cpu_after, rss_after, _) = server(b, c0, after);
    let (m1, _) = proc_sample(&me);
    let client_cpu = m1.saturating_sub(m0) as f64 / HZ / (before_secs + storm_secs + after) * 100.0;

    // Stop publishing, let the last messages arrive, then count.
    pub_stop_tx.send(true)?;
    let pubs = pub_task.await?;
    let acked = pubs.acked.unique;
    let live = connected - sh.gave_up.load(Relaxed);
    // Until every live client has every acked message, or nothing new has
    // come for 2 s (what is still missing then is lost, not late), 30 s at most.
    let drain = Instant::now();
    let mut seen = sh.unique.load(Relaxed);
    let mut moved = Instant::now();
    while seen < acked * live
        && moved.elapsed() < Duration::from_secs(2)
        && drain.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sh.unique.load(Relaxed);
        if now != seen {
            seen = now;
            moved = Instant::now();
        }
    }
    let drain_secs = drain.elapsed().as_secs_f64();
    stop_tx.send(true)?;
    let mut clients = Vec::with_capacity(handles.len());
    for h in handles {
        clients.push(h.await?);
    }

    // The count.
    let acked_numbers: Vec<u64> = pubs.acked.numbers().collect();
    let (mut missed, mut missed_steady, mut missed_gave_up) = (0u64, 0u64, 0u64);
    let (mut dups, mut unacked_seen, mut clients_missing, mut unplanned) = (0u64, 0u64, 0u64, 0u64);
    let (mut totals, mut waits, mut signins, mut wss, mut joins) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut replayed, mut replayed_max, mut retried) = (0u64, 0u64, 0u64);
    let mut reply_bytes = Vec::new();
    // How many clients missed each message number.
    let mut missing = BTreeMap::new();
    for c in clients.iter().filter(|c| c.connected) {
        let mut m = 0;
        for &x in acked_numbers.iter().filter(|&&x| !c.seen.has(x)) {
            m += 1;
            *missing.entry(x).or_insert(0u64) += 1;
        }
        let seen_acked = acked - m;
        unacked_seen += c.seen.unique - seen_acked;
        dups += c.seen.dups;
        unplanned += c.unplanned;
        if c.steady {
            missed_steady += m;
        } else if c.resume.is_none() {
            missed_gave_up += m;
            continue;
        }
        missed += m;
        if m > 0 {
            clients_missing += 1;
        }
        if let Some(r) = &c.resume {
            totals.push(ms(r.total));
            waits.push(ms(r.phases.wait));
            signins.push(ms(r.phases.signin));
            wss.push(ms(r.phases.ws));
            joins.push(ms(r.phases.join));
            replayed += r.phases.replayed;
            reply_bytes.push(r.phases.reply_bytes as f64);
            replayed_max = replayed_max.max(r.phases.replayed);
            if r.attempts > 1 {
                retried += 1;
            }
        }
    }
    let resume_all_ms = totals.iter().copied().fold(0.0, f64::max);
    let resumed = sh.resumed.load(Relaxed);
    let storm_errors = causes(&sh.storm_errors);
    let initial_errors = causes(&sh.initial_errors);
    eprintln!(
        "{label} resumed {resumed}/{storm_clients} in {:.2}s; acked {acked} of {} sent; missed {missed} (steady {missed_steady}), duplicates {dups}, connect errors {}",
        resume_all_ms / 1000.0,
        pubs.sent,
        storm_errors.values().sum::<u64>()
    );
    let mut out = json!({
        "clients": n,
        "steady_clients": k,
        "rate": rate,
        "warm_secs": warm,
        "after_secs": after,
        "drop": match drop_mode { DropMode::Reset => "reset (TCP RST, no close frame)", DropMode::Close => "close frame" },
        "connected": connected,
        "connect_per_sec": connected as f64 / connect_secs,
        "initial_connect_errors": initial_errors.values().sum::<u64>(),
        "initial_connect_error_causes": initial_errors,
        "storm_clients": storm_clients,
        "resumed": resumed,
        "not_resumed": storm_clients - resumed,
        "resume_all_secs": resume_all_ms / 1000.0,
        "storm_window_secs": storm_secs,
        "resume": spread(totals, "ms"),
        "resume_phases": {
            "wait_for_slot": spread(waits, "ms"),
            "signin": spread(signins, "ms"),
            "websocket": spread(wss, "ms"),
            "join_and_replay": spread(joins, "ms"),
        },
        "resumed_after_retry": retried,
        "connect_errors": storm_errors.values().sum::<u64>(),
        "connect_error_causes": storm_errors,
        "not_recovered": sh.not_recovered.load(Relaxed),
        "replayed_messages": replayed,
        "replayed_max_per_client": replayed_max,
        "join_reply_bytes": spread(reply_bytes, "bytes"),
    });
    let counts = json!({
        "published": pubs.sent,
        "acked": acked,
        "publish_errors": pubs.errors,
        "publisher_lost": pubs.lost,
        "missed": missed,
        "clients_missing": clients_missing,
        "missed_steady": missed_steady,
        "missed_not_resumed": missed_gave_up,
        "duplicates": dups,
        "most_missed": most_missed(&missing),
        "seen_unacked": unacked_seen,
        "unplanned_reconnects": unplanned,
        "drop_causes": b.stats.take_drop_causes(),
        "steady_drop_causes": steady.take_drop_causes(),
        "drain_secs": drain_secs,
        "steady_latency": {"before": before, "storm": during, "after": after_lat},
        "server_cpu_pct": {"before": cpu_before, "storm": cpu_storm, "after": cpu_after},
        "client_cpu_pct": client_cpu,
        "server_rss_mib": {"before": rss_before, "storm_peak": rss_peak, "after": rss_after},
    });
    if let (Some(o), Value::Object(c)) = (out.as_object_mut(), counts) {
        o.extend(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_from_texts_and_frames() {
        let t = text(100, 42);
        assert_eq!(t.len(), 100);
        assert_eq!(number_after(&t, NUM), Some(42));
        let f = format!(r#"{{"op":"msg","room":"storm","seq":7,"text":"{t}"}}"#);
        assert_eq!(number_after(&f, r#""seq":"#), Some(7));
        assert_eq!(number_after(&f, NUM), Some(42));
        assert_eq!(number_after("no number", NUM), None);
    }

    #[test]
    fn seen_counts_unique_and_duplicates() {
        let mut s = Seen::default();
        assert!(s.note(1));
        assert!(s.note(200));
        assert!(!s.note(1));
        assert!(!s.note(u64::MAX));
        assert_eq!((s.unique, s.dups), (2, 1));
        assert!(s.has(200) && !s.has(2) && !s.has(10_000));
        assert_eq!(s.numbers().collect::<Vec<_>>(), [1, 200]);
    }

    #[test]
    fn spread_takes_quantiles() {
        let v = spread((1..=100).map(f64::from).collect(), "ms");
        assert_eq!(spread(Vec::new(), "ms")["max_ms"], 0.0);
        assert_eq!(v["p50_ms"], 50.0);
        assert_eq!(v["p99_ms"], 99.0);
        assert_eq!(v["max_ms"], 100.0);
    }
}
