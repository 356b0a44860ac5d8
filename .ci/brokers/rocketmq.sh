# RocketMQ for the tests: the rocketmq-rust 1.0.0 name server on 127.0.0.1:9876 and broker on
# 127.0.0.1:10911 (fast port 10909, HA port 10912), loopback only. Sourced by .ci/run, which
# calls `ensure_rocketmq`; uses its helpers `port_open`, `wait_port` and `log`.
#
# The binaries come from ../shared/bin/rocketmq next to the repository when that folder exists
# (prebuilt `rocketmq-namesrv-rust` and `rocketmq-broker-rust`), else from
# `cargo install --locked rocketmq-namesrv@1.0.0 rocketmq-broker@1.0.0` into the CI cache
# (about 20 minutes on 2 cores, once; reused afterwards).
#
# The broker's configuration is written here: every `messageDelayLevel` is 1 s (a send-back is
# redelivered after about a second instead of 10 s), and the store's files are small (a 64 MiB
# commit log file, small consume queue and index files) instead of preallocating about 1.6 GB.
# The store lives under the CI cache, so a restarted broker keeps its messages and offsets.
#
# Exports IDEM_ROCKETMQ_URL (the name server), IDEM_ROCKETMQ_BIN (the folder of the binaries,
# for tests that start a private broker) and IDEM_ROCKETMQ_HOME (config, logs, store and the
# pid files namesrv.pid and broker.pid, for tests that restart the shared broker with
# "$IDEM_ROCKETMQ_HOME/start-broker.sh").

ROCKETMQ_NAMESRV_PORT="${ROCKETMQ_NAMESRV_PORT:-9876}"
ROCKETMQ_BROKER_PORT="${ROCKETMQ_BROKER_PORT:-10911}"

# The folder holding rocketmq-namesrv-rust and rocketmq-broker-rust, installing them if needed.
rocketmq_bin_dir() {
  local repo shared cache
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  shared="$repo/../shared/bin/rocketmq"
  if [ -x "$shared/rocketmq-namesrv-rust" ] && [ -x "$shared/rocketmq-broker-rust" ]; then
    (cd "$shared" && pwd)
    return 0
  fi
  cache="${IDEM_CI_CACHE:-$HOME/.cache/idem-ci}/rocketmq"
  if [ -x "$cache/bin/rocketmq-namesrv-rust" ] && [ -x "$cache/bin/rocketmq-broker-rust" ]; then
    echo "$cache/bin"
    return 0
  fi
  log "building the RocketMQ name server and broker (cargo install, about 20 minutes)" >&2
  mkdir -p "$cache"
  cargo install --locked --root "$cache" rocketmq-namesrv@1.0.0 >&2 \
    && cargo install --locked --root "$cache" rocketmq-broker@1.0.0 >&2 \
    || { echo "cannot install the RocketMQ binaries" >&2; return 1; }
  echo "$cache/bin"
}

# Writes the broker's configuration and a script that starts the broker alone (for restarts).
rocketmq_write_config() { # home bin
  local home=$1 bin=$2
  mkdir -p "$home/conf" "$home/store"
  cat >"$home/conf/broker.toml" <<TOML
[broker]
namesrvAddr = "127.0.0.1:$ROCKETMQ_NAMESRV_PORT"
brokerIp1 = "127.0.0.1"
listenPort = $ROCKETMQ_BROKER_PORT
storePathRootDir = "$home/store"

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "broker-a"
brokerClusterName = "DefaultCluster"
brokerId = 0

[store]
storeType = "LocalFile"
brokerRole = "ASYNC_MASTER"
storePathRootDir = "$home/store"
haListenAddress = "127.0.0.1"
haListenPort = $((ROCKETMQ_BROKER_PORT + 1))
messageDelayLevel = "1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s"
mappedFileSizeCommitLog = 67108864
mappedFileSizeConsumeQueue = 120000
maxIndexNum = 400000
maxHashSlotNum = 100000
TOML
  cat >"$home/start-broker.sh" <<SH
#!/usr/bin/env bash
# Starts the test broker alone (the name server must be up); writes broker.pid.
export ROCKETMQ_HOME="$home" ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback
cd "$home"
nohup "$bin/rocketmq-broker-rust" -c "$home/conf/broker.toml" -n "127.0.0.1:$ROCKETMQ_NAMESRV_PORT" \\
  >>"$home/broker.log" 2>&1 </dev/null &
echo \$! >"$home/broker.pid"
SH
  chmod +x "$home/start-broker.sh"
}

ensure_rocketmq() {
  local bin home
  bin=$(rocketmq_bin_dir) || return 1
  home="${IDEM_CI_CACHE:-$HOME/.cache/idem-ci}/rocketmq/home"
  export IDEM_ROCKETMQ_BIN="$bin" IDEM_ROCKETMQ_HOME="$home"
  export IDEM_ROCKETMQ_URL="${IDEM_ROCKETMQ_URL:-rocketmq://127.0.0.1:$ROCKETMQ_NAMESRV_PORT}"
  rocketmq_write_config "$home" "$bin"
  if ! port_open "$ROCKETMQ_NAMESRV_PORT"; then
    log "starting the RocketMQ name server on 127.0.0.1:$ROCKETMQ_NAMESRV_PORT"
    (
      export ROCKETMQ_HOME="$home" ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback
      cd "$home"
      nohup "$bin/rocketmq-namesrv-rust" --rocketmqHome "$home" --bindAddress 127.0.0.1 \
        --listenPort "$ROCKETMQ_NAMESRV_PORT" --kvConfigPath "$home/kvConfig.json" \
        >>"$home/namesrv.log" 2>&1 </dev/null &
      echo $! >"$home/namesrv.pid"
    )
    wait_port "RocketMQ name server" "$ROCKETMQ_NAMESRV_PORT" 30 \
      || { tail -20 "$home/namesrv.log" >&2; return 1; }
  fi
  if ! port_open "$ROCKETMQ_BROKER_PORT"; then
    log "starting the RocketMQ broker on 127.0.0.1:$ROCKETMQ_BROKER_PORT (store $home/store)"
    "$home/start-broker.sh"
    wait_port "RocketMQ broker" "$ROCKETMQ_BROKER_PORT" 60 \
      || { tail -20 "$home/broker.log" >&2; return 1; }
  fi
}
