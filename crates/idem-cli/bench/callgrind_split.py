#!/usr/bin/env python3
"""Splits the instructions of one pass by where they are spent, from the profiles that
callgrind.sh wrote: self cost per source file, summed over every profile of
the pass (a Redis run splits a pass into rounds), each file put in one bucket. Self cost is
read from the profiles directly: callgrind_annotate also lists functions that were on the stack
when a profile was dumped with their whole cost, which would count it twice.

    callgrind_split.py DIR LABEL [N]
    callgrind_split.py DIR1 DIR2 LABEL N1 N2

DIR as given to callgrind.sh; LABEL a pass (`idem-new`, `baseline`, `rabbitmq/idem-sqlite`);
with N, instructions per message (divide by N). With two runs of N1 and N2 messages, the
difference of their splits over N2 - N1, which cancels what a pass costs once. Prints one JSON
object of bucket -> count.
Code of the standard library, hash tables and libc (collections, iterators, formatting,
memcpy) counts for the crate of the function it ran in when that function's name says it
(inlined code, or a call to memcpy); what is left in `std` and `libc` is mostly the allocator
(malloc, free) and functions of the standard library that were not inlined.
"""
import json
import re
import sys

BUCKETS = [
    ("executor/policy", r"/crates/idem/src/(executor|policy)"),
    ("idem core (keys, records, memory store)", r"/crates/idem/src/|xxhash"),
    ("runtime (idem_broker::Consumer)", r"/crates/idem-broker/src/(consumer|source|key|message|memory)\.rs"),
    ("broker adapter", r"/crates/idem-broker/src/"),
    ("store client code", r"/crates/idem-(sqlite|redis|postgres|mysql)/src/"),
    ("bench harness", r"/crates/idem-cli/|/examples/bench_consume"),
    ("driver: sqlite", r"libsqlite3-sys|rusqlite"),
    ("driver: redis", r"/redis-\d|/combine-\d"),
    ("driver: postgres", r"postgres|deadpool"),
    ("driver: mysql", r"mysql"),
    ("driver: rabbitmq", r"lapin|amq-protocol|/nom-\d|pinky-swear"),
    ("driver: nats", r"async-nats|nuid|nkeys"),
    ("serialization", r"serde|itoa|ryu"),
    ("tokio/futures", r"/tokio-|/tokio/|futures-|/mio-|parking_lot|/slab-|/bytes-|event-listener|async-"),
    ("tracing/metrics", r"tracing|metrics"),
    ("std (inlined or not)", r"^/rustc/|hashbrown|foldhash"),
    ("libc (malloc, memcpy, syscalls)", r"^\./|libc|ld-linux|\?\?\?"),
]


# Code of the standard library, hash tables and libc runs inside someone's function: counted
# for that function's crate when its (demangled) name says which.
BY_FUNCTION = [
    ("executor/policy", r"idem::executor|idem::policy"),
    ("runtime (idem_broker::Consumer)", r"idem_broker::consumer"),
    ("broker adapter", r"idem_broker::"),
    ("store client code", r"idem_(sqlite|redis|postgres|mysql)::"),
    ("bench harness", r"idem::bench|bench_consume::"),
    ("idem core (keys, records, memory store)", r"^<?idem::"),
    ("driver: sqlite", r"rusqlite::|^sqlite3"),
    ("driver: redis", r"^<?redis::|combine::"),
    ("driver: postgres", r"postgres"),
    ("driver: mysql", r"mysql"),
    ("driver: rabbitmq", r"lapin::|amq_protocol"),
    ("driver: nats", r"async_nats::"),
    ("tokio/futures", r"^<?(tokio|futures_util|futures_core|mio)::"),
]


def bucket(path, function=""):
    for name, pat in BUCKETS:
        if re.search(pat, path):
            if name.startswith(("std", "libc")):
                for fname, fpat in BY_FUNCTION:
                    if re.search(fpat, function):
                        return fname
            return name
    return "other"


def phases(d, label):
    names = []
    try:
        for line in open(f"{d}/stdout"):
            if line.startswith('{"broker"'):
                row = json.loads(line)
                names.append(f"{row['broker']}/{row['mode']}")
    except FileNotFoundError:
        pass
    out = set()
    pid = None
    for line in open(f"{d}/stderr", errors="replace"):
        m = re.match(r"==(\d+)==", line)
        if m and pid is None:
            pid = m.group(1)
        m = re.match(r"idem-bench-phase (\d+) end (.*)$", line.strip())
        if m:
            name = m.group(2)
            if name == "drain" and names:
                name = names.pop(0)
            if name == label:
                out.add(int(m.group(1)))
    return pid, out


def self_costs(path, sums, names, fnames):
    """Adds the self cost of every source file in callgrind profile `path` to `sums` (by
    bucket; `sums` None: only reads the names). The line after `calls=` is the inclusive cost
    of a call, not self cost. `names` carries the compressed file names across the profiles of
    one run: a profile refers to names an earlier one defined."""
    current = "?"
    function = ""
    skip = False
    with open(path, errors="replace") as f:
        for line in f:
            if skip:
                skip = False
                continue
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                if sums is not None and len(parts) >= 2:
                    b = bucket(current, function)
                    sums[b] = sums.get(b, 0) + int(parts[1])
                continue
            m = re.match(r"(c?)f[lie]=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                # Callee lines (`cfi=`) define names too, in the same table.
                if m.group(3) is not None:
                    names[m.group(2)] = m.group(3)
                if not m.group(1):
                    current = names.get(m.group(2), "?")
            m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(3) is not None:
                    fnames[m.group(2)] = m.group(3)
                if not m.group(1):
                    function = fnames.get(m.group(2), "")
                continue
            if line.startswith("calls="):
                skip = True


def split(d, label):
    sums = {}
    names, fnames = {}, {}
    pid, wanted = phases(d, label)
    for k in range(1, max(wanted) + 1):
        self_costs(f"{d}/cg.{pid}.{k}", sums if k in wanted else None, names, fnames)
    return sums


def main():
    if len(sys.argv) == 6:
        d1, d2, label, n1, n2 = sys.argv[1:6]
        a, b = split(d1, label), split(d2, label)
        sums = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
        n = float(n2) - float(n1)
    else:
        sums = split(sys.argv[1], sys.argv[2])
        n = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    per = {k: round(v / n) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])}
    print(json.dumps({"total": sum(per.values()), **per}))


if __name__ == "__main__":
    main()
