//! Replay on join, as plain state a session drives: which stored messages a
//! join replays before `joined`, and what happens meanwhile to the room's
//! live messages.
//!
//! A join with `since` writes every stored message above `since` up to the
//! highest seq the room had delivered when the session joined (later ones
//! arrive live), a page at a time, then `joined`. Live messages that arrive
//! during the replay are held, and after `joined` those the replay did not
//! cover follow in order. No I/O happens here: the session reads the store
//! and writes the frames.
//!
//! A session runs one replay at a time ([`ReplayQueue`]): joins that come
//! while one runs wait their turn, in order, page reads included. So each
//! replay reaches the client whole and in seq order, followed by its
//! `joined`, and a session holds at most one page in memory however many
//! rooms it joins at once.

use std::collections::VecDeque;

use bytestring::ByteString;

use crate::protocol::{ChatMessage, User};

/// Messages read from the store per replay step; the session waits for its
/// queue to drain between steps, so a long replay never floods it.
pub const REPLAY_PAGE: usize = 500;

/// How far a join's replay has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Catchup {
    /// The join had no `since`: nothing to replay.
    Skip,
    /// Replaying: everything above `cursor` is still to write.
    From { cursor: u64 },
}

/// What a session does next for a join.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the stored messages above `after` ([`REPLAY_PAGE`] at most) and
    /// hand them to [`Replay::take_page`].
    Read { after: u64 },
    /// Read the room's last seq and say `joined`. `replayed_to` is the
    /// highest seq the replay wrote (`None` when none was asked).
    Join { replayed_to: Option<u64> },
}

/// Where a waiting join's replay is to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upto {
    /// A first join: where the room's deliveries stood when the session
    /// joined (see [`Replay`]); live messages since are held.
    Joined(Option<u64>),
    /// A join of a room joined already: what was written live when its
    /// turn comes, found by [`RoomFeed::replay_again`].
    WrittenLive,
}

/// A join waiting for its turn to replay.
#[derive(Debug)]
pub struct Waiting {
    pub room: String,
    pub since: Option<u64>,
    pub upto: Upto,
    /// The members for `joined`.
    pub members: Vec<User>,
}

/// The joins of one session, replayed one at a time in the order they
/// came.
#[derive(Debug, Default)]
pub struct ReplayQueue {
    waiting: VecDeque<Waiting>,
    /// The replay running now: its ticket and room.
    running: Option<(u64, String)>,
    tickets: u64,
}

impl ReplayQueue {
    /// Queues a join behind those already waiting.
    pub fn push(&mut self, join: Waiting) {
        self.waiting.push_back(join);
    }

    /// The next join to replay, with its ticket, when none is running.
    pub fn start_next(&mut self) -> Option<(u64, Waiting)> {
        if self.running.is_some() {
            return None;
        }
        let join = self.waiting.pop_front()?;
        self.tickets += 1;
        self.running = Some((self.tickets, join.room.clone()));
        Some((self.tickets, join))
    }

    /// Whether the replay with `ticket` is still the one running (it is
    /// not once it ended, or once its room was left).
    pub fn is_current(&self, ticket: u64) -> bool {
        self.running.as_ref().is_some_and(|(t, _)| *t == ticket)
    }

    /// The replay with `ticket` ended; the next may start.
    pub fn finish(&mut self, ticket: u64) {
        if self.is_current(ticket) {
            self.running = None;
        }
    }

    /// The room was left: drops its waiting joins, and its running replay.
    pub fn forget(&mut self, room: &str) {
        self.waiting.retain(|w| w.room != room);
        if self.running.as_ref().is_some_and(|(_, r)| r == room) {
            self.running = None;
        }
    }
}

/// One join's replay.
#[derive(Debug)]
pub struct Replay {
    /// Its turn in the session's [`ReplayQueue`].
    pub ticket: u64,
    pub room: String,
    /// The members for `joined`.
    pub members: Vec<User>,
    /// The highest seq the room had delivered when the session joined
    /// (`None` when it did not know yet); later ones come live.
    upto: Option<u64>,
    catchup: Catchup,
}

impl Replay {
    pub fn new(
        ticket: u64,
        room: String,
        since: Option<u64>,
        upto: Option<u64>,
        members: Vec<User>,
    ) -> Self {
        let catchup = match since {
            Some(cursor) => Catchup::From { cursor },
            None => Catchup::Skip,
        };
        Self {
            ticket,
            room,
            members,
            upto,
            catchup,
        }
    }

