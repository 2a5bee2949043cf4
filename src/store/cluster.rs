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
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::mongo::MongoStore;
use super::{keys, Accepted, DependencyStatus, MessageStore, NewMessage, Page};
use crate::actors::kafka_sink::{CheckKafka, FlushKafka, KafkaSink, Produce, UnpersistedMaxSeq};
use crate::actors::redis_bridge::Event;
use crate::config::RedisSettings;
use crate::error::ChatError;
use crate::protocol::ChatMessage;

/// Accepts a message: KEYS seq, cids; ARGV field (`user:cid`), id, ts, ttl.
/// Returns `{1, "seq id ts"}` for a new message; for a repeated cid
/// `{0, "seq id ts"}` while no attempt was published yet, `{2, …}` once
/// one was and `{3, …}` once one was published under a new seq (the one
/// returned); `{-1, ""}` when the room's seq is missing and must be seeded
/// first (a new room, or Redis lost its data).
const ACCEPT: &str = r"
local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  local mark = string.sub(prior, -2)
  if mark == ' d' then
    return {2, string.sub(prior, 1, -3)}
  elseif mark == ' r' then
    return {3, string.sub(prior, 1, -3)}
  end
  return {0, prior}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1, ''}
end
local seq = redis.call('INCR', KEYS[1])
local value = seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[2], ARGV[1], value)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, value}
";

/// Sets a room's seq to at least ARGV[1]: KEYS seq. It never goes down.
const SEED: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
";

/// Caches and publishes a durable message, once per cid: KEYS recent,
/// persisted, seq, cids, published; ARGV seq, message JSON, event JSON,
/// cache size, channel, margin, cid field, id, ts, late (ms), cid ttl.
///
/// - An attempt of a cid that was published already publishes nothing and
///   returns `{0, "seq id ts"}` of the published one.
/// - A message is late when a higher seq was published `late` ms ago or
///   more: the rooms have stopped waiting for it and would skip it. It is
///   published under the room's next seq instead, and `{2, "seq"}` returns
///   that seq (the caller makes it durable). Otherwise `{1, "seq"}`.
///
/// Trims the cache to its size, but never within `margin` of the highest
/// seq MongoDB is known to hold: seqs reach Kafka slightly out of order
/// across nodes, so a lower seq may still be on its way to MongoDB.
const DELIVER: &str = r#"
local seq = tonumber(ARGV[1])
local prior = redis.call('HGET', KEYS[4], ARGV[7])
if prior then
  local mark = string.sub(prior, -2)
  if mark == ' d' or mark == ' r' then
    return {0, string.sub(prior, 1, -3)}
  end
end
local tail = ' ' .. ARGV[8] .. ' ' .. ARGV[9]
if #redis.call('ZRANGEBYSCORE', KEYS[1], seq, seq, 'LIMIT', 0, 1) > 0 then
  redis.call('HSET', KEYS[4], ARGV[7], seq .. tail .. ' d')
  return {0, seq .. tail}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local keep = 256
local late = false
local above = redis.call('ZRANGEBYSCORE', KEYS[5], '(' .. seq, '+inf', 'LIMIT', 0, 1)
if #above > 0 then
  local at = tonumber(string.match(above[1], ':(%d+)$') or '0')
  late = now - at >= tonumber(ARGV[10])
  if not late and redis.call('ZCARD', KEYS[5]) >= keep then
    local low = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    late = seq < tonumber(low[2])
  end
end
local final = seq
local message, event = ARGV[2], ARGV[3]
if late and redis.call('EXISTS', KEYS[3]) == 1 then
  final = redis.call('INCR', KEYS[3])
  local function with_seq(json)
    local key = '"seq":' .. seq
    local i, j = string.find(json, key, 1, true)
    if not i then
      return nil
    end
    return string.sub(json, 1, i - 1) .. '"seq":' .. final .. string.sub(json, j + 1)
  end
  message, event = with_seq(message), with_seq(event)
  if not message or not event then
    return redis.error_reply('DELIVER: the message has no seq ' .. seq)
  end
end
redis.call('ZADD', KEYS[1], final, message)
redis.call('PUBLISH', ARGV[5], event)
redis.call('ZADD', KEYS[5], final, final .. ':' .. now)
local published = redis.call('ZCARD', KEYS[5])
if published > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, published - keep - 1)
end
redis.call('EXPIRE', KEYS[5], 600)
local mark = ' d'
if final ~= seq then
  mark = ' r'
end
redis.call('HSET', KEYS[4], ARGV[7], final .. tail .. mark)
redis.call('EXPIRE', KEYS[4], ARGV[11])
local n = redis.call('ZCARD', KEYS[1])
local size = tonumber(ARGV[4])
if n > size then
  local persisted = tonumber(redis.call('GET', KEYS[2]) or '0')
  local edge = redis.call('ZRANGE', KEYS[1], n - size - 1, n - size - 1, 'WITHSCORES')
  local cutoff = math.min(persisted - tonumber(ARGV[6]), tonumber(edge[2]))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
