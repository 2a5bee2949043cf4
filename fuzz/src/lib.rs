//! The parts of the node that the fuzz targets exercise, compiled from the
//! node's own source files under the node's crate name, so the targets call
//! `scalable_chat::protocol::parse_client_frame` and
//! `scalable_chat::config::Settings::parse` exactly as the node does. Only
//! these modules are built, not the Redis, Kafka and MongoDB clients, which
//! keeps a cold fuzz build to a few minutes.

#![allow(dead_code)]

#[path = "../../src/config.rs"]
pub mod config;
#[path = "../../src/error.rs"]
pub mod error;
#[path = "../../src/protocol.rs"]
pub mod protocol;
