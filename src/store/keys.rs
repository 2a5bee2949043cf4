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

/// Hash of accepted cids: field `<user id>:<cid>`, value `<seq> <id> <ts>`
/// while the message is on its way, with ` d` appended once it was
/// published, or ` r` when it was published under a new seq (the value's).
pub fn cids(room: &str) -> String {
    format!("chat:{{{room}}}:cids")
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

/// Every key of one room (not its channel): what removing a room removes.
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
}
