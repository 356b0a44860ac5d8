-- purge: KEYS[1] the record. Deletes it if it stopped counting; replies 1 deleted, 0 kept.
-- Checked here, atomically, because a claim may have renewed the record since the caller
-- looked at it.
local key = KEYS[1]
local blob = redis.call('GET', key)
if not blob then
  return 0
end
local s, _, _, _, e = decode(blob)
if not s then
  return corrupt(key)
end
if clock() >= e then
  redis.call('DEL', key)
  return 1
end
return 0
