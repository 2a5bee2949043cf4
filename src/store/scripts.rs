//! The Lua scripts of cluster mode and their typed calls. Each script lives
//! in `lua/` with a header naming its KEYS and ARGV; this module is the one
//! place that passes them in order and decodes the replies into enums.
//!
//! A script runs atomically in Redis, which is what makes a room's seq, its
//! cid memory and its cache agree with each other. Every key a script
//! touches is a key of one room, so a Redis Cluster keeps them in one slot.

use redis::aio::ConnectionLike;
use redis::Script;

use super::keys;
use super::redis::Publish;
use crate::error::ChatError;
use crate::protocol::ChatMessage;

/// A message's place in its room as Redis remembers it for a cid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub id: String,
    pub ts: i64,
}

impl Stamp {
    /// Reads the `<seq> <id> <ts>` form the scripts store and return.
    fn parse(text: &str) -> Result<Stamp, ChatError> {
        let bad = || ChatError::Internal(format!("bad stamp `{text}` from Redis"));
        let mut parts = text.splitn(3, ' ');
        let (Some(seq), Some(id), Some(ts)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        Ok(Stamp {
            seq: seq.parse().map_err(|_| bad())?,
            id: id.to_string(),
            ts: ts.parse().map_err(|_| bad())?,
        })
    }
}

/// A cid a room accepted, without the message's text: what the room needs
/// to recognise it again after Redis lost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCid {
    pub user_id: String,
    pub cid: String,
    pub stamp: Stamp,
}

/// What `accept.lua` found for a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Accept {
    /// A new message, with its new seq and the id and ts it was given.
    New(Stamp),
    /// New to Redis, in a room that is recovering from a loss of Redis's
    /// data: the cid may have been accepted before the loss. Look for it in
    /// MongoDB before using the stamp.
    Unverified(Stamp),
    /// A repeated cid none of whose attempts was published yet (one may
    /// still be on its way, have failed, or its node died).
    Pending(Stamp),
    /// A repeated cid, published under its own seq.
    Published(Stamp),
    /// A repeated cid, published under a new seq (the stamp's).
    Resequenced(Stamp),
    /// The room has no seq in Redis: seed it, then accept again.
    Unseeded,
}

/// What `deliver.lua` did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Published under its seq.
    Published,
    /// Another attempt of its cid was published, under its own seq.
    Earlier(u64),
    /// It came late and was published under this new seq, by this attempt
    /// or an earlier one of its cid: the caller makes it durable under it.
    Resequenced(u64),
}

/// The arguments of one `deliver.lua` call besides the message.
pub struct DeliverArgs<'a> {
    pub message: &'a ChatMessage,
    /// The message as cached.
    pub message_json: String,
    /// The channel event that carries it.
    pub event_json: String,
    pub cache_size: usize,
    pub trim_margin: u64,
    pub late_ms: u64,
    pub cid_ttl_secs: u64,
    /// How the room's channel is published to.
    pub publish: Publish,
}

/// The value a room's cid hash holds for a cid published under `stamp`
/// (the form `accept.lua` and `deliver.lua` read: `<seq> <id> <ts> d`).
pub fn published_value(stamp: &Stamp) -> String {
    format!("{} {} {} d", stamp.seq, stamp.id, stamp.ts)
}

/// The field under which a room remembers a user's cid.
pub fn cid_field(user_id: &str, cid: &str) -> String {
    format!("{user_id}:{cid}")
}

/// The scripts, hashed once; `EVALSHA` loads a script a server lacks.
pub struct Scripts {
    accept: Script,
    seed: Script,
    deliver: Script,
    open_gap: Script,
    raise_watermark: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            accept: Script::new(include_str!("lua/accept.lua")),
            seed: Script::new(include_str!("lua/seed.lua")),
            deliver: Script::new(include_str!("lua/deliver.lua")),
            open_gap: Script::new(include_str!("lua/open_gap.lua")),
            raise_watermark: Script::new(include_str!("lua/raise_watermark.lua")),
        }
    }
}

fn redis_error(e: redis::RedisError) -> ChatError {
    ChatError::Unavailable(format!("redis: {e}"))
}

impl Scripts {
    /// Accepts a message of `room` for `field` ([`cid_field`]), giving it
    /// `id` and `ts` if it is new.
    pub async fn accept(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        field: &str,
        id: &str,
        ts: i64,
        cid_ttl_secs: u64,
    ) -> Result<Accept, ChatError> {
        let reply: Vec<String> = self
            .accept
            .key(keys::seq(room))
            .key(keys::cids(room))
            .key(keys::recovering(room))
            .arg(field)
            .arg(id)
            .arg(ts)
            .arg(cid_ttl_secs)
            .invoke_async(conn)
            .await
            .map_err(redis_error)?;
        decode_accept(&reply)
    }

    /// Raises a room's seq to at least `floor`.
    pub async fn seed(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        floor: u64,
    ) -> Result<u64, ChatError> {
        self.seed
            .key(keys::seq(room))
            .arg(floor)
            .invoke_async(conn)
            .await
            .map_err(redis_error)
    }

    /// Caches and publishes a durable message, once per cid.
    pub async fn deliver(
        &self,
        conn: &mut impl ConnectionLike,
        args: DeliverArgs<'_>,
    ) -> Result<Delivery, ChatError> {
        let m = args.message;
        let reply: Vec<String> = self
            .deliver
            .key(keys::recent(&m.room))
            .key(keys::persisted(&m.room))
            .key(keys::seq(&m.room))
            .key(keys::cids(&m.room))
            .key(keys::published(&m.room))
            .arg(m.seq)
            .arg(args.message_json)
            .arg(args.event_json)
            .arg(args.cache_size)
            .arg(keys::channel(&m.room))
            .arg(args.trim_margin)
            .arg(cid_field(&m.user.id, &m.cid))
            .arg(&m.id)
            .arg(m.ts)
            .arg(args.late_ms)
            .arg(args.cid_ttl_secs)
            .arg(args.publish.command())
            .invoke_async(conn)
            .await
            .map_err(redis_error)?;
        decode_delivery(&reply, m.seq)
    }

