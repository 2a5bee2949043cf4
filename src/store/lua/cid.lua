-- Where a room remembers its cids: put before accept.lua, recall.lua and
-- deliver.lua (scripts.rs joins them), so that the three read a cid alike.
--
-- A cid's value is `<seq> <id> <ts>[ <digest>]`, followed by ` d` once an
-- attempt was published, or ` r` once it was published under a new seq
-- (the value's).

-- The first of KEYS[first], KEYS[first + 1]… that remembers the cid field
-- `field`: what it holds there, and that key; nil when none does.
local function remembered(first, field)
  for i = first, #KEYS do
    local prior = redis.call('HGET', KEYS[i], field)
    if prior then
      return prior, KEYS[i]
    end
  end
  return nil, nil
end

-- What a remembered value says of its cid: 'published', 'resequenced' or
-- 'pending', and the value without its mark.
local function state_of(prior)
  local mark = string.sub(prior, -2)
  if mark == ' d' then
    return 'published', string.sub(prior, 1, -3)
  elseif mark == ' r' then
    return 'resequenced', string.sub(prior, 1, -3)
  end
  return 'pending', prior
end