end
if final ~= seq then
  return {2, tostring(final)}
end
return {1, tostring(final)}
"#;

/// Finds the first seq missing among the recently published ones whose next
/// higher one went out less than `late` ms ago (so it may still come and be
/// published under its own seq): KEYS published; ARGV late (ms). Returns
/// the seq published below it, or -1 when there is no such gap.
const OPEN_GAP: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local prev = nil
for i = 1, #entries, 2 do
  local seq = tonumber(entries[i + 1])
  if prev and seq > prev + 1 then
    local at = tonumber(string.match(entries[i], ':(%d+)$') or '0')
    if now - at < tonumber(ARGV[1]) then
      return prev
    end
  end
  prev = seq
end
return -1
";

/// How late a message may be published under its own seq: well inside the
/// rooms' hold-back, so every room that waited for it still does.
const LATE: Duration = Duration::from_millis(500);
const _: () = assert!(2 * LATE.as_millis() <= crate::actors::room::HOLD_BACK.as_millis());

/// How long a sender waits for the publish of its durable message while
/// Redis does not answer, before it hears `unavailable`.
const DELIVER_WAIT: Duration = Duration::from_secs(6);

/// The first and the longest pause between two background retries.
const RETRY_PAUSES: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));

/// How long a message that could not be cached and published keeps trying.
const DELIVER_RETRY_WINDOW: Duration = Duration::from_secs(120);

/// Seqs below MongoDB's watermark that the cache still keeps (see DELIVER).
const TRIM_MARGIN: u64 = 100;

