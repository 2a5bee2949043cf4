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

/// What goes to a session, already counted in its outbox.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Outbound {
    /// Typing and presence: dropped first when the reader is slow.
    Droppable(ByteString),
    /// Messages of one room, never dropped, and held back while the room
    /// replays.
    Messages(Arc<MessageBatch>),
    /// The outbox cut the session off: close it as a slow reader.
    CutOff,
}

/// Messages of one room in `seq` order, each frame encoded once and the
/// batch shared by every member it goes to: a member gets all of them in
/// one mailbox message and one socket write.
pub struct MessageBatch {
    pub room: Arc<str>,
    pub frames: Vec<(u64, ByteString)>,
    /// Bytes the frames take on the wire.
    wire: usize,
}

impl MessageBatch {
    pub fn new(room: Arc<str>, frames: Vec<(u64, ByteString)>) -> Self {
        let wire = frames.iter().map(|(_, f)| wire_len(f.len())).sum();
        Self { room, frames, wire }
    }

    /// Bytes the frames take on the wire.
    pub fn wire_len(&self) -> usize {
        self.wire
    }
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

    /// Queues a typing or presence frame, unless the reader is slow.
    pub fn push_droppable(&self, frame: ByteString) {
        let size = wire_len(frame.len());
        if self.is_closing() {
            return;
        }
        if self.queued() + size > self.soft {
            self.metrics.frames_dropped.fetch_add(1, Relaxed);
            return;
        }
        self.queue(size, Outbound::Droppable(frame));
    }

    /// Queues messages for the session, or cuts it off when they would
    /// take its queue over the hard limit.
    pub fn push_messages(&self, batch: Arc<MessageBatch>) {
        if self.is_closing() {
            return;
        }
        let count = batch.frames.len() as u64;
        if self.queue(batch.wire_len(), Outbound::Messages(batch)) {
            self.metrics.messages_out.fetch_add(count, Relaxed);
        }
    }

    /// Hands `outbound` of `size` wire bytes to the session: false when the
    /// session has not started or is cut off now.
    fn queue(&self, size: usize, outbound: Outbound) -> bool {
        let Some(addr) = self.addr.get() else {
            return false;
        };
        if self.queued() + size > self.hard {
            self.cut_off();
            return false;
        }
        self.queued.fetch_add(size, Relaxed);
        addr.do_send(outbound);
        true
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
            addr.do_send(Outbound::CutOff);
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
