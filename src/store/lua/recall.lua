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

local prior = remembered(1, ARGV[1])
if prior then
  return {state_of(prior)}
end
return {'forgotten'}
