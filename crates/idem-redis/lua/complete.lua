-- complete: KEYS are the records to complete, in order (one key, or a batch). ARGV[1]
-- retention ms (8 bytes, big-endian); ARGV[2] the time to live of a completed record (retention
-- + grace), decimal ms; then for each key its token (8 bytes) and result. Replies, per key, 1
-- applied or 0 lease lost (the reply itself for one key, an array of them for a batch). The
-- loop has no inner function, for the same reason as claim's.
local retention = struct.unpack('>i8', ARGV[1])
local ttl = ARGV[2]
local now
-- One MGET for a batch. A key that comes twice sees the value this call wrote; MGET answers
-- nil for a key of another type too, so a missing value is read again with GET, which tells
-- absent from corrupt.
local batch = #KEYS > 1
local blobs = batch and redis.call('MGET', unpack(KEYS))
local written = batch and {}
local replies = batch and {}

for i = 1, #KEYS do
  local key, token, result = KEYS[i], ARGV[2 * i + 1], ARGV[2 * i + 2]
  local blob = batch and written[key]
  if not batch then
    blob = redis.call('GET', key)
  elseif blob == nil then
    blob = blobs[i] or redis.call('GET', key)
  end
  local reply = 0
  repeat
    if not blob then
      break
    end
    local s, _, a, c, _, rest = decode(blob)
    if not s then
      reply = corrupt(key)
      break
    end
    if token_of(blob) ~= token then
      break
    end
    if s == 1 then
      -- The clock is read once per call, and only by one that writes.
      now = now or clock()
      -- The tail up to the owner stays; an in-progress record has no result to replace.
      blob = struct.pack(HEAD, 1, 2, 0, a, c, now, now + retention) ..
        string.sub(blob, TAIL_AT, rest - 1) .. result
      redis.call('PSETEX', key, ttl, blob)
      reply = 1
    elseif s == 2 then
      -- Completed by this token already: a retry after a lost reply. The first result stays.
      reply = 1
    end
  until true
  if not batch then
    return reply
  end
  written[key] = blob
  replies[i] = reply
end
return replies