    /// What to do now.
    pub fn next(&self) -> Next {
        match self.catchup {
            Catchup::Skip => Next::Join { replayed_to: None },
            Catchup::From { cursor } if self.upto.is_some_and(|upto| cursor >= upto) => {
                Next::Join {
                    replayed_to: Some(cursor),
                }
            }
            Catchup::From { cursor } => Next::Read { after: cursor },
        }
    }

    /// Takes a page read for [`Next::Read`]: answers the messages to write,
    /// in order, and whether more may follow them in the store.
    pub fn take_page(&self, mut page: Vec<ChatMessage>) -> (VecDeque<ChatMessage>, bool) {
        let mut more = page.len() == REPLAY_PAGE;
        if let Some(upto) = self.upto {
            let fetched = page.len();
            page.retain(|m| m.seq <= upto);
            more &= page.len() == fetched;
        }
        (page.into(), more)
    }

    /// Notes that the message with `seq` was written.
    pub fn wrote(&mut self, seq: u64) {
        if let Catchup::From { cursor } = &mut self.catchup {
            *cursor = seq;
        }
    }

    /// What follows a page once all of it is written.
    pub fn after_page(&self, more: bool) -> Next {
        match (self.catchup, more) {
            (Catchup::From { cursor }, true) => Next::Read { after: cursor },
            (Catchup::From { cursor }, false) => Next::Join {
                replayed_to: Some(cursor),
            },
            (Catchup::Skip, _) => Next::Join { replayed_to: None },
        }
    }
}

/// Where a joined room stands for a session.
#[derive(Debug)]
pub enum RoomFeed {
    /// Joined; a replay is under way or waits its turn. Live messages wait
    /// here until the replay has been written. `floor` is the highest seq
    /// written before (0 for a new join): nothing at or below it is written
    /// live again.
    Replaying {
        held: Vec<(u64, ByteString)>,
        floor: u64,
    },
    /// Live, with the highest seq written: a live frame at or below it was
    /// already sent by the replay (the store can be ahead of the relay).
    Live { last: u64 },
}

/// What to do with a live message.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Write it now.
    Write(ByteString),
    /// Held until the replay ends.
    Held,
    /// Written already (by the replay): drop it.
    Stale,
}

impl RoomFeed {
    /// A new join: live messages wait for its replay.
    pub fn replaying() -> Self {
        RoomFeed::Replaying {
            held: Vec::new(),
            floor: 0,
        }
    }

    /// A join of a room joined already: replays again up to what was
    /// written live, answering where to stop (`None` when a replay is under
    /// way already and goes on).
    pub fn replay_again(&mut self) -> Option<u64> {
        match *self {
            RoomFeed::Live { last } => {
                *self = RoomFeed::Replaying {
                    held: Vec::new(),
                    floor: last,
                };
                Some(last)
            }
            RoomFeed::Replaying { .. } => None,
        }
    }

    /// A live message for this room.
    pub fn offer(&mut self, seq: u64, frame: ByteString) -> Offer {
        match self {
            RoomFeed::Replaying { held, .. } => {
                held.push((seq, frame));
                Offer::Held
            }
            RoomFeed::Live { last } if seq <= *last => Offer::Stale,
            RoomFeed::Live { last } => {
                *last = seq;
                Offer::Write(frame)
            }
        }
    }

    /// The replay wrote everything up to `replayed_to`: goes live, and
    /// answers the held frames it did not cover, in order.
    pub fn go_live(&mut self, replayed_to: u64) -> Vec<ByteString> {
        let (held, floor) = match std::mem::replace(self, RoomFeed::Live { last: replayed_to }) {
            RoomFeed::Replaying { held, floor } => (held, floor),
            RoomFeed::Live { last } => (Vec::new(), last),
        };
        let mut last = replayed_to.max(floor);
        let mut out = Vec::new();
        for (seq, frame) in held {
            if seq > last {
                last = seq;
                out.push(frame);
            }
        }
        *self = RoomFeed::Live { last };
        out
    }

