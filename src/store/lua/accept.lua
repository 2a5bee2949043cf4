-- Accepts a message into its room: finds an earlier attempt of the same
-- cid, or gives the message the room's next seq and remembers the cid.
--
-- KEYS[1]  the room's seq                       (keys::seq)
-- KEYS[2]  set while the room's cid memory may lack cids accepted before
--          Redis lost the room                    (keys::recovering)
-- KEYS[3]  the cid bucket of this moment, where a new cid goes
--          (keys::cid_bucket_at)
-- KEYS[4…] every other place the cid may be remembered: the other live
--          buckets (keys::live_cid_buckets) and the hash of older nodes
--          (keys::cids)
-- ARGV[1]  the cid's field, `<user id>:<cid>`
-- ARGV[2]  the new message's id
-- ARGV[3]  the new message's ts (ms since the epoch)
-- ARGV[4]  the digest of the new message's text (scripts::text_digest)
-- ARGV[5]  when the bucket KEYS[3] expires (s since the epoch)
-- ARGV[6]  how long an idle room's keys live (s)
--
-- A cid's value is `<seq> <id> <ts> <digest>` (older nodes wrote no
-- digest), followed by ` d` once an attempt was published, or ` r` once it
-- was published under a new seq (the value's). A new message pushes the
-- expiry of the room's seq; its bucket expires on its own schedule.
--
-- Reply, decoded by `scripts::Accept`:
--   {'new', stamp}          a new message, with its `<seq> <id> <ts>`
--   {'unverified', stamp}   the same, in a room that is recovering: the cid
--                           may be one accepted before the loss
--   {'pending', prior}      a repeated cid, no attempt published yet, with
--                           what is remembered of it (`<seq> <id> <ts>`
--                           and, if known, the digest)
--   {'published', prior}    a repeated cid, published under its own seq
--   {'resequenced', prior}  a repeated cid, published under a new seq
--   {'unseeded'}            the room has no seq: seed it first (a new
--                           room, a room idle long enough to leave Redis,
--                           or Redis lost its data)

local prior = remembered(3, ARGV[1])
if prior then
  return {state_of(prior)}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unseeded'}
end
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local value = seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[3], ARGV[1], value .. ' ' .. ARGV[4])
redis.call('EXPIREAT', KEYS[3], ARGV[5])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'unverified', value}
end
return {'new', value}
