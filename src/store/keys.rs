//! Names of the Redis keys and channels of cluster mode, in one place.
//!
//! Room names are checked to be `a-z 0-9 _ -` before they get here, and
//! user ids and cids only ever appear as hash fields or values, never in a
//! key, so nothing a client sends can shape a key. The room sits in a hash
//! tag (`{room}`), so a Redis Cluster keeps each room's keys in one slot
//! and the accept script can touch them together.

/// The room's last accepted seq.
pub fn seq(room: &str) -> String {
    format!("chat:{{{room}}}:seq")
}

/// The room's cids as nodes kept them before the time buckets
/// ([`cid_bucket`]): one hash whose expiry every message pushed, so that an
/// active room never forgot a cid. Still read, so that a rolling upgrade
/// recognises the cids the older nodes accepted, and updated in place for
/// those; never created. It expires on its own, `cid_ttl_secs` after the
/// last older node wrote it.
pub fn cids(room: &str) -> String {
    format!("chat:{{{room}}}:cids")
}

/// Hash of the cids first accepted in the `n`th span of
/// [`cid_bucket_secs`] seconds since the epoch: field `<user id>:<cid>`,
/// value `<seq> <id> <ts> <digest>` while the message is on its way (the
/// digest of its text, see `scripts::text_digest`), with ` d` appended once
/// it was published, or ` r` when it was published under a new seq (the
/// value's). A cid stays in the bucket of its first acceptance.
pub fn cid_bucket(room: &str, n: u64) -> String {
    format!("chat:{{{room}}}:cids:{n}")
}

/// Seconds of first acceptances one cid bucket holds: half a cid's
/// lifetime (at least 1 s). A bucket expires `ttl_secs` after its span
/// ends, so every cid in it is remembered at least `ttl_secs` and at most
/// `ttl_secs` plus one span, whatever the room does meanwhile.
pub fn cid_bucket_secs(ttl_secs: u64) -> u64 {
    ttl_secs.div_ceil(2).max(1)
}

/// The bucket of the cids first accepted at `at_secs`, and when it expires
/// (s since the epoch).
pub fn cid_bucket_at(room: &str, at_secs: u64, ttl_secs: u64) -> (String, u64) {
    let span = cid_bucket_secs(ttl_secs);
    let n = at_secs / span;
    (cid_bucket(room, n), (n + 1) * span + ttl_secs)
}

/// Every bucket that may still hold a cid remembered at `now_secs`, newest
/// first: those whose expiry is still ahead.
pub fn live_cid_buckets(room: &str, now_secs: u64, ttl_secs: u64) -> Vec<String> {
    let span = cid_bucket_secs(ttl_secs);
    let first = now_secs.saturating_sub(ttl_secs) / span;
    let last = now_secs / span;
    (first..=last).rev().map(|n| cid_bucket(room, n)).collect()
}

/// Sorted set of the seqs published lately (score = seq, member =
/// `<seq>:<ms since the epoch>`): tells how long ago a seq was passed.
pub fn published(room: &str) -> String {
    format!("chat:{{{room}}}:published")
}

/// Sorted set of recent messages (score = seq, member = message JSON).
pub fn recent(room: &str) -> String {
    format!("chat:{{{room}}}:recent")
}

/// Highest seq of the room that MongoDB holds (set by persist workers);
/// the recent cache never trims above it.
pub fn persisted(room: &str) -> String {
    format!("chat:{{{room}}}:persisted")
}

/// Set while a room's cid memory may be missing cids it accepted: from
/// when Redis lost the room and it was seeded again, for as long as a cid
/// is remembered. A new cid is then checked against MongoDB first.
pub fn recovering(room: &str) -> String {
    format!("chat:{{{room}}}:recovering")
}

/// Hash of members on every node: field `<node id>|<user id>`, value the
/// user as JSON.
pub fn members(room: &str) -> String {
    format!("chat:{{{room}}}:members")
}

/// Pub/sub channel of the room's events (messages, presence, typing).
pub fn channel(room: &str) -> String {
    format!("chat:{{{room}}}:events")
}

/// The room whose channel is `channel`, if it is one.
pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("chat:{")?.strip_suffix("}:events")
}

/// Every key of one room with a fixed name (not its channel): with the
/// cid buckets ([`live_cid_buckets`], or every key matching
/// `chat:{room}:cids:*`), what removing a room removes.
pub fn of_room(room: &str) -> [String; 7] {
    [
        seq(room),
        cids(room),
        published(room),
        recent(room),
        persisted(room),
        members(room),
        recovering(room),
    ]
}

/// The room list: a sorted set of every room whose seq was started, all
/// scores 0, so that it sorts by name and is read a page at a time
/// (`ZRANGEBYLEX`). Rooms gone from Redis leave it in the sweep.
pub const ROOMS: &str = "chat:rooms:by-name";

/// The set earlier versions kept the room list in, read whole. Nothing
/// writes it any more; the sweep copies it into [`ROOMS`] once per run of
/// a node, so that a rolling upgrade lists every room.
pub const LEGACY_ROOMS: &str = "chat:rooms";

/// Sorted set of live nodes (score = last heartbeat, ms since the epoch).
pub const NODES: &str = "chat:nodes";

/// Set of the rooms a node has members in: lets the sweep find a dead
/// node's members.
pub fn node_rooms(node: &str) -> String {
    format!("chat:node:{node}:rooms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_names_its_room() {
        assert_eq!(room_of_channel(&channel("lobby-1")), Some("lobby-1"));
        assert_eq!(room_of_channel("chat:{lobby}:seq"), None);
        assert_eq!(room_of_channel("other"), None);
    }

    #[test]
    fn a_cid_is_remembered_between_one_and_one_and_a_half_lifetimes() {
        let ttl = 4;
        for at in 100..110 {
            let (bucket, expires) = cid_bucket_at("r", at, ttl);
            assert!(expires >= at + ttl, "{at}: gone at {expires}");
            assert!(
                expires <= at + ttl + cid_bucket_secs(ttl),
                "{at}: {expires}"
            );
            // Looked up in every second of its life, and not after.
            for now in at..expires {
                assert!(
                    live_cid_buckets("r", now, ttl).contains(&bucket),
                    "{at} {now}"
                );
            }
            assert!(!live_cid_buckets("r", expires, ttl).contains(&bucket));
        }
    }

    #[test]
    fn a_room_looks_in_a_few_buckets_at_most() {
        for ttl in [1, 2, 3, 4, 5, 604_800] {
            for now in [0, 1, 7, 1_000_003, 1_767_268_800] {
                let live = live_cid_buckets("r", now, ttl);
                assert!((1..=3).contains(&live.len()), "{ttl} {now}: {live:?}");
                assert_eq!(live[0], cid_bucket_at("r", now, ttl).0);
            }
        }
    }
}
