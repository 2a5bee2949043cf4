//! The message log of cluster mode: Redis sequences and de-duplicates,
//! Kafka makes durable, Redis relays and caches, MongoDB keeps history.
//!
//! An append is: (1) one Lua script in Redis that returns the earlier
//! `id`/`seq` for a repeated cid or assigns the room's next seq; (2) a
//! produce to Kafka through the `KafkaSink`, awaited until its delivery
//! report; (3) one Lua script that adds the message to the room's recent
//! cache and publishes it on the room's channel. Only after (2) is the
//! message visible to anyone, and only after (3) is it acked.
//!
//! A message that reaches (3) late, when the rooms have given up waiting
//! for its seq (a retry after Kafka timed out, a retry of a dead node's
//! message, a publish delayed by a Redis outage), is published under the
//! room's next seq and produced again under it; the persist workers keep
//! the higher seq of the two. Every client gets it live, in order.
//!
//! History is the recent cache in Redis joined with MongoDB: the cache is
//! trimmed only below what MongoDB already holds, so the two together never
//! have a hole, even while the persist workers lag or MongoDB is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redis::AsyncCommands;

use super::channel::RoomEvent;
use super::kafka_scan::TailScan;
use super::mongo::MongoStore;
use super::redis::{Publish, RedisConn};
use super::scripts::{
    cid_field, published_value, Accept, AcceptedCid, DeliverArgs, Delivery, Remembered, Scripts,
    Stamp,
};
use super::{
    keys, Accepted, DependencyStatus, DurableLog, MessageStore, NewMessage, Page, HOLD_BACK,
};
use crate::config::{KafkaSettings, RedisSettings};
use crate::error::ChatError;
use crate::metrics::Metrics;
use crate::protocol::ChatMessage;

/// How late a message may be published under its own seq: well inside the
/// rooms' hold-back, so every room that waited for it still does.
const LATE: Duration = Duration::from_millis(500);
const _: () = assert!(2 * LATE.as_millis() <= HOLD_BACK.as_millis());

/// How long a sender waits for the publish of its durable message while
/// Redis does not answer, before it hears `unavailable`.
const DELIVER_WAIT: Duration = Duration::from_secs(6);

/// The first and the longest pause between two background retries.
const RETRY_PAUSES: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));

/// How long a message that could not be cached and published keeps trying.
const DELIVER_RETRY_WINDOW: Duration = Duration::from_secs(120);

/// The most cids a room takes back from MongoDB when it is seeded after
/// Redis lost it: one query's worth. A room that sent more within the cids'
/// lifetime looks the older ones up one by one as they come.
const RECOVERED_CIDS: usize = 10_000;

/// Room names looked at per step of the room list's sweep: a step every
/// few seconds walks a million rooms in about a day.
const SWEEP_PAGE: usize = 100;

/// Room names copied per step from the room set of earlier versions.
const LEGACY_PAGE: usize = 500;

/// Seqs below MongoDB's watermark that the cache still keeps (see
/// `lua/deliver.lua`).
const TRIM_MARGIN: u64 = 100;

struct Inner {
    redis: RedisConn,
    log: Arc<dyn DurableLog>,
    mongo: Arc<MongoStore>,
    /// Finds the durable seqs MongoDB does not hold yet, for seeding.
    scan: TailScan,
    settings: RedisSettings,
    node_id: String,
    scripts: Scripts,
    /// One seeding at a time per room on this node: the first sends of a
    /// new room all find it unseeded, and one look at the durable tail is
    /// enough for all of them.
    seeding: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Where the room list's sweep goes on: after this name, or from the
    /// start.
    sweep_after: Mutex<Option<String>>,
    /// The `SSCAN` cursor of the copy of the earlier versions' room set;
    /// `None` once the copy is done.
    legacy_cursor: Mutex<Option<u64>>,
    /// Set while a sweep step runs, so that steps never pile up.
    sweeping: AtomicBool,
}

/// The cluster-mode message log.
#[derive(Clone)]
pub struct ClusterStore {
    inner: Arc<Inner>,
}

fn unavailable(service: &str) -> impl Fn(redis::RedisError) -> ChatError + '_ {
    move |e| ChatError::Unavailable(format!("{service}: {e}"))
}

impl ClusterStore {
    pub fn new(
        redis: RedisConn,
        log: Arc<dyn DurableLog>,
        mongo: Arc<MongoStore>,
        kafka: KafkaSettings,
        settings: RedisSettings,
        node_id: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                log,
                mongo,
                scan: TailScan::new(kafka, metrics),
                scripts: Scripts::new(settings.room_idle_ttl_secs),
                settings,
                node_id,
                seeding: std::sync::Mutex::new(HashMap::new()),
                sweep_after: Mutex::new(None),
                legacy_cursor: Mutex::new(Some(0)),
                sweeping: AtomicBool::new(false),
            }),
        }
    }
}