    /// The frames held now (to uncount them when the room is left).
    pub fn held(&self) -> &[(u64, ByteString)] {
        match self {
            RoomFeed::Replaying { held, .. } => held,
            RoomFeed::Live { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn message(seq: u64) -> ChatMessage {
        ChatMessage::sample(seq)
    }

    #[test]
    fn a_join_without_since_replays_nothing() {
        let replay = Replay::new(1, "r".into(), None, Some(9), Vec::new());
        assert_eq!(replay.next(), Next::Join { replayed_to: None });
    }

    #[test]
    fn a_replay_reads_pages_until_the_delivered_seq() {
        let mut replay = Replay::new(1, "r".into(), Some(3), Some(5), Vec::new());
        assert_eq!(replay.next(), Next::Read { after: 3 });
        let (page, more) = replay.take_page((4..=7).map(message).collect());
        let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![4, 5], "nothing above what the room delivered");
        assert!(!more);
        for m in &page {
            replay.wrote(m.seq);
        }
        assert_eq!(
            replay.after_page(more),
            Next::Join {
                replayed_to: Some(5)
            }
        );
    }

    #[test]
    fn a_full_page_asks_for_the_next() {
        let mut replay = Replay::new(1, "r".into(), Some(0), None, Vec::new());
        let (page, more) = replay.take_page((1..=REPLAY_PAGE as u64).map(message).collect());
        assert!(more);
        if let Some(last) = page.back() {
            replay.wrote(last.seq);
        }
        assert_eq!(
            replay.after_page(more),
            Next::Read {
                after: REPLAY_PAGE as u64
            }
        );
    }

    #[test]
    fn a_since_at_or_above_the_delivered_seq_joins_at_once() {
        let replay = Replay::new(1, "r".into(), Some(8), Some(8), Vec::new());
        assert_eq!(
            replay.next(),
            Next::Join {
                replayed_to: Some(8)
            }
        );
    }

    #[test]
    fn held_messages_follow_the_replay_once_each_in_order() {
        let mut feed = RoomFeed::replaying();
        for seq in [4, 6, 7] {
            assert_eq!(feed.offer(seq, seq.to_string().into()), Offer::Held);
        }
        let released = feed.go_live(6);
        assert_eq!(released, vec![ByteString::from("7")]);
        assert_eq!(feed.offer(7, "7".into()), Offer::Stale);
        assert_eq!(feed.offer(8, "8".into()), Offer::Write("8".into()));
    }

    #[test]
    fn joining_again_replays_up_to_what_was_written_live() {
        let mut feed = RoomFeed::Live { last: 12 };
        assert_eq!(feed.replay_again(), Some(12));
        assert_eq!(feed.replay_again(), None, "a replay is under way");
    }

    #[test]
    fn joining_again_without_since_writes_nothing_old_live() {
        let mut feed = RoomFeed::Live { last: 12 };
        assert_eq!(feed.replay_again(), Some(12));
        feed.offer(11, "11".into());
        feed.offer(13, "13".into());
        // No replay: `joined` at once, and only what is above 12 follows.
        assert_eq!(feed.go_live(0), vec![ByteString::from("13")]);
        assert_eq!(feed.offer(12, "12".into()), Offer::Stale);
    }

    fn waiting(room: &str) -> Waiting {
        Waiting {
            room: room.into(),
            since: Some(0),
            upto: Upto::Joined(Some(5)),
            members: Vec::new(),
        }
    }

    #[test]
    fn replays_run_one_at_a_time_in_order() {
        let mut queue = ReplayQueue::default();
        queue.push(waiting("a"));
        queue.push(waiting("b"));
        let (first, join) = queue.start_next().unwrap();
        assert_eq!(join.room, "a");
        assert!(queue.start_next().is_none(), "a runs");
        queue.push(waiting("a"));
        queue.finish(first);
        assert!(!queue.is_current(first));
        let (second, join) = queue.start_next().unwrap();
        assert_eq!(join.room, "b");
        queue.finish(first);
        assert!(queue.is_current(second), "a stale ticket ends nothing");
        queue.finish(second);
        assert_eq!(queue.start_next().unwrap().1.room, "a", "the join again");
    }

    #[test]
    fn leaving_a_room_drops_its_replays() {
        let mut queue = ReplayQueue::default();
        for room in ["a", "b", "a"] {
            queue.push(waiting(room));
        }
        let (ticket, _) = queue.start_next().unwrap();
        queue.forget("a");
        assert!(!queue.is_current(ticket));
        let (_, join) = queue.start_next().unwrap();
        assert_eq!(join.room, "b");
        assert!(queue.start_next().is_none());
    }
}
