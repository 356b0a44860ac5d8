-- wrk script: POST a small JSON body with a new Idempotency-Key on every request.
-- Keys are unique across threads and runs: the run's start time, the thread number, a counter.
-- Usage: wrk -t2 -c64 -d10s -s unique_keys.lua http://127.0.0.1:8080/echo

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix = string.format("%d-%d-%d-", os.time(), math.random(1, 1000000000), tid)
  counter = 0
  body = '{"amount":10,"currency":"EUR","to":"acct-42"}'
end

function request()
  counter = counter + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["x-api-key"] = "bench",
    ["Idempotency-Key"] = '"' .. prefix .. counter .. '"',
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx-or-3xx: %d\n", summary.errors.status))
end