impl Inner {
    /// Steps (1) to (3) of an append.
    async fn append(self: Arc<Self>, msg: NewMessage) -> Result<Accepted, ChatError> {
        let mut conn = self.redis.clone();
        let field = cid_field(&msg.user.id, &msg.cid);
        let id = ulid::Ulid::new().to_string();
        let ts = crate::protocol::now_ms();
        let ttl = self.settings.cid_ttl_secs;
        let room = msg.room.as_str();
        let text = msg.text.as_str();
        let mut accepted = self
            .scripts
            .accept(&mut conn, room, &field, &id, ts, text, ttl)
            .await?;
        if accepted == Accept::Unseeded {
            self.seed_room(room).await?;
            accepted = self
                .scripts
                .accept(&mut conn, room, &field, &id, ts, text, ttl)
                .await?;
        }
        // On a cluster, the accepted seq and cid must reach a replica before
        // anything is produced: a failover to a replica without them would
        // give the seq to another message, and take the cid for new.
        conn.wait_replicated(&keys::seq(room)).await?;
        let (stamp, repeated) = match accepted {
            Accept::New(stamp) => (stamp, false),
            Accept::Unverified(stamp) => match self.accepted_before(&msg, &field, stamp).await? {
                Recovered::Stored(message) => return Ok(Accepted::earlier(message)),
                Recovered::New(stamp) => (stamp, false),
            },
            // A retry with another text must not be produced under the
            // first attempt's id: it waits for that attempt instead.
            Accept::Pending(prior) if prior.same_text(&msg.text) == Some(false) => {
                let message = self.first_attempt(msg, &field).await?;
                return Ok(Accepted::earlier(message));
            }
            Accept::Pending(prior) => (prior.stamp, true),
            // A repeated cid that was published: it is durable and the
            // answer is the stored message.
            Accept::Published(prior) => {
                return Ok(Accepted::earlier(self.stored(msg, prior).await?));
            }
            // One published under a new seq is produced once more: the
            // attempt that did so may have ended before Kafka confirmed
            // the new seq.
            Accept::Resequenced(prior) => {
                let message = self.stored(msg, prior).await?;
                self.produce(&message).await?;
                return Ok(Accepted::earlier(message));
            }
            Accept::Unseeded => {
                return Err(ChatError::Internal(format!(
                    "room {room} has no seq in Redis right after seeding"
                )))
            }
        };
        let mut message = message_of(msg, stamp);
        // New, or a repeated cid none of whose attempts was published yet
        // (one may still be on its way, have failed, or its node died), with
        // the same text (or one remembered without a digest): it is
        // produced with the first attempt's id and seq. MongoDB keeps one
        // document per id, and the deliver script publishes a cid once.
        self.produce(&message).await?;
        match self.deliver_within(&message, DELIVER_WAIT).await {
            Ok(Delivery::Published) => Ok(Accepted {
                message,
                duplicate: repeated,
            }),
            Ok(Delivery::Earlier(seq)) => {
                message.seq = seq;
                Ok(Accepted::earlier(message))
            }
            Ok(Delivery::Resequenced(seq)) => {
                message.seq = seq;
                // Published and durable, but on failure Kafka has it only
                // under its first seq so far: the client's retry learns
                // the outcome.
                self.produce_resequenced(&message).await?;
                Ok(Accepted {
                    message,
                    duplicate: repeated,
                })
            }
            Err(e) => {
                // Durable, but not published, so its final seq is not
                // known: the client hears `unavailable` and its retry gets
                // the answer (unless Redis lost the cid meanwhile: then the
                // retry is a second message). Publishing is retried until
                // Redis is back, so the message reaches the rooms and
                // history even without a retry.
                log::warn!(
                    "Message {} of {} is durable but was not relayed: {e:?}; retrying.",
                    message.seq,
                    message.room
                );
                let retry = self.clone();
                actix::spawn(async move { retry.deliver_until_done(message).await });
                Err(e)
            }
        }
    }