struct Inner {
    redis: ConnectionManager,
    sink: Addr<KafkaSink>,
    mongo: Arc<MongoStore>,
    settings: RedisSettings,
    node_id: String,
    accept: Script,
    seed: Script,
    deliver: Script,
    open_gap: Script,
    /// One seeding at a time per room on this node: the first sends of a
    /// new room all find it unseeded, and one look at the durable tail is
    /// enough for all of them.
    seeding: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
        redis: ConnectionManager,
        sink: Addr<KafkaSink>,
        mongo: Arc<MongoStore>,
        settings: RedisSettings,
        node_id: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                sink,
                mongo,
                settings,
                node_id,
                accept: Script::new(ACCEPT),
                seed: Script::new(SEED),
                deliver: Script::new(DELIVER),
                open_gap: Script::new(OPEN_GAP),
                seeding: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Inner {
    /// Steps (1) to (3) of an append.
    async fn append(self: Arc<Self>, msg: NewMessage) -> Result<Accepted, ChatError> {
        let mut conn = self.redis.clone();
        let field = format!("{}:{}", msg.user.id, msg.cid);
        let id = ulid::Ulid::new().to_string();
        let ts = crate::protocol::now_ms();
        let mut seeded = false;
        let (status, value) = loop {
            let (status, value): (i64, String) = self
                .accept
                .key(keys::seq(&msg.room))
                .key(keys::cids(&msg.room))
                .arg(&field)
                .arg(&id)
                .arg(ts)
                .arg(self.settings.cid_ttl_secs)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable("redis"))?;
            if status >= 0 || seeded {
                break (status, value);
            }
            self.seed_room(&msg.room).await?;
            seeded = true;
        };
        let mut parts = value.splitn(3, ' ');
        let (Some(seq), Some(id), Some(ts)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ChatError::Internal(format!("bad accept answer `{value}`")));
        };
        let mut message = ChatMessage {
            room: msg.room,
            seq: parse_seq(seq)?,
            id: id.to_string(),
            user: msg.user,
            text: msg.text,
            ts: ts
                .parse()
                .map_err(|_| ChatError::Internal(format!("bad ts `{ts}`")))?,
            cid: msg.cid,
        };
        match status {
            // A repeated cid that was published: it is durable and the
            // answer is its id and seq. One published under a new seq is
            // produced once more: the attempt that did so may have ended
            // before Kafka confirmed the new seq.
            2 => return Ok(Accepted::earlier(message)),
            3 => {
                self.produce(&message).await?;
                return Ok(Accepted::earlier(message));
            }
            _ => {}
        }
        // New, or a repeated cid none of whose attempts was published yet
        // (one may still be on its way, have failed, or its node died): it
        // is produced with the first attempt's id and seq. MongoDB keeps
        // one document per id, and the deliver script publishes a cid once.
        self.produce(&message).await?;
        match self.deliver_within(&message, DELIVER_WAIT).await {
            Ok(Delivery::Published) => Ok(Accepted {
                message,
                duplicate: status == 0,
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
                    duplicate: status == 0,
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
        self.sink
            .send(Produce {
                message: message.clone(),
            })
            .await
            .map_err(|_| ChatError::Unavailable("kafka sink stopped".into()))?
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

    /// Step (3): cache and publish, once per cid (see [`DELIVER`]).
    async fn deliver(&self, message: &ChatMessage) -> Result<Delivery, ChatError> {
        let json =
            serde_json::to_string(message).map_err(|e| ChatError::Internal(e.to_string()))?;
        let event = serde_json::to_string(&Event::Msg {
            node: self.node_id.clone(),
            m: message.clone(),
        })
        .map_err(|e| ChatError::Internal(e.to_string()))?;
        let mut conn = self.redis.clone();
        let (status, value): (i64, String) = self
            .deliver
            .key(keys::recent(&message.room))
            .key(keys::persisted(&message.room))
            .key(keys::seq(&message.room))
            .key(keys::cids(&message.room))
            .key(keys::published(&message.room))
            .arg(message.seq)
            .arg(json)
            .arg(event)
            .arg(self.settings.cache_size)
            .arg(keys::channel(&message.room))
            .arg(TRIM_MARGIN)
            .arg(format!("{}:{}", message.user.id, message.cid))
            .arg(&message.id)
            .arg(message.ts)
            .arg(LATE.as_millis() as u64)
            .arg(self.settings.cid_ttl_secs)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        let seq = parse_seq(value.split(' ').next().unwrap_or_default())?;
        Ok(match status {
            0 => Delivery::Earlier(seq),
            2 => Delivery::Resequenced(seq),
            _ if seq == message.seq => Delivery::Published,
            _ => return Err(ChatError::Internal(format!("bad deliver answer `{value}`"))),
        })
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
        let in_log = self
            .sink
            .send(UnpersistedMaxSeq {
                room: room.to_string(),
            })
            .await
            .map_err(|_| ChatError::Unavailable("kafka sink stopped".into()))??;
        let floor = stored.max(cached).max(in_log);
        let _: i64 = self
            .seed
            .key(keys::seq(room))
            .arg(floor)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        let _: () = conn
            .sadd(keys::ROOMS, room)
            .await
            .map_err(unavailable("redis"))?;
        if floor > 0 {
            log::warn!("Room {room} had no seq in Redis; seeded it at {floor}.");
        }
        Ok(())
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
    /// data, or for a room that was quiet longer than the cache lived).
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
        let below: i64 = self
            .open_gap
            .key(keys::published(room))
            .arg(LATE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable("redis"))?;
        Ok(u64::try_from(below).ok())
    }

    async fn rooms(&self) -> Result<Vec<(String, u64)>, ChatError> {
        let mut conn = self.redis.clone();
        let names: Vec<String> = conn
            .smembers(keys::ROOMS)
            .await
            .map_err(unavailable("redis"))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let last = self.last_seq(&name).await?;
            out.push((name, last));
        }
        Ok(out)
    }

    async fn check(&self) -> Vec<DependencyStatus> {
        let mut conn = self.redis.clone();
        let redis: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        let kafka = match self.sink.send(CheckKafka).await {
            Ok(r) => r,
            Err(_) => Err(ChatError::Unavailable("kafka sink stopped".into())),
        };
        let mongo = self.mongo.ping().await;
        let text = |e: ChatError| match e {
            ChatError::Unavailable(m) | ChatError::Internal(m) => m,
            other => other.to_string(),
        };
        vec![
            DependencyStatus {
                name: "redis",
                error: redis.err().map(|e| e.to_string()),
            },
            DependencyStatus {
                name: "kafka",
                error: kafka.err().map(text),
            },
            DependencyStatus {
                name: "mongo",
                error: mongo.err().map(text),
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

/// What the deliver script did with a message.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Published under its seq.
    Published,
    /// Another attempt of its cid was published, under this seq.
    Earlier(u64),
    /// It came late and was published under this new seq.
    Resequenced(u64),
}

fn parse_seq(text: &str) -> Result<u64, ChatError> {
    text.parse()
        .map_err(|_| ChatError::Internal(format!("bad seq `{text}`")))
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

    fn rooms(&self) -> BoxFuture<'static, Result<Vec<(String, u64)>, ChatError>> {
        let inner = self.inner.clone();
        async move { inner.rooms().await }.boxed()
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
        let sink = self.inner.sink.clone();
        async move {
            let _ = sink.send(FlushKafka).await;
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::User;

    fn m(seq: u64) -> ChatMessage {
        ChatMessage {
            room: "r".into(),
            seq,
            id: format!("id{seq}"),
            user: User {
                id: "u".into(),
                name: "n".into(),
            },
            text: "t".into(),
            ts: 0,
            cid: format!("c{seq}"),
        }
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
