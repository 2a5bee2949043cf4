//! `PersistSupervisor`: stores the Kafka log of accepted messages in MongoDB,
//! on nodes with the persist role in cluster mode.
//!
//! The supervisor runs a fixed number of consumer-group workers
//! ([`super::persist_worker`]), each a task with its own Kafka consumer, and
//! restarts one that fails or panics. It also sums the workers' lag into
//! the node's `consumer_lag` gauge.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::task::{AbortHandle, JoinError};

use super::persist_worker::{Worker, LAG_INTERVAL};
use crate::config::ClusterSettings;
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::store::mongo::MongoStore;
use crate::store::redis::RedisConn;

/// Aborts one worker's task, as a crash would; the supervisor restarts it
/// after its usual back-off. Answers whether a worker was running there.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct KillWorker {
    pub index: usize,
}

/// Stops every worker, then the supervisor itself (a draining node, a test
/// that is done). Their consumers leave the group while closing, so the
/// partitions move to other nodes at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Asks how many workers run now and how often they were restarted.
#[derive(Message)]
#[rtype(result = "PersistStatus")]
pub struct GetStatus;

/// The answer to [`GetStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistStatus {
    /// Workers whose task is running (not waiting to be restarted).
    pub running: usize,
    /// Restarts since the supervisor started, whatever their cause.
    pub restarts: u64,
}

/// Pause before restarting a failed worker, so a worker that fails at once
/// (Kafka down) does not spin.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs the persist workers of a node and restarts a failed one.
pub struct PersistSupervisor {
    cluster: ClusterSettings,
    mongo: Arc<MongoStore>,
    redis: RedisConn,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    restarts: u64,
    /// Source of [`Slot::generation`] values.
    generations: u64,
}

/// One worker place of the supervisor.
struct Slot {
    /// Aborts the running task; `None` while waiting for a restart.
    abort: Option<AbortHandle>,
    /// Tells the end of the current task from a late report of an earlier
    /// task of the same slot.
    generation: u64,
    /// Lag of the partitions assigned to this slot's worker, last measured.
    lag: Arc<AtomicI64>,
}

impl PersistSupervisor {
    pub fn new(
        cluster: ClusterSettings,
        mongo: Arc<MongoStore>,
        redis: RedisConn,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Self {
        let slots = (0..workers)
            .map(|_| Slot {
                abort: None,
                generation: 0,
                lag: Arc::new(AtomicI64::new(0)),
            })
            .collect();
        Self {
            cluster,
            mongo,
            redis,
            metrics,
            slots,
            restarts: 0,
            generations: 0,
        }
    }

    /// Starts the worker of slot `index` and watches its task.
    fn start_worker(&mut self, index: usize, ctx: &mut Context<Self>) {
        self.generations += 1;
        let generation = self.generations;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.lag.store(0, Relaxed);
        let worker = Worker::new(
            index,
            &self.cluster,
            self.mongo.clone(),
            self.redis.clone(),
            self.metrics.clone(),
            slot.lag.clone(),
        );
        let handle = actix::spawn(worker.run());
        slot.abort = Some(handle.abort_handle());
        slot.generation = generation;
        ctx.spawn(
            fut::wrap_future::<_, Self>(handle)
                .map(move |outcome, act, ctx| act.worker_ended(index, generation, outcome, ctx)),
        );
    }

    /// A worker's task ended: restart it unless it stopped on purpose.
    fn worker_ended(
        &mut self,
        index: usize,
        generation: u64,
        outcome: Result<Result<(), ChatError>, JoinError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.abort = None;
        slot.lag.store(0, Relaxed);
        match outcome {
            Ok(Ok(())) => {
                log::info!("worker={index}: Persist worker stopped.");
                return;
            }
            Ok(Err(e)) => log::warn!(
                "worker={index}: Persist worker failed: {}; restarting in {RESTART_DELAY:?}.",
                e.detail()
            ),
            Err(e) if e.is_cancelled() => log::warn!(
                "worker={index}: Persist worker was killed; restarting in {RESTART_DELAY:?}."
            ),
            Err(e) => log::warn!(
                "worker={index}: Persist worker panicked: {e}; restarting in {RESTART_DELAY:?}."
            ),
        }
        self.restarts += 1;
        ctx.run_later(RESTART_DELAY, move |act, ctx| act.start_worker(index, ctx));
    }
}

impl Actor for PersistSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "topic={} group={} database={}: Starting {} persist workers.",
            self.cluster.kafka.topic,
            self.cluster.kafka.group,
            self.cluster.mongo.database,
            self.slots.len()
        );
        for index in 0..self.slots.len() {
            self.start_worker(index, ctx);
        }
        // The node's gauge is the sum over its workers, each of which
        // measures only the partitions it holds.
        ctx.run_interval(LAG_INTERVAL, |act, _| {
            let lag = act.slots.iter().map(|s| s.lag.load(Relaxed)).sum();
            act.metrics.consumer_lag.store(lag, Relaxed);
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Worker tasks are not tied to this actor's context: stop them too.
        for slot in &mut self.slots {
            if let Some(abort) = slot.abort.take() {
                abort.abort();
            }
        }
        log::info!("Persist workers stopped.");
    }
}

impl Handler<KillWorker> for PersistSupervisor {
    type Result = bool;

    fn handle(&mut self, msg: KillWorker, _: &mut Context<Self>) -> bool {
        match self.slots.get(msg.index).and_then(|s| s.abort.as_ref()) {
            Some(abort) => {
                log::warn!("worker={}: Killing a persist worker on request.", msg.index);
                abort.abort();
                true
            }
            None => false,
        }
    }
}

impl Handler<Stop> for PersistSupervisor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        // `stopped` aborts the worker tasks.
        ctx.stop();
    }
}

impl Handler<GetStatus> for PersistSupervisor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(PersistStatus {
            running: self.slots.iter().filter(|s| s.abort.is_some()).count(),
            restarts: self.restarts,
        })
    }
}
