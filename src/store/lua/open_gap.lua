-- Finds the first seq missing among the recently published ones whose
-- next higher one went out less than `late` ms ago: such a seq may still
-- come and be published under its own seq, so a room that starts
-- delivering now must start below it.
--
-- KEYS[1]  the room's recently published seqs, a sorted set of
--          `<seq>:<ms since the epoch>` scored by seq   (keys::published)
-- ARGV[1]  late: how long a missing seq may still come (ms)
--
-- Reply: the seq published just below the gap, or nil when there is none.

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
return false
