//! Counters and gauges of a node, rendered in the Prometheus text format at
//! `/metrics`. Plain atomics: updating them costs no lock on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::ChatError;

/// Upper bounds, in seconds, of the accept→ack latency buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Every metric of a node.
#[derive(Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicI64,
    /// Room actors alive on this node (rooms with local members).
    pub rooms: AtomicI64,
    /// Messages accepted from clients (new ones, not cid repeats).
    pub messages_in: AtomicU64,
    /// `msg` frames written to sessions (live and replayed).
    pub messages_out: AtomicU64,
    /// Typing and presence frames dropped for slow readers.
    pub frames_dropped: AtomicU64,
    /// Sessions closed because they read too slowly.
    pub slow_closes: AtomicU64,
    /// Messages handed to the Kafka producer and not yet acknowledged.
    pub producer_queue: AtomicI64,
    /// Records in the topic not yet stored by this node's persist workers.
    pub consumer_lag: AtomicI64,
    /// Batches written to MongoDB by this node's persist workers.
    pub persist_batches: AtomicU64,
    /// Messages in those batches.
    pub persist_messages: AtomicU64,
    /// Times the Redis relay connection was re-established.
    pub redis_reconnects: AtomicU64,
    /// Messages MongoDB refused because their cid was stored already under
    /// another id: a second message for one cid got through (see the
    /// persist workers' log for the two ids).
    pub cid_conflicts: AtomicU64,
    /// Seedings that asked Kafka for a room's unstored records.
    pub seed_tail_checks: AtomicU64,
    /// Of those, the ones that had records to read.
    pub seed_scans: AtomicU64,
    /// Records those scans read.
    pub seed_scan_records: AtomicU64,
    /// Scan consumers created (one, and another after each failed scan).
    pub seed_scan_consumers: AtomicU64,
    errors: [AtomicU64; ChatError::CODES.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Counts an error answered to a client.
    pub fn error(&self, e: &ChatError) {
        if let Some(i) = ChatError::CODES.iter().position(|c| *c == e.code()) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// Records the time from a message's arrival to its `ack`.
    pub fn ack_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.latency_buckets[i].fetch_add(1, Relaxed);
                break;
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(
                out,
                "# HELP scalable_chat_{name} {help}\n# TYPE scalable_chat_{name} gauge\nscalable_chat_{name} {v}"
            );
        };
        gauge(
            "connections",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        gauge(
            "rooms",
            "Rooms with members on this node.",
            self.rooms.load(Relaxed),
        );
        gauge(
            "producer_queue",
            "Messages waiting for Kafka to acknowledge them.",
            self.producer_queue.load(Relaxed),
        );
        gauge(
            "consumer_lag",
            "Records of the topic not yet stored by this node's persist workers.",
            self.consumer_lag.load(Relaxed),
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP scalable_chat_{name} {help}\n# TYPE scalable_chat_{name} counter\nscalable_chat_{name} {v}"
            );
        };
        counter(
            "persist_batches_total",
            "Batches written to MongoDB by this node.",
            self.persist_batches.load(Relaxed),
        );
        counter(
            "persist_messages_total",
            "Messages written to MongoDB by this node (sum of batch sizes).",
            self.persist_messages.load(Relaxed),
        );
        counter(
            "redis_reconnects_total",
            "Times the Redis relay connection was re-established.",
            self.redis_reconnects.load(Relaxed),
        );
        counter(
            "cid_conflicts_total",
            "Messages not stored because their cid was stored under another id.",
            self.cid_conflicts.load(Relaxed),
        );
        counter(
            "seed_tail_checks_total",
            "Seedings of a room's seq that asked Kafka for its unstored records.",
            self.seed_tail_checks.load(Relaxed),
        );
        counter(
            "seed_scans_total",
            "Seedings that read unstored records of the room's partition.",
            self.seed_scans.load(Relaxed),
        );
        counter(
            "seed_scan_records_total",
            "Records read by the seeding scans.",
            self.seed_scan_records.load(Relaxed),
        );
        counter(
            "seed_scan_consumers_total",
            "Kafka consumers created for the seeding scans.",
            self.seed_scan_consumers.load(Relaxed),
        );
        counter(
            "messages_in_total",
            "Messages accepted from clients.",
            self.messages_in.load(Relaxed),
        );
        counter(
            "messages_out_total",
            "Message frames written to clients.",
            self.messages_out.load(Relaxed),
        );
        counter(
            "frames_dropped_total",
            "Typing and presence frames dropped for slow readers.",
            self.frames_dropped.load(Relaxed),
        );
        counter(
            "slow_reader_closes_total",
            "Connections closed for reading too slowly.",
            self.slow_closes.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP scalable_chat_errors_total Errors answered to clients, by code.\n# TYPE scalable_chat_errors_total counter"
        );
        for (code, n) in ChatError::CODES.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "scalable_chat_errors_total{{code=\"{code}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP scalable_chat_ack_latency_seconds Time from a message's arrival to its ack.\n# TYPE scalable_chat_ack_latency_seconds histogram"
        );
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(
                out,
                "scalable_chat_ack_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "scalable_chat_ack_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "scalable_chat_ack_latency_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "scalable_chat_ack_latency_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.ack_latency(Duration::from_micros(300));
        m.ack_latency(Duration::from_millis(3));
        m.ack_latency(Duration::from_secs(60));
        m.error(&ChatError::RateLimited);
        let text = m.render();
        assert!(text.contains("scalable_chat_ack_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("scalable_chat_ack_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("scalable_chat_ack_latency_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("scalable_chat_ack_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("scalable_chat_ack_latency_seconds_count 3\n"));
        assert!(text.contains("scalable_chat_errors_total{code=\"rate_limited\"} 1\n"));
        assert!(text.contains("scalable_chat_errors_total{code=\"internal\"} 0\n"));
        for name in [
            "producer_queue",
            "consumer_lag",
            "persist_batches_total",
            "redis_reconnects_total",
            "cid_conflicts_total",
        ] {
            assert!(
                text.contains(&format!("\nscalable_chat_{name} 0\n")),
                "{name}"
            );
        }
    }
}
