-- extend: KEYS[1] the record; ARGV[1] lease and grace ms (8 bytes each, big-endian) and token
-- (8 bytes). Replies 1 applied, 0 lease lost.
local key = KEYS[1]
local blob = redis.call('GET', key)
if not blob then
  return 0
end
local s, l, a, c, e = decode(blob)
if not s then
  return corrupt(key)
end
local lease, grace, token = struct.unpack('>i8i8c8', ARGV[1])
if s ~= 1 or token_of(blob) ~= token then
  return 0
end
local now = clock()
-- Keep the retention an abandoned claim gets after its lease.
if l == 0 then
  l = now
end
local keep = math.max(e - l, 0)
local lease_end = now + lease
redis.call('PSETEX', key, string.format('%d', lease + keep + grace),
  struct.pack(HEAD, 1, 1, lease_end, a, c, now, lease_end + keep) .. string.sub(blob, TAIL_AT))
return 1
