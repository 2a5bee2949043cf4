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

/// One join's replay.
#[derive(Debug)]
pub struct Replay {
    pub room: String,
    /// The members for `joined`.
    pub members: Vec<User>,
    /// The highest seq the room had delivered when the session joined
    /// (`None` when it did not know yet); later ones come live.
    upto: Option<u64>,
    catchup: Catchup,
}

impl Replay {
    pub fn new(room: String, since: Option<u64>, upto: Option<u64>, members: Vec<User>) -> Self {
        let catchup = match since {
            Some(cursor) => Catchup::From { cursor },
            None => Catchup::Skip,
        };
        Self {
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
    /// Joined; a replay is under way. Live messages wait here until the
    /// replay has been written.
    Replaying { held: Vec<(u64, ByteString)> },
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
        RoomFeed::Replaying { held: Vec::new() }
    }

    /// A join of a room joined already: replays again up to what was
    /// written live, answering where to stop (`None` when a replay is under
    /// way already and goes on).
    pub fn replay_again(&mut self) -> Option<u64> {
        match *self {
            RoomFeed::Live { last } => {
                *self = RoomFeed::replaying();
                Some(last)
            }
            RoomFeed::Replaying { .. } => None,
        }
    }

    /// A live message for this room.
    pub fn offer(&mut self, seq: u64, frame: ByteString) -> Offer {
        match self {
            RoomFeed::Replaying { held } => {
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
        let held = match std::mem::replace(self, RoomFeed::Live { last: replayed_to }) {
            RoomFeed::Replaying { held } => held,
            RoomFeed::Live { .. } => Vec::new(),
        };
        let mut last = replayed_to;
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
            RoomFeed::Replaying { held } => held,
            RoomFeed::Live { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> ChatMessage {
        ChatMessage::sample(seq)
    }

    #[test]
    fn a_join_without_since_replays_nothing() {
        let replay = Replay::new("r".into(), None, Some(9), Vec::new());
        assert_eq!(replay.next(), Next::Join { replayed_to: None });
    }

    #[test]
    fn a_replay_reads_pages_until_the_delivered_seq() {
        let mut replay = Replay::new("r".into(), Some(3), Some(5), Vec::new());
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
        let mut replay = Replay::new("r".into(), Some(0), None, Vec::new());
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
        let replay = Replay::new("r".into(), Some(8), Some(8), Vec::new());
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
}