    /// The message a published cid stands for, as stored: a retry is
    /// answered with it, whatever text the retry carries. Built from the
    /// retry when its text is the one remembered; otherwise read from the
    /// recent cache (by the remembered seq), or else from MongoDB. If
    /// neither holds it yet, the answer is `unavailable`: the retry learns
    /// it later.
    async fn stored(&self, msg: NewMessage, prior: Remembered) -> Result<ChatMessage, ChatError> {
        if prior.same_text(&msg.text) == Some(true) {
            return Ok(message_of(msg, prior.stamp));
        }
        let room = msg.room.as_str();
        let seq = prior.stamp.seq;
        let cached = self.cached(room, seq, seq, 1, false).await?;
        if let Some(found) = cached.into_iter().find(|m| m.id == prior.stamp.id) {
            return Ok(found);
        }
        match self.mongo.find_by_cid(room, &msg.user.id, &msg.cid).await? {
            // Stored maybe under its first seq still: the remembered one is
            // its final seq.
            Some(found) if found.id == prior.stamp.id => Ok(ChatMessage { seq, ..found }),
            Some(found) => Ok(found),
            None => Err(ChatError::Unavailable(format!(
                "message {} of {room} is published but not readable yet",
                prior.stamp.id
            ))),
        }
    }

    /// A retry whose text differs from its pending first attempt's: it
    /// waits (up to `DELIVER_WAIT`) for that attempt to be published and
    /// answers it, or answers `unavailable` so that the client asks again
    /// later. It never produces its own text under the first attempt's id.
    async fn first_attempt(&self, msg: NewMessage, field: &str) -> Result<ChatMessage, ChatError> {
        let pauses = (Duration::from_millis(100), Duration::from_secs(1));
        let ttl = self.settings.cid_ttl_secs;
        let published = with_backoff(pauses, DELIVER_WAIT, || async {
            let mut conn = self.redis.clone();
            match self
                .scripts
                .recall(&mut conn, &msg.room, field, ttl)
                .await?
            {
                Some(Accept::Published(prior) | Accept::Resequenced(prior)) => Ok(prior),
                _ => Err(ChatError::Unavailable(format!(
                    "an earlier attempt of cid {} with another text is not published yet",
                    msg.cid
                ))),
            }
        })
        .await?;
        self.stored(msg, published).await
    }

    /// Step (3), retried with backoff for up to `wait`: the sender waits
    /// through a short Redis outage for the final seq of a message that is
    /// durable already.
    async fn deliver_within(
        &self,
        message: &ChatMessage,
        wait: Duration,
    ) -> Result<Delivery, ChatError> {
        let pauses = (Duration::from_millis(100), Duration::from_secs(1));
        with_backoff(pauses, wait, || self.deliver(message)).await
    }

    /// Step (2): waits for Kafka's delivery report.
    async fn produce(&self, message: &ChatMessage) -> Result<(), ChatError> {
        self.log.write(message.clone()).await
    }

    /// Makes a message published under a new seq durable under it: on
    /// failure, keeps producing it in the background (with backoff, for the
    /// retry window) and answers the error.
    async fn produce_resequenced(self: &Arc<Self>, message: &ChatMessage) -> Result<(), ChatError> {
        let first = self.produce(message).await;
        if first.is_err() {
            let inner = self.clone();
            let message = message.clone();
            actix::spawn(async move {
                let again = with_backoff(RETRY_PAUSES, DELIVER_RETRY_WINDOW, || {
                    inner.produce(&message)
                });
                if again.await.is_err() {
                    log::error!(
                        "Message {} of {} ({}) was published under seq {} but Kafka never \
                         confirmed it; MongoDB keeps its first seq.",
                        message.id,
                        message.room,
                        message.cid,
                        message.seq
                    );
                }
            });
        }
        first
    }

    /// Step (3) again, with backoff, until it works or the retry window
    /// ends (then MongoDB, which holds the message from the log, answers
    /// history for it).
    async fn deliver_until_done(self: Arc<Self>, mut message: ChatMessage) {
        let delivered = with_backoff(RETRY_PAUSES, DELIVER_RETRY_WINDOW, || {
            self.deliver(&message)
        });
        match delivered.await {
            Ok(Delivery::Published | Delivery::Earlier(_)) => {
                log::info!("Message {} of {} relayed late.", message.seq, message.room);
            }
            Ok(Delivery::Resequenced(seq)) => {
                log::info!(
                    "Message {} of {} relayed late as {seq}.",
                    message.seq,
                    message.room
                );
                message.seq = seq;
                let _ = self.produce_resequenced(&message).await;
            }
            Err(_) => log::warn!(
                "Message {} of {} was never relayed; it is stored from the log.",
                message.seq,
                message.room
            ),
        }
    }

