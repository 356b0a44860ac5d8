-- release: KEYS[1] the record; ARGV[1] retention ms (8 bytes, big-endian) and token (8 bytes);
-- ARGV[2] time to live (retention + grace), decimal ms. Replies 1 applied, 0 lease lost.
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
if s ~= 1 or token_of(blob) ~= token then
  return 0
end
local now = clock()
-- No token, no owner, no lease; the attempts stay.
redis.call('PSETEX', key, ARGV[2], struct.pack(HEAD, 1, 3, 0, a, c, now, now + retention) ..
  string.sub(blob, FINGERPRINT_AT, TOKEN_AT - 1) .. '\0\0\0\0\0\0\0\0' .. NO_OWNER)
return 1
