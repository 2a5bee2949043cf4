//! Shared counters, a lock-free latency histogram, and /proc sampling.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::MARK;

const SUB: usize = 32;
const BUCKETS: usize = 64 * SUB;

/// Log-linear histogram of microseconds (about 3% resolution).
pub struct Hist {
    b: Vec<AtomicU64>,
}

fn index(v: u64) -> usize {
    if v < 2 * SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros() as usize;
    let shift = msb - 5;
    (shift * SUB + (v >> shift) as usize).min(BUCKETS - 1)
}

fn value(i: usize) -> u64 {
    if i < 2 * SUB {
        return i as u64;
    }
    let shift = i / SUB - 1;
    ((i % SUB + SUB) as u64) << shift
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            b: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn record(&self, us: u64) {
        self.b[index(us)].fetch_add(1, Relaxed);
    }
    pub fn reset(&self) {
        for b in &self.b {
            b.store(0, Relaxed);
        }
    }
    /// Quantiles in milliseconds, in the order asked.
    pub fn quantiles(&self, qs: &[f64]) -> Vec<f64> {
        let counts: Vec<u64> = self.b.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        qs.iter()
            .map(|q| {
                if total == 0 {
                    return 0.0;
                }
                let want = ((total as f64) * q).ceil().max(1.0) as u64;
                let mut seen = 0;
                for (i, c) in counts.iter().enumerate() {
                    seen += c;
                    if seen >= want {
                        return value(i) as f64 / 1000.0;
                    }
                }
                0.0
            })
            .collect()
    }
}

/// Counters shared by every client task.
pub struct Stats {
    pub delivered: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub open: AtomicU64,
    pub dropped: AtomicU64,
    /// Why subscribers were dropped: the close code and reason, or the
    /// error, with how many times each.
    drop_causes: Mutex<BTreeMap<String, u64>>,
    pub hist: Hist,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            delivered: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            open: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            drop_causes: Mutex::new(BTreeMap::new()),
            hist: Hist::new(),
        }
    }

    /// Notes why a subscriber was dropped.
    pub fn drop_cause(&self, cause: String) {
        let mut causes = self.drop_causes.lock().unwrap_or_else(|e| e.into_inner());
        *causes.entry(cause).or_insert(0) += 1;
    }

    /// The drop causes noted since the last call, and forgets them.
    pub fn take_drop_causes(&self) -> BTreeMap<String, u64> {
        let mut causes = self.drop_causes.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *causes)
    }

    /// Counts every message in `frame` and records its latency.
    pub fn on_frame(&self, frame: &str, now_us: u64) {
        let mut rest = frame;
        while let Some(p) = rest.find(MARK) {
            rest = &rest[p + MARK.len()..];
            let end = rest
                .bytes()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(rest.len());
            if let Ok(t) = rest[..end].parse::<u64>() {
                self.delivered.fetch_add(1, Relaxed);
                self.hist.record(now_us.saturating_sub(t));
            }
            rest = &rest[end..];
        }
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The text of a message of `size` bytes carrying the send time.
pub fn payload(size: usize) -> String {
    let mut s = format!("{MARK}{}@@", now_us());
    while s.len() < size {
        s.push('x');
    }
    s
}

/// CPU ticks (user + system) and resident KiB summed over `pids`.
pub fn proc_sample(pids: &[u32]) -> (u64, u64) {
    let mut ticks = 0;
    let mut rss = 0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name (which is in parentheses).
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                ticks += ut + st;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ticks, rss)
}

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ, 100 on Linux).
pub const HZ: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip() {
        for v in [0u64, 5, 63, 64, 65, 100, 1000, 12345, 1_000_000, 60_000_000] {
            let b = value(index(v));
            assert!(b <= v && (v - b) as f64 <= v as f64 * 0.04, "{v} -> {b}");
        }
    }

    #[test]
    fn counts_markers() {
        let s = Stats::new();
        let now = now_us();
        let f = format!(
            "[{{\"t\":\"{MARK}{}@@x\"}},{{\"t\":\"{MARK}{}@@\"}}]",
            now - 1000,
            now
        );
        s.on_frame(&f, now);
        assert_eq!(s.delivered.load(Relaxed), 2);
    }
}
