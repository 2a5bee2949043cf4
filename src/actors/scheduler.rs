//! `Scheduler`: the node's periodic jobs, on clokwerk. Each job only sends
//! a message or logs, and the actor that does the work logs and swallows
//! its own failure, so one failing job never stops the others.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use clokwerk::{Scheduler as Clock, TimeUnits};

use super::redis_bridge::{Heartbeat, RedisBridge, SweepDeadNodes};
use super::registry::{RoomRegistry, WarmCaches};
use crate::config::{Role, Settings};
use crate::metrics::Metrics;
use crate::store::MessageStore;

/// How often the clock looks for due jobs.
const TICK: Duration = Duration::from_millis(500);
/// How often the caches of active rooms are checked and warmed.
const WARM_EVERY_SECS: u32 = 30;
/// A node heartbeats this often...
pub const HEARTBEAT_SECS: u32 = 5;
/// ...and is taken for dead, its members removed, after this long silent.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);

/// Runs the node's scheduled jobs.
pub struct Scheduler {
    clock: Clock,
}

impl Scheduler {
    pub fn new(
        settings: &Settings,
        metrics: Arc<Metrics>,
        registry: Addr<RoomRegistry>,
        bridge: Option<Addr<RedisBridge>>,
        store: Arc<dyn MessageStore>,
    ) -> Self {
        let mut clock = Clock::new();
        let node_id = settings.node.id.clone();
        // A stats line a minute: the one place an operator sees the node's
        // load without a metrics system.
        clock.every(1.minutes()).run(move || {
            log::info!(
                "Node {node_id}: {} connections, {} rooms, {} messages in, {} out, {} slow readers cut off.",
                metrics.connections.load(Relaxed),
                metrics.rooms.load(Relaxed),
                metrics.messages_in.load(Relaxed),
                metrics.messages_out.load(Relaxed),
                metrics.slow_closes.load(Relaxed),
            );
        });
        if let Some(bridge) = bridge {
            // Active rooms whose cache went cold (Redis restarted empty, or
            // the cache expired) get their recent history back from MongoDB.
            clock
                .every(WARM_EVERY_SECS.seconds())
                .run(move || registry.do_send(WarmCaches));
            let beat = bridge.clone();
            beat.do_send(Heartbeat);
            clock
                .every(HEARTBEAT_SECS.seconds())
                .run(move || beat.do_send(Heartbeat));
            // Cluster-wide: only nodes with the sweep role run it.
            if settings.node.roles.contains(&Role::Sweep) {
                clock.every(HEARTBEAT_SECS.seconds()).run(move || {
                    bridge.do_send(SweepDeadNodes {
                        dead_after: DEAD_AFTER,
                    })
                });
                // The room list forgets rooms gone from Redis, a page a step.
                clock
                    .every(HEARTBEAT_SECS.seconds())
                    .run(move || drop(actix::spawn(store.sweep_rooms())));
            }
        }
        Self { clock }
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, _| act.clock.run_pending());
    }
}
