-- Raises a room's persisted watermark, the highest seq MongoDB is known to
-- hold, unless it is already higher. Two persist workers may store the
-- same room around a rebalance, so the check and the write are one step.
-- A stored batch counts as activity: the watermark then lives as long as
-- an idle room's keys.
--
-- KEYS[1]  the room's persisted watermark   (keys::persisted)
-- ARGV[1]  the highest seq of the room in a batch just stored
-- ARGV[2]  how long an idle room's keys live (s)
--
-- Reply: the watermark after the call.

local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local seq = tonumber(ARGV[1])
if seq > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return seq
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return current
