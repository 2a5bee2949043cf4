//! `Scheduler`: the node's periodic jobs, on clokwerk. Each job logs and
//! swallows its own failure, so one failing job never stops the others.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use clokwerk::{Scheduler as Clock, TimeUnits};

use crate::metrics::Metrics;

/// How often the clock looks for due jobs.
const TICK: Duration = Duration::from_millis(500);

/// Runs the node's scheduled jobs.
pub struct Scheduler {
    clock: Clock,
}

impl Scheduler {
    pub fn new(metrics: Arc<Metrics>, node_id: String) -> Self {
        let mut clock = Clock::new();
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
        Self { clock }
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, _| act.clock.run_pending());
    }
}
