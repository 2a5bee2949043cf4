-- Raises a room's seq to at least a floor; it never goes down. The seq
-- lives as long as an idle room's keys, like every write of a message.
--
-- KEYS[1]  the room's seq        (keys::seq)
-- ARGV[1]  the floor: the highest seq known to be durable
-- ARGV[2]  how long an idle room's keys live (s)
--
-- Reply: the room's seq after the call.

local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', KEYS[1], floor, 'EX', ARGV[2])
  return floor
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return current
