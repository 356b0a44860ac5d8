#!/bin/sh
# Runs a bench under callgrind with a profile dumped at every pass boundary, then prints the
# instructions of each pass (see callgrind_phases.py). Client process only: servers and brokers
# run in processes of their own and are not counted.
#
#   crates/idem-cli/bench/callgrind.sh OUT_DIR ./target/release/idem bench --store ... --json
#   crates/idem-cli/bench/callgrind.sh OUT_DIR ./target/release/examples/bench_consume ...
set -eu
dir=$1
shift
rm -rf "$dir"
mkdir -p "$dir"
IDEM_BENCH_PHASES=1 IDEM_BENCH_POLL_US=${IDEM_BENCH_POLL_US:-200000} \
  valgrind --tool=callgrind --dump-before='*idem_bench_phase' \
  --callgrind-out-file="$dir/cg.%p" "$@" >"$dir/stdout" 2>"$dir/stderr"
python3 "$(dirname "$0")/callgrind_phases.py" "$dir/stderr" "$dir" "$dir/stdout"
