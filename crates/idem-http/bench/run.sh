#!/usr/bin/env bash
# The HTTP benchmarks: the same axum handler with and without the idempotency layer, and
# `idem proxy` in front of a local upstream, each measured with wrk in the same run.
#
#   cargo build --release -p idem-http --features proxy --example bench_server
#   bash crates/idem-http/bench/run.sh            # from the repository root
#
# Environment: BIN (the bench_server binary; default $CARGO_TARGET_DIR or target, release),
# DUR (default 10s), CONN (connections, default 64), THREADS (wrk threads, default 2),
# REDIS (default redis://127.0.0.1:6379; set REDIS=none to skip Redis).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/examples/bench_server}"
DUR="${DUR:-10s}"
CONN="${CONN:-64}"
THREADS="${THREADS:-2}"
REDIS="${REDIS:-redis://127.0.0.1:6379}"
PORT=18080
UPORT=18081
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

start() { # port args...
  local port=$1; shift
  "$BIN" --listen "127.0.0.1:$port" "$@" >"$TMP/server-$port.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server on $port did not start: $(cat "$TMP/server-$port.log")" >&2
  exit 1
}

stop() { # stops the last server started
  local pid=${PIDS[-1]}
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset 'PIDS[-1]'
}

# bench LABEL URL SCRIPT [CONN]: prints "LABEL req/s p50"
bench() {
  local out
  out=$(wrk -t"$THREADS" -c"${4:-$CONN}" -d"$DUR" --latency -s "$HERE/$3" "$2")
  local rps p50 bad
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  bad=$(awk -F': ' '/non-2xx-or-3xx/ {print $2}' <<<"$out")
  printf '%-44s %10s req/s  p50 %8s  non-2xx %s\n' "$1" "$rps" "$p50" "$bad"
  echo "$rps" >"$TMP/last"
}

warm() { # url: one request with the replay key
  curl -s -o /dev/null -X POST "$1" -H 'content-type: application/json' -H 'x-api-key: bench' \
    -H 'Idempotency-Key: "replay-1"' -d '{"amount":10,"currency":"EUR","to":"acct-42"}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }

echo "wrk -t$THREADS -c$CONN -d$DUR, handler: echo after 1 ms (/echo) or at once (/noop)"
for route in echo noop; do
  start $PORT --store none
  bench "$route: no layer (baseline)" "http://127.0.0.1:$PORT/$route" no_key.lua
  base=$(cat "$TMP/last")
  stop
  stores=("memory" "sqlite:$TMP/bench-$route.db")
  [ "$REDIS" != none ] && stores+=("$REDIS")
  for store in "${stores[@]}"; do
    label="${store%%:*}"
    start $PORT --store "$store"
    bench "$route: layer $label, new keys" "http://127.0.0.1:$PORT/$route" unique_keys.lua
    echo "    ratio $(ratio "$(cat "$TMP/last")" "$base")"
    warm "http://127.0.0.1:$PORT/$route"
    bench "$route: layer $label, replays" "http://127.0.0.1:$PORT/$route" same_key.lua
    echo "    ratio $(ratio "$(cat "$TMP/last")" "$base")"
    stop
  done
done

echo
echo "idem proxy (SQLite store) in front of the echo server, median latency, wrk -c${PCONN:-16}"
start $UPORT --store none
bench "direct to upstream, /echo" "http://127.0.0.1:$UPORT/echo" unique_keys.lua "${PCONN:-16}"
bench "direct to upstream, /noop" "http://127.0.0.1:$UPORT/noop" no_key.lua "${PCONN:-16}"
start $PORT --proxy "http://127.0.0.1:$UPORT" --store "sqlite:$TMP/proxy.db"
bench "through proxy, /echo new keys (recorded)" "http://127.0.0.1:$PORT/echo" unique_keys.lua "${PCONN:-16}"
bench "through proxy, /noop (passes through)" "http://127.0.0.1:$PORT/noop" no_key.lua "${PCONN:-16}"
