# Redis Cluster for the idem-redis cluster tests: 3 masters with 1 replica each on
# 127.0.0.1:7000-7005 (cluster bus on 17000-17005), no persistence, node files and logs in a
# cache directory. Sourced by .ci/run, which provides `port_open`, `wait_port`, `log`,
# `install` and `$SUDO`; defines `ensure_redis_cluster` and exports nothing. The tests read
# IDEM_REDIS_CLUSTER_URL (default redis://127.0.0.1:7000; see docs/redis-cluster.md).

REDIS_CLUSTER_PORTS=(7000 7001 7002 7003 7004 7005)
REDIS_CLUSTER_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/idem-ci/redis-cluster"

# Whether every node answers and reports the whole cluster (slots all assigned, 6 nodes), and
# every replica has synced with its master (the tests WAIT for a replica).
redis_cluster_healthy() {
  local p info
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    info=$(redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null) || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    grep -q '^cluster_slots_assigned:16384' <<<"$info" || return 1
    grep -q '^cluster_known_nodes:6' <<<"$info" || return 1
    info=$(redis-cli -h 127.0.0.1 -p "$p" info replication 2>/dev/null) || return 1
    grep -q '^role:master\|^master_link_status:up' <<<"$info" || return 1
  done
}

redis_cluster_wait_healthy() { # seconds
  local i
  for ((i = 0; i < $1 * 10; i++)); do
    redis_cluster_healthy && return 0
    sleep 0.1
  done
  return 1
}

ensure_redis_cluster() {
  if redis_cluster_healthy; then
    return 0
  fi
  local p busy=()
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    if port_open "$p" || port_open $((p + 10000)); then busy+=("$p"); fi
  done
  if [ "${#busy[@]}" -gt 0 ]; then
    # Something listens there: a cluster still electing, or another program. Give a cluster a
    # moment; never kill a process this script did not start.
    if redis_cluster_wait_healthy 30; then
      return 0
    fi
    echo "Redis Cluster: ports ${busy[*]} (or their bus ports +10000) are in use, and not by a" \
      "healthy 3-master cluster; stop what listens there" >&2
    return 1
  fi
  log "starting Redis Cluster (3 masters, 3 replicas) on 127.0.0.1:${REDIS_CLUSTER_PORTS[0]}-${REDIS_CLUSTER_PORTS[5]}"
  command -v redis-server >/dev/null || install redis-server
  command -v redis-cli >/dev/null || install redis-tools
  mkdir -p "$REDIS_CLUSTER_DIR"
  local dir seeds=()
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    dir="$REDIS_CLUSTER_DIR/$p"
    # A fresh cluster every time it is created: no persistence, so old node files only hold
    # the identities of a cluster that is gone.
    rm -rf "$dir"
    mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$p" --protected-mode yes \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --repl-diskless-sync-delay 0 \
      --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" \
      --pidfile "$dir/redis.pid"
    seeds+=("127.0.0.1:$p")
  done
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    wait_port "Redis Cluster node" "$p" 20
  done
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >"$REDIS_CLUSTER_DIR/create.log" 2>&1 || {
    cat "$REDIS_CLUSTER_DIR/create.log" >&2
    return 1
  }
  if ! redis_cluster_wait_healthy 60; then
    echo "Redis Cluster did not reach cluster_state:ok within 60 s; logs in $REDIS_CLUSTER_DIR" >&2
    return 1
  fi
}
