//! Test harness: starts the real `scalable-chat` binary as a child process on a
//! free port with its own data directory, and speaks HTTP and WebSocket to it.
//!
//! Every wait is bounded so that a misbehaving server fails a test instead of
//! hanging it.
//!
//! - `services`: where the local Redis, Kafka and MongoDB listen, and the
//!   settings that keep one cluster test apart from the others;
//! - `node`: `NodeOpts` and `TestNode`, one node process and its HTTP side;
//! - `client`: `TestClient`, a WebSocket client of the chat protocol, and
//!   `WsEvent`, what arrived on it;
//! - `assert`: assertions and summaries over frames, messages and acks.
//!
//! A test crate declares `mod common;` and takes what it needs with
//! `use common::*;`.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

mod assert;
mod client;
mod node;
mod services;

// Each test crate uses a different part of these, too.
#[allow(unused_imports)]
pub use assert::{
    ack_map, assert_msg_shape, assert_strictly_increasing, assert_ulid, now_ms, seqs, summarize,
};
#[allow(unused_imports)]
pub use client::{TestClient, WsEvent, RECV_TIMEOUT};
#[allow(unused_imports)]
pub use node::{
    base_command, binary, free_port, http_client, metric_value, minimal_config, rss_bytes,
    run_to_exit, start_expect_failure, NodeOpts, TestNode, CLUSTER_START_TIMEOUT, SECRET,
    START_TIMEOUT,
};
#[allow(unused_imports)]
pub use services::{
    bson_int, forget_in_redis, mongo_client, unique_tag, ClusterOpts, Services, Topology,
};
