//! What travels on a room's pub/sub channel between the nodes of a cluster
//! (the channel's name is [`super::keys::channel`]). The cluster store
//! publishes durable messages there; the `RedisBridge` publishes presence
//! and typing and hands what it receives to the rooms.

use serde::{Deserialize, Serialize};

use crate::protocol::{ChatMessage, User};

/// One event on a room's channel, tagged `t` on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum RoomEvent {
    /// A durable message.
    Msg { node: String, m: ChatMessage },
    /// Users came or went on `node`.
    Presence {
        node: String,
        room: String,
        joined: Vec<User>,
        left: Vec<User>,
    },
    /// A user on `node` is typing.
    Typing {
        node: String,
        room: String,
        user: User,
    },
}

impl RoomEvent {
    /// The room the event belongs to.
    pub fn room(&self) -> &str {
        match self {
            RoomEvent::Msg { m, .. } => &m.room,
            RoomEvent::Presence { room, .. } | RoomEvent::Typing { room, .. } => room,
        }
    }

    /// The node that published presence or typing (`None` for a message,
    /// which every node delivers, its own included).
    pub fn from_node(&self) -> Option<&str> {
        match self {
            RoomEvent::Msg { .. } => None,
            RoomEvent::Presence { node, .. } | RoomEvent::Typing { node, .. } => Some(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shape_is_tagged_by_t() {
        let event = RoomEvent::Typing {
            node: "n1".into(),
            room: "lobby".into(),
            user: User {
                id: "u1".into(),
                name: "ann".into(),
            },
        };
        let json = serde_json::to_value(&event).unwrap_or_default();
        assert_eq!(json["t"], "typing");
        assert_eq!(json["room"], "lobby");
        assert_eq!(event.room(), "lobby");
        assert_eq!(event.from_node(), Some("n1"));
    }
}