    /// Step (3): cache and publish, once per cid (see `lua/deliver.lua`).
    async fn deliver(&self, message: &ChatMessage) -> Result<Delivery, ChatError> {
        let internal = |e: serde_json::Error| ChatError::Internal(e.to_string());
        let event = RoomEvent::Msg {
            node: self.node_id.clone(),
            m: message.clone(),
        };
        let args = DeliverArgs {
            message,
            message_json: serde_json::to_string(message).map_err(internal)?,
            event_json: serde_json::to_string(&event).map_err(internal)?,
            cache_size: self.settings.cache_size,
            trim_margin: TRIM_MARGIN,
            late_ms: LATE.as_millis() as u64,
            cid_ttl_secs: self.settings.cid_ttl_secs,
            publish: Publish::of(&self.settings),
        };
        let mut conn = self.redis.clone();
        self.scripts.deliver(&mut conn, args).await
    }

    /// Starts a room's seq above everything durable: what MongoDB holds,
    /// what Kafka holds that MongoDB does not yet, and what the cache holds.
    /// Runs for a new room and after Redis lost its data.
    async fn seed_room(&self, room: &str) -> Result<(), ChatError> {
        let lock = {
            let mut map = self
                .seeding
                .lock()
                .map_err(|_| ChatError::Internal("seeding lock poisoned".into()))?;
            map.entry(room.to_string()).or_default().clone()
        };
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.seed_room_once(room).await
        };
        if let Ok(mut map) = self.seeding.lock() {
            // Drop the entry once nobody else waits on it.
            if Arc::strong_count(&lock) <= 2 {
                map.remove(room);
            }
        }
        result
    }

    async fn seed_room_once(&self, room: &str) -> Result<(), ChatError> {
        let mut conn = self.redis.clone();
        let seeded: bool = conn
            .exists(keys::seq(room))
            .await
            .map_err(unavailable("redis"))?;
        if seeded {
            return Ok(()); // by another send while this one waited
        }
        let stored = self.mongo.max_seq(room).await?;
        let cached = self.cache_max(room).await?;
        let tail = self.scan.unpersisted(room).await?;
        let in_log = tail.iter().map(|t| t.stamp.seq).max().unwrap_or(0);
        let floor = stored.max(cached).max(in_log);
        let mut from_mongo = 0;
        if floor > 0 {
            // Redis lost a room that has durable messages: the cids it had
            // accepted must be known again before the seq takes a new one.
            // The newest ones in MongoDB and those still in the log are
            // written back now; if MongoDB holds more within the cids'
            // lifetime, those are looked up as they come while the room
            // recovers.
            let since = crate::protocol::now_ms()
                - i64::try_from(self.settings.cid_ttl_secs.saturating_mul(1000))
                    .unwrap_or(i64::MAX);
            let (stored, complete) = self.mongo.recent_cids(room, since, RECOVERED_CIDS).await?;
            from_mongo = stored.len();
            let known: Vec<&AcceptedCid> = stored.iter().chain(&tail).collect();
            self.remember(room, &known, !complete).await?;
        }
        self.scripts.seed(&mut conn, room, floor).await?;
        let _: () = conn
            .zadd(keys::ROOMS, room, 0)
            .await
            .map_err(unavailable("redis"))?;
        if floor > 0 {
            log::warn!(
                "Room {room} had no seq in Redis; seeded it at {floor}, with {from_mongo} cids from MongoDB and {} from the log.",
                tail.len()
            );
        }
        Ok(())
    }

    /// Writes durable cids back into a room's cid memory, as published
    /// (each is durable, and reaches history), under the highest seq each
    /// was stored or logged with, each in the bucket of its first
    /// acceptance (its ts) unless that bucket has expired; with
    /// `recovering`, also marks the room so that a cid new to Redis is
    /// looked up in MongoDB first.
    ///
    /// A cid the room knows already is left as it is (`HSETNX`): another
    /// node may have seeded the room first and accepted messages that are
    /// in the log but not yet published, and marking one published would
    /// keep it from ever being delivered live.
    async fn remember(
        &self,
        room: &str,
        known: &[&AcceptedCid],
        recovering: bool,
    ) -> Result<(), ChatError> {
        let ttl = self.settings.cid_ttl_secs;
        let mut latest: HashMap<String, &Stamp> = HashMap::with_capacity(known.len());
        for t in known {
            let stamp = latest
                .entry(cid_field(&t.user_id, &t.cid))
                .or_insert(&t.stamp);
            if t.stamp.seq > stamp.seq {
                *stamp = &t.stamp;
            }
        }
        let now = crate::protocol::now_ms();
        let now_secs = u64::try_from(now / 1000).unwrap_or(0);
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        if recovering {
            pipe.set_ex(keys::recovering(room), now, ttl).ignore();
        }
        let mut buckets: HashMap<String, u64> = HashMap::new();
        for (field, stamp) in latest {
            let at_secs = u64::try_from(stamp.ts / 1000).unwrap_or(0);
            let (bucket, expires_at) = keys::cid_bucket_at(room, at_secs, ttl);
            if expires_at <= now_secs {
                continue; // remembered long enough already
            }
            pipe.hset_nx(&bucket, field, published_value(stamp))
                .ignore();
            buckets.insert(bucket, expires_at);
        }
        if buckets.is_empty() && !recovering {
            return Ok(()); // nothing left to remember
        }
        for (bucket, expires_at) in buckets {
            pipe.expire_at(bucket, expires_at as i64).ignore();
        }
        let _: () = pipe
            .query_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        Ok(())
    }

    /// A cid new to a recovering room: the message MongoDB holds for it,
    /// remembered again as published, or, if MongoDB has none, the new
    /// stamp to go on with. If MongoDB cannot answer, the cid is forgotten
    /// again, so that the sender's retry looks once more. Either change is
    /// made where `accept.lua` just wrote the cid: the bucket of `stamp`.
    async fn accepted_before(
        &self,
        msg: &NewMessage,
        field: &str,
        stamp: Stamp,
    ) -> Result<Recovered, ChatError> {
        let mut conn = self.redis.clone();
        let room = msg.room.as_str();
        let at_secs = u64::try_from(stamp.ts / 1000).unwrap_or(0);
        let (bucket, _) = keys::cid_bucket_at(room, at_secs, self.settings.cid_ttl_secs);
        match self.mongo.find_by_cid(room, &msg.user.id, &msg.cid).await {
            Ok(None) => Ok(Recovered::New(stamp)),
            Ok(Some(stored)) => {
                let earlier = Stamp {
                    seq: stored.seq,
                    id: stored.id.clone(),
                    ts: stored.ts,
                };
                let _: () = conn
                    .hset(&bucket, field, published_value(&earlier))
                    .await
                    .map_err(unavailable("redis"))?;
                log::info!(
                    "Room {room}: cid of message {} (seq {}) recognised from MongoDB after Redis lost it.",
                    stored.id,
                    stored.seq
                );
                Ok(Recovered::Stored(stored))
            }
            Err(e) => {
                let forgot: redis::RedisResult<()> = conn.hdel(&bucket, field).await;
                if let Err(forget) = forgot {
                    log::warn!(
                        "Room {room}: a cid could not be forgotten after a failed check: {forget}."
                    );
                }
                Err(e)
            }
        }
    }

    async fn cache_max(&self, room: &str) -> Result<u64, ChatError> {
        let mut conn = self.redis.clone();
        let top: Vec<(String, f64)> = conn
            .zrevrange_withscores(keys::recent(room), 0, 0)
            .await
            .map_err(unavailable("redis"))?;
        Ok(top.first().map_or(0, |(_, s)| *s as u64))
    }

    /// Cached messages with `min <= seq <= max`, ascending, at most `limit`
    /// (from the top when `newest`).
    async fn cached(
        &self,
        room: &str,
        min: u64,
        max: u64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        let mut conn = self.redis.clone();
        let raw: Vec<String> = if newest {
            conn.zrevrangebyscore_limit(keys::recent(room), max, min, 0, limit as isize)
                .await
        } else {
            conn.zrangebyscore_limit(keys::recent(room), min, max, 0, limit as isize)
                .await
        }
        .map_err(unavailable("redis"))?;
        let mut out: Vec<ChatMessage> = raw
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }

    /// The lowest seq in the cache, if any.
    async fn cache_min(&self, room: &str) -> Result<Option<u64>, ChatError> {
        let mut conn = self.redis.clone();
        let low: Vec<(String, f64)> = conn
            .zrange_withscores(keys::recent(room), 0, 0)
            .await
            .map_err(unavailable("redis"))?;
        Ok(low.first().map(|(_, s)| *s as u64))
    }

    async fn after(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        let from = since.saturating_add(1);
        let cached = self
            .cached(room, from, u64::MAX >> 11, limit, false)
            .await?;
        // The cache is a suffix of the room's history: when it starts at or
        // below `from` and has no gap, it alone answers. A gap is a seq that
        // failed, or one not cached yet: MongoDB may hold it.
        let contiguous = cached.windows(2).all(|w| w[1].seq == w[0].seq + 1)
            && cached.first().is_none_or(|m| m.seq == from);
        if contiguous && self.cache_min(room).await?.is_some_and(|low| low <= from) {
            return Ok(cached);
        }
        let stored = self.mongo.after(room, since, limit).await?;
        Ok(merge(stored, cached, limit, false))
    }

    async fn before(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Page, ChatError> {
        let limit = limit as usize;
        let max = before.map_or(u64::MAX >> 11, |b| b.saturating_sub(1));
        if before == Some(0) || max == 0 {
            return Ok(Page::default());
        }
        let cached = self.cached(room, 0, max, limit + 1, true).await?;
        if cached.len() > limit || cached.first().is_some_and(|m| m.seq == 1) {
            let has_more = cached.len() > limit;
            let skip = cached.len().saturating_sub(limit);
            return Ok(Page {
                messages: cached.into_iter().skip(skip).collect(),
                has_more,
            });
        }
        let (stored, stored_more) = self.mongo.before(room, before, limit as u32).await?;
        let merged = merge(stored, cached, limit + 1, true);
        let has_more = merged.len() > limit || stored_more;
        let skip = merged.len().saturating_sub(limit);
        Ok(Page {
            messages: merged.into_iter().skip(skip).collect(),
            has_more,
        })
    }

    /// Refills an empty recent cache from MongoDB (after Redis lost its
    /// data, or for a room that was quiet longer than the cache lived). The
    /// refill lives as long as an idle room's keys.
    async fn warm(&self, room: &str) -> Result<(), ChatError> {
        let mut conn = self.redis.clone();
        let cached: u64 = conn
            .zcard(keys::recent(room))
            .await
            .map_err(unavailable("redis"))?;
        if cached > 0 {
            return Ok(());
        }
        let limit = self.settings.cache_size.min(u32::MAX as usize) as u32;
        let (stored, _) = self.mongo.before(room, None, limit).await?;
        if stored.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for m in &stored {
            let json = serde_json::to_string(m).map_err(|e| ChatError::Internal(e.to_string()))?;
            pipe.zadd(keys::recent(room), json, m.seq).ignore();
        }
        let idle = self.scripts.room_idle_ttl_secs();
        pipe.expire(keys::recent(room), i64::try_from(idle).unwrap_or(i64::MAX))
            .ignore();
        let _: () = pipe
            .query_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        log::info!(
            "Warmed the recent cache of {room} with {} messages.",
            stored.len()
        );
        Ok(())
    }

    async fn last_seq(&self, room: &str) -> Result<u64, ChatError> {
        let cached = self.cache_max(room).await?;
        if cached > 0 {
            return Ok(cached);
        }
        self.mongo.max_seq(room).await
    }

    async fn open_gap(&self, room: &str) -> Result<Option<u64>, ChatError> {
        let mut conn = self.redis.clone();
        let late_ms = LATE.as_millis() as u64;
        self.scripts.open_gap(&mut conn, room, late_ms).await
    }

    /// Up to `limit` names of the room list after `after`, by name: one
    /// `ZRANGEBYLEX` (every score is 0, so the set sorts by name).
    async fn room_names(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ChatError> {
        let mut conn = self.redis.clone();
        let from = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        redis::cmd("ZRANGEBYLEX")
            .arg(keys::ROOMS)
            .arg(from)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("redis"))
    }

    async fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, ChatError> {
        let names = self.room_names(after, limit).await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let last = self.last_seq(&name).await?;
            out.push((name, last));
        }
        Ok(out)
    }

    /// One step of the room list's sweep: copies a page of the earlier
    /// versions' room set while there is one to copy, then looks at the
    /// next page of the list and removes the rooms Redis no longer holds.
    async fn sweep_rooms(&self) -> Result<(), ChatError> {
        self.copy_legacy_rooms().await?;
        let after = self
            .sweep_after
            .lock()
            .map_err(|_| ChatError::Internal("sweep cursor lock poisoned".into()))?
            .clone();
        let names = self.room_names(after.as_deref(), SWEEP_PAGE).await?;
        let next = (names.len() == SWEEP_PAGE)
            .then(|| names.last().cloned())
            .flatten();
        let mut removed = 0;
        for name in &names {
            if self.prune_room(name).await? {
                removed += 1;
            }
        }
        if removed > 0 {
            log::info!("Removed {removed} rooms gone from Redis from the room list.");
        }
        if let Ok(mut cursor) = self.sweep_after.lock() {
            *cursor = next;
        }
        Ok(())
    }

    /// Removes `room` from the list if its `seq` is gone (its keys expired
    /// after `redis.room_idle_ttl_secs`, or Redis lost them) and it has no
    /// member on any node. A seeding between the look and the removal
    /// writes the `seq` first, so a `seq` found afterwards puts the name
    /// back. A room whose name goes is listed again when it is seeded
    /// again. Answers whether the name went.
    async fn prune_room(&self, room: &str) -> Result<bool, ChatError> {
        let mut conn = self.redis.clone();
        // One pipeline: both keys are in the room's slot.
        let (seeded, members): (bool, u64) = redis::pipe()
            .exists(keys::seq(room))
            .hlen(keys::members(room))
            .query_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        if seeded || members > 0 {
            return Ok(false);
        }
        let _: () = conn
            .zrem(keys::ROOMS, room)
            .await
            .map_err(unavailable("redis"))?;
        let seeded: bool = conn
            .exists(keys::seq(room))
            .await
            .map_err(unavailable("redis"))?;
        if seeded {
            let _: () = conn
                .zadd(keys::ROOMS, room, 0)
                .await
                .map_err(unavailable("redis"))?;
        }
        Ok(!seeded)
    }

    /// One `SSCAN` page of the room set earlier versions wrote
    /// (`keys::LEGACY_ROOMS`), added to the list, so that a rolling upgrade
    /// lists every room; once per run of the node. Nothing writes that set
    /// any more.
    async fn copy_legacy_rooms(&self) -> Result<(), ChatError> {
        let Some(cursor) = *self
            .legacy_cursor
            .lock()
            .map_err(|_| ChatError::Internal("legacy cursor lock poisoned".into()))?
        else {
            return Ok(());
        };
        let mut conn = self.redis.clone();
        let (next, names): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(keys::LEGACY_ROOMS)
            .arg(cursor)
            .arg("COUNT")
            .arg(LEGACY_PAGE)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        if !names.is_empty() {
            let members: Vec<(u8, &String)> = names.iter().map(|n| (0, n)).collect();
            let _: () = conn
                .zadd_multiple(keys::ROOMS, &members)
                .await
                .map_err(unavailable("redis"))?;
        }
        if let Ok(mut c) = self.legacy_cursor.lock() {
            *c = (next != 0).then_some(next);
        }
        Ok(())
    }

    async fn check(&self) -> Vec<DependencyStatus> {
        let mut conn = self.redis.clone();
        let redis: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        let kafka = self.log.check().await;
        let mongo = self.mongo.ping().await;

        vec![
            DependencyStatus {
                name: "redis",
                error: redis.err().map(|e| e.to_string()),
            },
            DependencyStatus {
                name: "kafka",
                error: kafka.err().map(|e| e.detail()),
            },
            DependencyStatus {
                name: "mongo",
                error: mongo.err().map(|e| e.detail()),
            },
        ]
    }
}

