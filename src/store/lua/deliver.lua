-- Caches a durable message and publishes it on its room's channel, once
-- per cid.
--
-- KEYS[1]  the room's recent-history cache, a sorted set of message JSON
--          scored by seq                                   (keys::recent)
-- KEYS[2]  the highest seq MongoDB holds                   (keys::persisted)
-- KEYS[3]  the room's seq                                  (keys::seq)
-- KEYS[4]  the room's recently published seqs, a sorted set of
--          `<seq>:<ms since the epoch>` scored by seq      (keys::published)
-- KEYS[5]  the cid bucket of the message's ts, where its cid goes if no
--          other place remembers it                  (keys::cid_bucket_at)
-- KEYS[6…] every other place the cid may be remembered: the other live
--          buckets (keys::live_cid_buckets) and the hash of older nodes
--          (keys::cids)
-- ARGV[1]  the message's seq
-- ARGV[2]  the message as JSON (cached)
-- ARGV[3]  the channel event carrying it, as JSON (published)
-- ARGV[4]  the cache's size, in messages
-- ARGV[5]  the room's channel                              (keys::channel)
-- ARGV[6]  the trim margin: seqs below the persisted one still kept
-- ARGV[7]  the cid's field, `<user id>:<cid>`
-- ARGV[8]  the message's id
-- ARGV[9]  the message's ts
-- ARGV[10] late: how long ago a higher seq may have been published for
--          this one to still go out under its own seq (ms)
-- ARGV[11] when the bucket KEYS[5] expires (s since the epoch)
-- ARGV[12] the publish command: PUBLISH on one server, SPUBLISH on a
--          cluster (the channel is in the room's slot, so the shard that
--          runs the script is the one that carries it)
-- ARGV[13] the digest of the message's text (scripts::text_digest)
-- ARGV[14] how long an idle room's keys live (s)
--
-- - An attempt of a cid that was published already publishes nothing. If
--   it went out under a new seq, the reply says so: the attempt that
--   published it may never have heard back (its reply lost to a timeout
--   while the script ran), and the new seq is durable only once produced.
-- - A message is late when a higher seq was published `late` ms ago or
--   more (or has left the published window): the rooms have stopped
--   waiting for it and would skip it. It is published under the room's
--   next seq instead, and the caller makes it durable under that seq.
-- - The cache is trimmed to its size, but never within the margin of the
--   highest seq MongoDB holds: seqs reach Kafka slightly out of order
--   across nodes, so a lower seq may still be on its way to MongoDB.
-- - A cid's marks are written where the cid was found (its bucket, or the
--   hash of older nodes), so that it expires with its first acceptance.
-- - A published message pushes the expiry of the cache by the idle time,
--   and of the published window by 10 minutes at most (the idle time if
--   shorter). The seq's is pushed by accept.lua, the persisted
--   watermark's by raise_watermark.lua.
--
-- Reply, decoded by `scripts::Delivery`:
--   {'published', seq}    published under its own seq
--   {'earlier', seq}      another attempt of its cid went out, under seq
--   {'resequenced', seq}  it came late and went out under this new seq (by
--                         this attempt or an earlier one)

local seq = tonumber(ARGV[1])
local prior, place = remembered(5, ARGV[7])
if prior then
  local state, value = state_of(prior)
  if state == 'published' then
    return {'earlier', tonumber(string.match(value, '^%d+'))}
  elseif state == 'resequenced' then
    return {'resequenced', tonumber(string.match(value, '^%d+'))}
  end
end
local function remember(value)
  if place then
    redis.call('HSET', place, ARGV[7], value)
  else
    redis.call('HSET', KEYS[5], ARGV[7], value)
    redis.call('EXPIREAT', KEYS[5], ARGV[11])
  end
end
local tail = ' ' .. ARGV[8] .. ' ' .. ARGV[9] .. ' ' .. ARGV[13]
if #redis.call('ZRANGEBYSCORE', KEYS[1], seq, seq, 'LIMIT', 0, 1) > 0 then
  remember(seq .. tail .. ' d')
  return {'earlier', seq}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local keep = 256
local late = false
local above = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. seq, '+inf', 'LIMIT', 0, 1)
if #above > 0 then
  local at = tonumber(string.match(above[1], ':(%d+)$') or '0')
  late = now - at >= tonumber(ARGV[10])
  if not late and redis.call('ZCARD', KEYS[4]) >= keep then
    local low = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
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
redis.call(ARGV[12], ARGV[5], event)
redis.call('ZADD', KEYS[4], final, final .. ':' .. now)
local published = redis.call('ZCARD', KEYS[4])
if published > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, published - keep - 1)
end
local idle = tonumber(ARGV[14])
redis.call('EXPIRE', KEYS[4], math.min(600, idle))
redis.call('EXPIRE', KEYS[1], idle)
local mark = ' d'
if final ~= seq then
  mark = ' r'
end
remember(final .. tail .. mark)
local n = redis.call('ZCARD', KEYS[1])
local size = tonumber(ARGV[4])
if n > size then
  local persisted = tonumber(redis.call('GET', KEYS[2]) or '0')
  local edge = redis.call('ZRANGE', KEYS[1], n - size - 1, n - size - 1, 'WITHSCORES')
  local cutoff = math.min(persisted - tonumber(ARGV[6]), tonumber(edge[2]))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
end
if final ~= seq then
  return {'resequenced', final}
end
return {'published', final}
