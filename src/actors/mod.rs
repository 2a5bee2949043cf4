//! The actors of a node, one per file, each with the messages it handles at
//! the top of its file.

pub mod kafka_sink;
pub mod persist;
pub mod redis_bridge;
pub mod registry;
pub mod room;
pub mod scheduler;
pub mod session;
