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

/// What a room remembers of a repeated cid: the stamp of its first
/// attempt and, unless an older node remembered it, the digest of that
/// attempt's text ([`text_digest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub stamp: Stamp,
    pub digest: Option<String>,
}

impl Remembered {
    /// Reads `<seq> <id> <ts>`, followed by ` <digest>` when there is one.
    fn parse(text: &str) -> Result<Remembered, ChatError> {
        let (stamp, digest) = match text.rsplit_once(' ') {
            Some((head, digest)) if head.matches(' ').count() == 2 => (head, Some(digest)),
            _ => (text, None),
        };
        Ok(Remembered {
            stamp: Stamp::parse(stamp)?,
            digest: digest.map(str::to_string),
        })
    }

    /// Whether `text` is the text of the first attempt; `None` when the
    /// cid was remembered without a digest.
    pub fn same_text(&self, text: &str) -> Option<bool> {
        self.digest.as_ref().map(|d| *d == text_digest(text))
    }
}

/// A short digest of a message's text, remembered with its cid: 16 hex
/// digits of its SHA-256. A retry with another text under the same cid is
/// then told apart from a plain retry without reading the message.
pub fn text_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(text.as_bytes());
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
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
    Pending(Remembered),
    /// A repeated cid, published under its own seq.
    Published(Remembered),
    /// A repeated cid, published under a new seq (the stamp's).
    Resequenced(Remembered),
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

/// The value a room's cid memory holds for a cid published under `stamp`
/// (the form `accept.lua` and `deliver.lua` read: `<seq> <id> <ts> d`).
pub fn published_value(stamp: &Stamp) -> String {
    format!("{} {} {} d", stamp.seq, stamp.id, stamp.ts)
}

/// The field under which a room remembers a user's cid.
pub fn cid_field(user_id: &str, cid: &str) -> String {
    format!("{user_id}:{cid}")
}

/// Where one script call looks for a cid: the bucket a cid first accepted
/// at `at_ms` goes to (first, with its expiry), then the other buckets live
/// at `now_ms`, then the hash of older nodes.
struct CidPlaces {
    keys: Vec<String>,
    home_expires_at: u64,
}

impl CidPlaces {
    fn new(room: &str, at_ms: i64, now_ms: i64, ttl_secs: u64) -> CidPlaces {
        let secs = |ms: i64| u64::try_from(ms / 1000).unwrap_or(0);
        let (home, home_expires_at) = keys::cid_bucket_at(room, secs(at_ms), ttl_secs);
        let mut keys = vec![home];
        for bucket in keys::live_cid_buckets(room, secs(now_ms), ttl_secs) {
            if bucket != keys[0] {
                keys.push(bucket);
            }
        }
        keys.push(keys::cids(room));
        CidPlaces {
            keys,
            home_expires_at,
        }
    }
}

/// The scripts, hashed once; `EVALSHA` loads a script a server lacks.
pub struct Scripts {
    accept: Script,
    recall: Script,
    seed: Script,
    deliver: Script,
    open_gap: Script,
    raise_watermark: Script,
    /// How long a room's keys outlive its last message
    /// (`redis.room_idle_ttl_secs`).
    room_idle_ttl_secs: u64,
}

/// The default of `redis.room_idle_ttl_secs`, for [`Scripts::default`].
const DEFAULT_ROOM_IDLE_TTL_SECS: u64 = 30 * 24 * 3600;

impl Default for Scripts {
    fn default() -> Self {
        Self::new(DEFAULT_ROOM_IDLE_TTL_SECS)
    }
}

fn redis_error(e: redis::RedisError) -> ChatError {
    ChatError::Unavailable(format!("redis: {e}"))
}

impl Scripts {
    /// The scripts for rooms whose keys leave Redis `room_idle_ttl_secs`
    /// after their last message.
    pub fn new(room_idle_ttl_secs: u64) -> Self {
        Self {
            accept: Script::new(concat!(
                include_str!("lua/cid.lua"),
                include_str!("lua/accept.lua")
            )),
            recall: Script::new(concat!(
                include_str!("lua/cid.lua"),
                include_str!("lua/recall.lua")
            )),
            seed: Script::new(include_str!("lua/seed.lua")),
            deliver: Script::new(concat!(
                include_str!("lua/cid.lua"),
                include_str!("lua/deliver.lua")
            )),
            open_gap: Script::new(include_str!("lua/open_gap.lua")),
            raise_watermark: Script::new(include_str!("lua/raise_watermark.lua")),
            room_idle_ttl_secs,
        }
    }

