//! The actors of a node, one per file, each with the messages it handles at
//! the top of its file, and what they share: the messages that travel up
//! the chain, a session's outbox, replay on join, the node's shared state.
//!
//! Top to bottom: `session` → `registry` → `room` → `redis_bridge`; the
//! `scheduler` sends to the registry and the bridge. `kafka_sink`,
//! `persist_supervisor` and `persist_worker` stand beside them, on the
//! store's side.

pub mod app;
pub mod kafka_sink;
pub mod messages;
pub mod outbox;
pub mod persist_supervisor;
pub mod persist_worker;
pub mod redis_bridge;
pub mod registry;
pub mod replay;
pub mod room;
pub mod scheduler;
pub mod session;
