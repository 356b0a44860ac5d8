#!/usr/bin/env python3
"""Instructions per pass of `idem bench` or `bench_consume` run under callgrind.

Run the bench with `IDEM_BENCH_PHASES=1` and
`valgrind --tool=callgrind --dump-before='*idem_bench_phase' --callgrind-out-file=DIR/cg.%p`,
stderr to LOG. Every call of `idem_bench_phase` writes the instructions counted since the
call before into `DIR/cg.<pid>.<n>`, and the bench prints `idem-bench-phase <n> <label>` just
before it: the profile of an `end X` call is pass X alone.

    callgrind_phases.py LOG DIR [STDOUT]

With STDOUT (the JSON lines of `bench_consume`, one per drain, in the order of the drains),
each `end drain` takes the broker and mode of its line. Prints one line per `end` phase (n, label, instructions) and the sum per label (a Redis run
splits its passes into alternating rounds), as JSON on the last line.
"""
import glob
import json
import re
import sys


def total(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def main():
    log, out_dir = sys.argv[1], sys.argv[2]
    names = []
    if len(sys.argv) > 3:
        for line in open(sys.argv[3]):
            if line.startswith('{"broker"'):
                row = json.loads(line)
                names.append(f"{row['broker']}/{row['mode']}")
    phases = []
    for line in open(log, errors="replace"):
        m = re.match(r"idem-bench-phase (\d+) (.*)$", line.strip())
        if m:
            phases.append((int(m.group(1)), m.group(2)))
    files = {}
    for path in glob.glob(f"{out_dir}/cg.*.*"):
        n = path.rsplit(".", 1)[1]
        if n.isdigit():
            files[int(n)] = path
    sums = {}
    rows = []
    for n, label in phases:
        if not label.startswith("end ") or n not in files:
            continue
        ir = total(files[n])
        label = label[4:]
        if label == "drain" and names:
            label = names.pop(0)
        rows.append({"n": n, "label": label, "ir": ir})
        sums[label] = sums.get(label, 0) + ir
        print(f"{n:4} {label:<24} {ir:>15,}")
    for label, ir in sums.items():
        print(f"sum  {label:<24} {ir:>15,}")
    print(json.dumps({"phases": rows, "sums": sums}))


if __name__ == "__main__":
    main()
