-- claim: KEYS are the records to claim, in order (one key, or a batch). ARGV[1] lease,
-- retention and grace ms (8 bytes each) and max attempts (4 bytes, 0: no limit), big-endian;
-- ARGV[2] the time to live of an acquired record (lease + retention + grace), decimal ms; then
-- for each key the record's tail (fingerprint, token, owner). Replies, per key (the reply
-- itself for one key, an array of them for a batch):
--   lease end (an integer)                 acquired a new key: attempt 1
--   the stored result (a string)           completed: a duplicate
--   {'P'|'R'|'T', attempt, lease end}      acquired: reprocess, retry, takeover
--   {'I', remaining lease ms}              in progress
--   {'M', stored fingerprint}              mismatch
--   {'X', attempts, reason}                exhausted
-- The clock is read once: a batch is claimed at one instant, as by a single writer, so every
-- new record of the batch has the same head. The loop has no inner function: a closure over
-- these locals costs a single claim a fifth of its time.
local lease, retention, grace, max = struct.unpack('>i8i8i8I4', ARGV[1])
local ttl = ARGV[2]
local now = clock()
local lease_end = now + lease
local expires = lease_end + retention
local head = struct.pack(HEAD, 1, 1, lease_end, 1, now, now, expires)
local batch = #KEYS > 1
local replies = batch and {}

for i = 1, #KEYS do
  local key, tail = KEYS[i], ARGV[i + 2]
  local reply
  repeat
    -- A new key takes this one command.
    local blob = head .. tail
    local old = redis.call('SET', key, blob, 'NX', 'PX', ttl, 'GET')
    if not old then
      reply = lease_end
      break
    end
    local s, l, a, c, e, rest = decode(old)
    if not s then
      reply = corrupt(key)
      break
    end
    if now >= e then
      -- Past its retention the record is as good as absent: start afresh.
      redis.call('PSETEX', key, ttl, blob)
      reply = {'P', 1, lease_end}
      break
    end
    local f = string.sub(old, FINGERPRINT_AT, TOKEN_AT - 1)
    if f ~= string.sub(tail, 1, 16) then
      reply = {'M', f}
      break
    end
    if s == 2 then
      reply = string.sub(old, rest)
      break
    end
    if s == 4 then
      reply = {'X', a, string.sub(old, rest)}
      break
    end
    local how = 'R'
    if s == 1 then
      if l ~= 0 and now < l then
        reply = {'I', l - now}
        break
      end
      how = 'T'
    end
    if max > 0 and a >= max then
      -- The same text as idem::transition::claim. The token stays, the owner goes.
      local reason = 'attempts exhausted: ' .. a .. ' of at most ' .. max ..
        ', the last one never completed'
      local failed = struct.pack(HEAD, 1, 4, 0, a, c, now, now + retention) .. f ..
        token_of(old) .. NO_OWNER .. reason
      redis.call('PSETEX', key, string.format('%d', retention + grace), failed)
      reply = {'X', a, reason}
      break
    end
    -- The claimer's token and owner, the record's creation time; no result.
    redis.call('PSETEX', key, ttl, struct.pack(HEAD, 1, 1, lease_end, a + 1, c, now, expires) ..
      tail)
    reply = {how, a + 1, lease_end}
  until true
  if not batch then
    return reply
  end
  replies[i] = reply
end
return replies
