-- fail: KEYS[1] the record; ARGV[1] retention ms (8 bytes, big-endian) and token (8 bytes);
-- ARGV[2] reason; ARGV[3] time to live (retention + grace), decimal ms. Replies 1 applied, 0
-- lease lost.
local key = KEYS[1]
local blob = redis.call('GET', key)
if not blob then
  return 0
end
local s, _, a, c = decode(blob)
if not s then
  return corrupt(key)
end
local retention, token = struct.unpack('>i8c8', ARGV[1])
if token_of(blob) ~= token then
  return 0
end
if s == 1 then
  local now = clock()
  -- The token stays (a repeated fail by it is applied), the owner and lease go.
  redis.call('PSETEX', key, ARGV[3], struct.pack(HEAD, 1, 4, 0, a, c, now, now + retention) ..
    string.sub(blob, FINGERPRINT_AT, TOKEN_AT + 7) .. NO_OWNER .. ARGV[2])
  return 1
end
-- Failed by this token already: a retry after a lost reply.
if s == 4 then
  return 1
end
return 0