    /// The seq just below a gap that may still fill within `late_ms`.
    pub async fn open_gap(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        late_ms: u64,
    ) -> Result<Option<u64>, ChatError> {
        self.open_gap
            .key(keys::published(room))
            .arg(late_ms)
            .invoke_async(conn)
            .await
            .map_err(redis_error)
    }

    /// Raises a room's persisted watermark to `seq` unless it is higher.
    pub async fn raise_watermark(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        seq: u64,
    ) -> Result<u64, ChatError> {
        self.raise_watermark
            .key(keys::persisted(room))
            .arg(seq)
            .invoke_async(conn)
            .await
            .map_err(redis_error)
    }
}

fn unexpected(script: &str, reply: &[String]) -> ChatError {
    ChatError::Internal(format!("unexpected reply {reply:?} from {script}"))
}

fn decode_accept(reply: &[String]) -> Result<Accept, ChatError> {
    let stamp = || match reply.get(1) {
        Some(text) => Stamp::parse(text),
        None => Err(unexpected("accept.lua", reply)),
    };
    match reply.first().map(String::as_str) {
        Some("new") => Ok(Accept::New(stamp()?)),
        Some("unverified") => Ok(Accept::Unverified(stamp()?)),
        Some("pending") => Ok(Accept::Pending(stamp()?)),
        Some("published") => Ok(Accept::Published(stamp()?)),
        Some("resequenced") => Ok(Accept::Resequenced(stamp()?)),
        Some("unseeded") => Ok(Accept::Unseeded),
        _ => Err(unexpected("accept.lua", reply)),
    }
}

/// Decodes `deliver.lua`'s reply for a message sent with seq `sent`.
fn decode_delivery(reply: &[String], sent: u64) -> Result<Delivery, ChatError> {
    let seq = reply
        .get(1)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| unexpected("deliver.lua", reply))?;
    match reply.first().map(String::as_str) {
        Some("published") if seq == sent => Ok(Delivery::Published),
        Some("earlier") => Ok(Delivery::Earlier(seq)),
        Some("resequenced") => Ok(Delivery::Resequenced(seq)),
        _ => Err(unexpected("deliver.lua", reply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(reply: &[&str]) -> Vec<String> {
        reply.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accept_replies_decode_to_their_variants() {
        let stamp = Stamp {
            seq: 7,
            id: "01J".into(),
            ts: 1700,
        };
        let cases = [
            ("new", Accept::New(stamp.clone())),
            ("unverified", Accept::Unverified(stamp.clone())),
            ("pending", Accept::Pending(stamp.clone())),
            ("published", Accept::Published(stamp.clone())),
            ("resequenced", Accept::Resequenced(stamp.clone())),
        ];
        for (word, expected) in cases {
            let reply = words(&[word, "7 01J 1700"]);
            assert_eq!(decode_accept(&reply).ok(), Some(expected), "{word}");
        }
        assert_eq!(
            decode_accept(&words(&["unseeded"])).ok(),
            Some(Accept::Unseeded)
        );
    }

    #[test]
    fn malformed_accept_replies_are_internal_errors() {
        for reply in [
            words(&[]),
            words(&["new"]),
            words(&["new", "7 01J"]),
            words(&["new", "x 01J 1700"]),
            words(&["maybe", "7 01J 1700"]),
        ] {
            assert!(
                matches!(decode_accept(&reply), Err(ChatError::Internal(_))),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn delivery_replies_decode_and_a_published_seq_must_match() {
        assert_eq!(
            decode_delivery(&words(&["published", "5"]), 5).ok(),
            Some(Delivery::Published)
        );
        assert_eq!(
            decode_delivery(&words(&["earlier", "3"]), 5).ok(),
            Some(Delivery::Earlier(3))
        );
        assert_eq!(
            decode_delivery(&words(&["resequenced", "9"]), 5).ok(),
            Some(Delivery::Resequenced(9))
        );
        assert!(decode_delivery(&words(&["published", "6"]), 5).is_err());
        assert!(decode_delivery(&words(&["published"]), 5).is_err());
    }

    #[test]
    fn every_script_names_its_keys_and_args_in_a_header() {
        for (name, text) in [
            ("accept", include_str!("lua/accept.lua")),
            ("seed", include_str!("lua/seed.lua")),
            ("deliver", include_str!("lua/deliver.lua")),
            ("open_gap", include_str!("lua/open_gap.lua")),
            ("raise_watermark", include_str!("lua/raise_watermark.lua")),
        ] {
            let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("--")).collect();
            assert!(header.iter().any(|l| l.contains("KEYS[1]")), "{name}");
            assert!(header.iter().any(|l| l.contains("ARGV[1]")), "{name}");
            assert!(header.iter().any(|l| l.contains("Reply")), "{name}");
        }
    }

    #[test]
    fn a_published_value_reads_back_as_its_stamp() {
        let stamp = Stamp {
            seq: 12,
            id: "01K".into(),
            ts: 99,
        };
        let value = published_value(&stamp);
        assert!(value.ends_with(" d"));
        assert_eq!(Stamp::parse(&value[..value.len() - 2]).ok(), Some(stamp));
    }
}
