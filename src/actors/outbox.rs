//! `SessionOutbox`: the shared door to one session. Rooms and the registry
//! push frames through it from any thread; it counts the bytes queued for
//! the session and applies the slow-reader policy.
//!
//! actix stops running a session's actor while its socket cannot take more
//! bytes, so a session cannot police its own queue. Instead every frame for
//! it goes through its outbox, which counts the bytes queued and not yet
//! taken by the socket: above `outbound_soft_bytes` typing and presence
//! frames are dropped; above `outbound_hard_bytes` nothing more is queued
//! and the session is asked to close with 1008. Either way the room and
//! every other member go on at full speed, and the cut-off client can
//! resume with `join since`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use actix::prelude::*;
use bytestring::ByteString;

use crate::metrics::Metrics;

/// A frame for the session, already counted in its outbox. An empty frame
/// asks the session to close as a slow reader.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Outbound {
    pub frame: ByteString,
    pub kind: FrameKind,
}

/// What an outbound frame is, for the slow-reader policy and the replay
/// bookkeeping.
#[derive(Debug, Clone)]
pub enum FrameKind {
    /// A `msg` frame: never dropped, and held back while its room replays.
    Message { room: Arc<str>, seq: u64 },
    /// Typing and presence: dropped first when the reader is slow.
    Droppable,
}

/// Bytes a server text frame of `payload` bytes takes on the wire.
pub fn wire_len(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

/// The shared door to one session.
pub struct SessionOutbox {
    /// Set when the session starts.
    addr: OnceLock<Recipient<Outbound>>,
    /// Bytes of frames handed to the session and not yet taken by its
    /// socket writer.
    queued: AtomicUsize,
    /// Set once the connection is being cut off or closes.
    closing: AtomicBool,
    /// Set once the session is off the connections gauge: when it is cut
    /// off, or when it stops, whichever comes first.
    uncounted: AtomicBool,
    /// Above this many queued bytes droppable frames are dropped.
    soft: usize,
    /// Above this many the connection is cut off.
    hard: usize,
    metrics: Arc<Metrics>,
}

impl SessionOutbox {
    pub fn new(soft: usize, hard: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            addr: OnceLock::new(),
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            uncounted: AtomicBool::new(false),
            soft,
            hard,
            metrics,
        }
    }

    /// Connects the outbox to its session once the session has started.
    pub fn attach(&self, addr: Recipient<Outbound>) {
        let _ = self.addr.set(addr);
    }

    /// Queues a frame for the session, or applies the slow-reader policy.
    pub fn push(&self, frame: ByteString, kind: FrameKind) {
        let Some(addr) = self.addr.get() else {
            return;
        };
        if self.is_closing() {
            return;
        }
        let size = wire_len(frame.len());
        let queued = self.queued();
        if matches!(kind, FrameKind::Droppable) && queued + size > self.soft {
            self.metrics.frames_dropped.fetch_add(1, Relaxed);
            return;
        }
        if queued + size > self.hard {
            self.cut_off();
            return;
        }
        self.queued.fetch_add(size, Relaxed);
        if let FrameKind::Message { .. } = kind {
            self.metrics.messages_out.fetch_add(1, Relaxed);
        }
        addr.do_send(Outbound { frame, kind });
    }

    /// Closes a connection that reads too slowly with a 1008 close frame,
    /// written once the client takes the bytes queued before it.
    fn cut_off(&self) {
        if self.closing.swap(true, Relaxed) {
            return;
        }
        self.metrics.slow_closes.fetch_add(1, Relaxed);
        self.uncount();
        log::warn!("Closing a slow reader: its outbound queue is full.");
        if let Some(addr) = self.addr.get() {
            addr.do_send(Outbound {
                frame: ByteString::new(),
                kind: FrameKind::Droppable,
            });
        }
    }

    /// Whether the connection is being cut off or closes: nothing more is
    /// queued.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    /// The session is stopping: queue nothing more.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// Whether the queue is under the soft limit, where a replay may go on
    /// writing.
    pub fn has_room(&self) -> bool {
        self.queued() <= self.soft
    }

    /// The hard limit, which also bounds what a session holds back.
    pub fn hard_limit(&self) -> usize {
        self.hard
    }

    /// Takes the session off the connections gauge, once.
    pub fn uncount(&self) {
        if !self.uncounted.swap(true, Relaxed) {
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Counts bytes the session writes itself.
    pub fn account(&self, size: usize) {
        self.queued.fetch_add(size, Relaxed);
    }

    /// Uncounts bytes the socket took, or that were never written.
    pub fn release(&self, size: usize) {
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(size)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_length_counts_the_header() {
        assert_eq!(wire_len(0), 2);
        assert_eq!(wire_len(125), 127);
        assert_eq!(wire_len(126), 130);
        assert_eq!(wire_len(70_000), 70_010);
    }

    #[test]
    fn released_bytes_never_go_below_zero() {
        let outbox = SessionOutbox::new(10, 20, Arc::new(Metrics::default()));
        outbox.account(8);
        assert!(outbox.has_room());
        outbox.account(8);
        assert!(!outbox.has_room());
        outbox.release(100);
        assert_eq!(outbox.queued(), 0);
    }
}