/// Runs `attempt` until it succeeds or `window` would pass before the next
/// try, pausing between tries from `pauses.0`, doubling up to `pauses.1`.
/// Answers the last outcome.
async fn with_backoff<T, Fut>(
    pauses: (Duration, Duration),
    window: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, ChatError>
where
    Fut: std::future::Future<Output = Result<T, ChatError>>,
{
    let started = std::time::Instant::now();
    let mut pause = pauses.0;
    loop {
        match attempt().await {
            Err(e) if started.elapsed() + pause < window => {
                log::debug!("Retrying in {pause:?} after: {e:?}.");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(pauses.1);
            }
            done => return done,
        }
    }
}

/// What a recovering room's MongoDB says of a cid new to Redis.
enum Recovered {
    /// Stored already, as this message.
    Stored(ChatMessage),
    /// Not stored: a new message after all.
    New(Stamp),
}

/// The message an accepted cid stands for.
fn message_of(msg: NewMessage, stamp: Stamp) -> ChatMessage {
    ChatMessage {
        room: msg.room,
        seq: stamp.seq,
        id: stamp.id,
        user: msg.user,
        text: msg.text,
        ts: stamp.ts,
        cid: msg.cid,
    }
}

/// Joins two ascending lists by seq, dropping duplicates, and keeps
/// `limit` of them: the lowest, or the highest when `newest`. A message
/// found under two seqs (published late under a new one while MongoDB
/// still has its first) is kept under the higher.
fn merge(a: Vec<ChatMessage>, b: Vec<ChatMessage>, limit: usize, newest: bool) -> Vec<ChatMessage> {
    let mut all: Vec<ChatMessage> = a.into_iter().chain(b).collect();
    all.sort_by(|x, y| x.id.cmp(&y.id).then(y.seq.cmp(&x.seq)));
    all.dedup_by(|m, kept| m.id == kept.id);
    all.sort_by_key(|m| m.seq);
    all.dedup_by_key(|m| m.seq);
    if newest {
        let skip = all.len().saturating_sub(limit);
        all.into_iter().skip(skip).collect()
    } else {
        all.truncate(limit);
        all
    }
}

impl MessageStore for ClusterStore {
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, Result<Accepted, ChatError>> {
        let inner = self.inner.clone();
        async move { inner.append(msg).await }.boxed()
    }

    fn after(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ChatError>> {
        let inner = self.inner.clone();
        let room = room.to_string();
        async move { inner.after(&room, since, limit).await }.boxed()
    }

    fn before(
        &self,
        room: &str,
        before: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'static, Result<Page, ChatError>> {
        let inner = self.inner.clone();
        let room = room.to_string();
        async move { inner.before(&room, before, limit).await }.boxed()
    }

    fn last_seq(&self, room: &str) -> BoxFuture<'static, Result<u64, ChatError>> {
        let inner = self.inner.clone();
        let room = room.to_string();
        async move { inner.last_seq(&room).await }.boxed()
    }

    fn open_gap(&self, room: &str) -> BoxFuture<'static, Result<Option<u64>, ChatError>> {
        let inner = self.inner.clone();
        let room = room.to_string();
        async move { inner.open_gap(&room).await }.boxed()
    }

    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, ChatError>> {
        let inner = self.inner.clone();
        let after = after.map(str::to_string);
        async move { inner.rooms(after.as_deref(), limit).await }.boxed()
    }

    fn sweep_rooms(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        async move {
            if inner.sweeping.swap(true, Relaxed) {
                return;
            }
            if let Err(e) = inner.sweep_rooms().await {
                log::warn!("Sweeping the room list failed: {e:?}.");
            }
            inner.sweeping.store(false, Relaxed);
        }
        .boxed()
    }

    fn check(&self) -> BoxFuture<'static, Vec<DependencyStatus>> {
        let inner = self.inner.clone();
        async move { inner.check().await }.boxed()
    }

    fn warm(&self, room: &str) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        let room = room.to_string();
        async move {
            if let Err(e) = inner.warm(&room).await {
                log::warn!("Warming the cache of {room} failed: {e:?}.");
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        self.inner.log.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64) -> ChatMessage {
        ChatMessage::sample(seq)
    }

    #[test]
    fn merge_dedups_and_keeps_the_right_end() {
        let a = vec![m(1), m(2), m(3)];
        let b = vec![m(3), m(4)];
        let seqs = |v: Vec<ChatMessage>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(merge(a.clone(), b.clone(), 10, false)),
            vec![1, 2, 3, 4]
        );
        assert_eq!(seqs(merge(a.clone(), b.clone(), 2, false)), vec![1, 2]);
        assert_eq!(seqs(merge(a, b, 2, true)), vec![3, 4]);
    }

    #[tokio::test]
    async fn with_backoff_stops_at_success_or_at_the_window() {
        let pauses = (Duration::from_millis(5), Duration::from_millis(20));
        let tries = std::cell::Cell::new(0);
        let ok = with_backoff(pauses, Duration::from_secs(5), || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move {
                if n < 3 {
                    Err(ChatError::Unavailable("not yet".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(ok.ok(), Some(3));

        tries.set(0);
        let failing = with_backoff(pauses, Duration::from_millis(100), || {
            tries.set(tries.get() + 1);
            async { Err::<(), _>(ChatError::Unavailable("down".into())) }
        });
        // Only a guard against retrying for ever: 50 times the window.
        let failed = tokio::time::timeout(Duration::from_secs(5), failing).await;
        assert!(matches!(failed, Ok(Err(_))), "{failed:?}");
        // Pauses of 5, 10, 20, 20, 20 ms fit in 100 ms and a sixth would
        // not, and a sleep never runs short: at most six tries (fewer when
        // the machine is slow).
        assert!((1..=6).contains(&tries.get()), "{} tries", tries.get());
    }

    #[test]
    fn merge_keeps_a_message_under_its_highest_seq() {
        let first = m(2);
        let mut moved = m(5);
        moved.id = first.id.clone();
        let seqs = |v: Vec<ChatMessage>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(merge(
                vec![m(1), first.clone(), m(3)],
                vec![m(4), moved.clone()],
                10,
                false
            )),
            vec![1, 3, 4, 5]
        );
        assert_eq!(seqs(merge(vec![moved], vec![first], 10, true)), vec![5]);
    }
}
