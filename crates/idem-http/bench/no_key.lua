-- wrk script: POST the same small JSON body without an Idempotency-Key (the baseline).
-- Usage: wrk -t2 -c64 -d10s -s no_key.lua http://127.0.0.1:8080/echo

function init(args)
  body = '{"amount":10,"currency":"EUR","to":"acct-42"}'
end

function request()
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["x-api-key"] = "bench",
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx-or-3xx: %d\n", summary.errors.status))
end
