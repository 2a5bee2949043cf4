-- Reads what a room remembers of a cid, changing nothing: how a retry
-- waits for its first attempt to be published.
--
-- KEYS[1]… every place the cid may be remembered: the live cid buckets
--          (keys::live_cid_buckets) and the hash of older nodes
--          (keys::cids)
-- ARGV[1]  the cid's field, `<user id>:<cid>`
--
-- Reply, decoded by `scripts::Accept` (as in accept.lua):
--   {'pending', prior}      no attempt published yet
--   {'published', prior}    published under its own seq
--   {'resequenced', prior}  published under a new seq
--   {'forgotten'}           the room does not remember the cid

for i = 1, #KEYS do
  local prior = redis.call('HGET', KEYS[i], ARGV[1])
  if prior then
    local mark = string.sub(prior, -2)
    if mark == ' d' then
      return {'published', string.sub(prior, 1, -3)}
    elseif mark == ' r' then
      return {'resequenced', string.sub(prior, 1, -3)}
    end
    return {'pending', prior}
  end
end
return {'forgotten'}
