//! ScalableChat: a real-time chat node. Clients speak the v1 contract
//! (`docs/PROTOCOL.md`) over WebSocket and HTTP; the node keeps every
//! acknowledged message durable.
//!
//! The binary only wires settings and logging; [`Node::start`] is the whole
//! server, so tests start the very same thing.
//!
//! # Layout
//!
//! Dependencies run one way, top to bottom; no file imports one above it,
//! and no two files import each other (`scripts/check-layers` checks both).
//!
//! - [`node`], [`cluster`]: start-up. Open the store or connect the
//!   services, start the actors and the HTTP server; drain on SIGTERM.
//! - [`http`]: the routes. The WebSocket upgrade hands the connection to a
//!   session actor; the REST API, health and metrics read the store and
//!   ask the registry.
//! - [`actors`]: one actor per file. A message goes down the chain
//!   `session` → `registry` → `room` → `redis_bridge`, and comes back up
//!   through the messages of `actors::messages` and each session's
//!   `outbox`. `kafka_sink` is the store's durable log in cluster mode;
//!   `persist_supervisor` and `persist_worker` move the log into MongoDB.
//! - [`store`]: where messages live, behind the `MessageStore` trait: the
//!   embedded store (standalone), or Redis, Kafka and MongoDB (cluster),
//!   with their keys, Lua scripts and channel events. Imports no actor.
//! - The basics, imported by all of the above: [`protocol`] (the wire
//!   format), [`config`], [`error`], [`auth`], [`limits`], [`metrics`].

pub mod actors;
pub mod auth;
mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod store;

pub use error::StartError;
pub use node::Node;
