//! Messages that travel up the chain of actors. A message a single actor
//! handles sits at the top of that actor's file, and its senders import it
//! from there; the ones here go the other way (from the relay up to the
//! registry and the rooms, from the registry up to the sessions), so their
//! senders hold a [`Recipient`] instead of the receiver's address, and no
//! actor's file imports one above it:
//! `session` → `registry` → `room` → `redis_bridge`.

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::protocol::ChatMessage;
use crate::store::channel::RoomEvent;

/// The node is draining: a session finishes what it accepted, then closes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// A message became durable: deliver it to the room's local members. The
/// embedded store's commit hook and the relay send it, in `seq` order
/// within a room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub message: ChatMessage,
}

/// Presence or typing published by another node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteEvent {
    pub event: RoomEvent,
}

/// The relay listens again after a gap: the room (every room, for `None`)
/// backfills what it may have missed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync {
    pub room: Option<String>,
}

/// The relay may be missing what is published to the room (to every room,
/// for `None`): what was published meanwhile, or just before, may never
/// arrive live, and the backfill that follows finds it only above the last
/// delivered seq. So a room gives up no missing seq until that backfill has
/// read the store.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayDown {
    pub room: Option<String>,
}

/// Where the relay reports what it hears: the registry, seen from below.
#[derive(Clone)]
pub struct RelayReports {
    pub publish: Recipient<Publish>,
    pub remote: Recipient<RemoteEvent>,
    pub resync: Recipient<Resync>,
    pub down: Recipient<RelayDown>,
}

impl RelayReports {
    /// Reports to `addr`.
    pub fn to<A>(addr: &Addr<A>) -> Self
    where
        A: Actor + Handler<Publish> + Handler<RemoteEvent> + Handler<Resync> + Handler<RelayDown>,
        A::Context: ToEnvelope<A, Publish>
            + ToEnvelope<A, RemoteEvent>
            + ToEnvelope<A, Resync>
            + ToEnvelope<A, RelayDown>,
    {
        Self {
            publish: addr.clone().recipient(),
            remote: addr.clone().recipient(),
            resync: addr.clone().recipient(),
            down: addr.clone().recipient(),
        }
    }
}