    /// Accepts a message of `room` with `text` for `field` ([`cid_field`]),
    /// giving it `id` and `ts` if it is new; the cid is then remembered for
    /// `cid_ttl_secs` to 1.5 times that (see [`keys::cid_bucket_secs`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn accept(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        field: &str,
        id: &str,
        ts: i64,
        text: &str,
        cid_ttl_secs: u64,
    ) -> Result<Accept, ChatError> {
        let places = CidPlaces::new(room, ts, ts, cid_ttl_secs);
        let reply: Vec<String> = self
            .accept
            .key(keys::seq(room))
            .key(keys::recovering(room))
            .key(&places.keys)
            .arg(field)
            .arg(id)
            .arg(ts)
            .arg(text_digest(text))
            .arg(places.home_expires_at)
            .arg(self.room_idle_ttl_secs)
            .invoke_async(conn)
            .await
            .map_err(redis_error)?;
        decode_accept(&reply)
    }

    /// What `room` remembers of `field` now, changing nothing: `Pending`,
    /// `Published` or `Resequenced`, or `None` when it does not remember
    /// the cid.
    pub async fn recall(
        &self,
        conn: &mut impl ConnectionLike,
        room: &str,
        field: &str,
        cid_ttl_secs: u64,
    ) -> Result<Option<Accept>, ChatError> {
        let now = crate::protocol::now_ms();
        let places = CidPlaces::new(room, now, now, cid_ttl_secs);
        let reply: Vec<String> = self
            .recall
            .key(&places.keys)
            .arg(field)
            .invoke_async(conn)
            .await
            .map_err(redis_error)?;
        if reply.first().map(String::as_str) == Some("forgotten") {
            return Ok(None);
        }
        match decode_accept(&reply)? {
            repeat @ (Accept::Pending(_) | Accept::Published(_) | Accept::Resequenced(_)) => {
                Ok(Some(repeat))
            }
            _ => Err(unexpected("recall.lua", &reply)),
        }
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
            .arg(self.room_idle_ttl_secs)
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
        let now = crate::protocol::now_ms();
        let places = CidPlaces::new(&m.room, m.ts, now, args.cid_ttl_secs);
        let reply: Vec<String> = self
            .deliver
            .key(keys::recent(&m.room))
            .key(keys::persisted(&m.room))
            .key(keys::seq(&m.room))
            .key(keys::published(&m.room))
            .key(&places.keys)
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
            .arg(places.home_expires_at)
            .arg(args.publish.command())
            .arg(text_digest(&m.text))
            .arg(self.room_idle_ttl_secs)
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
            .arg(self.room_idle_ttl_secs)
            .invoke_async(conn)
            .await
            .map_err(redis_error)
    }

    /// How long a room's keys outlive its last message.
    pub fn room_idle_ttl_secs(&self) -> u64 {
        self.room_idle_ttl_secs
    }
}

fn unexpected(script: &str, reply: &[String]) -> ChatError {
    ChatError::Internal(format!("unexpected reply {reply:?} from {script}"))
}

fn decode_accept(reply: &[String]) -> Result<Accept, ChatError> {
    let text = || reply.get(1).ok_or_else(|| unexpected("accept.lua", reply));
    let stamp = || Stamp::parse(text()?);
    let prior = || Remembered::parse(text()?);
    match reply.first().map(String::as_str) {
        Some("new") => Ok(Accept::New(stamp()?)),
        Some("unverified") => Ok(Accept::Unverified(stamp()?)),
        Some("pending") => Ok(Accept::Pending(prior()?)),
        Some("published") => Ok(Accept::Published(prior()?)),
        Some("resequenced") => Ok(Accept::Resequenced(prior()?)),
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
        let prior = Remembered {
            stamp: stamp.clone(),
            digest: None,
        };
        let cases = [
            ("new", Accept::New(stamp.clone())),
            ("unverified", Accept::Unverified(stamp.clone())),
            ("pending", Accept::Pending(prior.clone())),
            ("published", Accept::Published(prior.clone())),
            ("resequenced", Accept::Resequenced(prior.clone())),
        ];
        for (word, expected) in cases {
            let reply = words(&[word, "7 01J 1700"]);
            assert_eq!(decode_accept(&reply).ok(), Some(expected), "{word}");
        }
        let with_digest = Remembered {
            stamp: stamp.clone(),
            digest: Some("0123456789abcdef".into()),
        };
        assert_eq!(
            decode_accept(&words(&["pending", "7 01J 1700 0123456789abcdef"])).ok(),
            Some(Accept::Pending(with_digest))
        );
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
            words(&["new", "7 01J 1700 0123456789abcdef"]),
            words(&["pending", "7 01J x 0123456789abcdef"]),
            words(&["pending", "7 01J 1700 abc def"]),
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
            ("recall", include_str!("lua/recall.lua")),
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

    #[test]
    fn a_digest_tells_texts_apart_and_is_absent_from_older_values() {
        let digest = text_digest("first");
        assert_eq!(digest.len(), 16);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(digest, text_digest("first"));
        assert_ne!(digest, text_digest("second"));
        let remembered = Remembered::parse(&format!("3 01J 1700 {digest}")).ok();
        let same = |text| remembered.as_ref().map(|r| r.same_text(text));
        assert_eq!(same("first"), Some(Some(true)));
        assert_eq!(same("second"), Some(Some(false)));
        let older = Remembered::parse("3 01J 1700").ok();
        assert_eq!(older.map(|r| r.same_text("first")), Some(None));
    }
}
