-- Prepended to every idem script (see src/script.rs). KEYS are records; each name carries a hash
-- tag around `namespace:id`. Release, extend, fail and purge take one key; claim and complete
-- take one key or a batch (on Redis Cluster, a batch of keys of one hash slot only: see
-- `Batching` in src/lib.rs).
--
-- A record is one string, so that a claim of a new key is a single SET NX GET and every other
-- write one SET:
--
--   offset size
--        0    1  format version, 1
--        1    1  state: 1 in progress, 2 completed, 3 released, 4 failed
--        2    8  lease end, 0 when there is none            (big-endian integers;
--       10    4  attempts                                     times are milliseconds
--       14    8  created                                      on this server's clock)
--       22    8  updated
--       30    8  expires: the record stops counting then
--       38   16  payload fingerprint
--       54    8  fencing token, zero bytes when there is none
--       62    2  owner length n
--       64    n  owner, empty when there is none
--     64+n    …  the result (completed) or failure reason (failed), to the end
--
-- src/codec.rs reads the same layout. Bytes 38 on (the "tail") are what the claimer sends as
-- one argument, so that a new record is the packed head plus that argument.
--
-- What a script costs the server is mostly its redis.call()s, its arguments and its number
-- conversions (measured with callgrind: a bare EVALSHA costs more than a SET), so the scripts
-- call as few commands as they can (PSETEX is a little cheaper than SET … PX), take numbers
-- packed in binary, answer the common cases
-- with a plain integer or string, and read the clock once per call, only when they write. Keys
-- expire by
-- `SET … PX <ttl>`, a decimal the client computes (the record's retention plus a grace period);
-- Redis counts it from the script's start, at most a millisecond before `now`. `clock()` turns
-- TIME into milliseconds with arithmetic on the reply's strings rather than tonumber() and
-- math.floor(), which cost a tenth of a claim. Durations are capped at 1e13 ms by the
-- client, so every time stays far below 2^53, exact in Lua's doubles.
local HEAD = '>BBi8I4i8i8i8'
-- 1-based positions in the record.
local TAIL_AT = 39
local FINGERPRINT_AT = TAIL_AT
local TOKEN_AT = 55
local OWNER_AT = 65
local NO_OWNER = '\0\0'

local function corrupt(key)
  return redis.error_reply('IDEMCORRUPT ' .. key .. ' does not hold an idem record')
end

-- The server's clock in whole milliseconds.
local function clock()
  local time = redis.call('TIME')
  local ms = time[2] / 1000
  return time[1] * 1000 + ms - ms % 1
end

-- The fixed fields of the record in `blob` (state, lease end, attempts, created, expires) and
-- where its result starts, or nothing if it is not a record. The fingerprint and token stay in
-- the string (compare `string.sub(blob, FINGERPRINT_AT, TOKEN_AT - 1)` and `token_of(blob)`):
-- unpacking them as strings costs more than the rest of a completion's Lua. These functions
-- spell the layout's constants out: a closure over the locals above would be built anew on
-- every call, which costs a single claim 6% (callgrind).
local function decode(blob)
  -- OWNER_AT - 1, HEAD, and the owner length just before OWNER_AT.
  if #blob < 64 then
    return
  end
  local v, s, l, a, c, _, e = struct.unpack('>BBi8I4i8i8i8', blob)
  if v ~= 1 or s < 1 or s > 4 then
    return
  end
  local rest = 65 + struct.unpack('>H', blob, 63)
  if rest > #blob + 1 then
    return
  end
  return s, l, a, c, e, rest
end

local function token_of(blob)
  -- TOKEN_AT .. TOKEN_AT + 7
  return string.sub(blob, 55, 62)
end
