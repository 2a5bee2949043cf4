-- Raises a room's seq to at least a floor; it never goes down.
--
-- KEYS[1]  the room's seq        (keys::seq)
-- ARGV[1]  the floor: the highest seq known to be durable
--
-- Reply: the room's seq after the call.

local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
