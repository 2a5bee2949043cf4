-- Accepts a message into its room: finds an earlier attempt of the same
-- cid, or gives the message the room's next seq and remembers the cid.
--
-- KEYS[1]  the room's seq                       (keys::seq)
-- KEYS[2]  the room's accepted cids, a hash     (keys::cids)
-- KEYS[3]  set while the room's cid memory may lack cids accepted before
--          Redis lost the room                    (keys::recovering)
-- ARGV[1]  the cid's field, `<user id>:<cid>`
-- ARGV[2]  the new message's id
-- ARGV[3]  the new message's ts (ms since the epoch)
-- ARGV[4]  how long the room remembers its cids (s)
--
-- A cid's value in KEYS[2] is `<seq> <id> <ts>`, followed by ` d` once an
-- attempt was published, or ` r` once it was published under a new seq
-- (the value's).
--
-- Reply, decoded by `scripts::Accept`:
--   {'new', stamp}          a new message, with its `<seq> <id> <ts>`
--   {'unverified', stamp}   the same, in a room that is recovering: the cid
--                           may be one accepted before the loss
--   {'pending', stamp}      a repeated cid, no attempt published yet
--   {'published', stamp}    a repeated cid, published under its own seq
--   {'resequenced', stamp}  a repeated cid, published under a new seq
--   {'unseeded'}            the room has no seq: seed it first (a new
--                           room, or Redis lost its data)

local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  local mark = string.sub(prior, -2)
  if mark == ' d' then
    return {'published', string.sub(prior, 1, -3)}
  elseif mark == ' r' then
    return {'resequenced', string.sub(prior, 1, -3)}
  end
  return {'pending', prior}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unseeded'}
end
local seq = redis.call('INCR', KEYS[1])
local value = seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[2], ARGV[1], value)
redis.call('EXPIRE', KEYS[2], ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'unverified', value}
end
return {'new', value}
