#!/usr/bin/env bash
# Pressure protection A/B (the scenario of tests/tests/node_pressure.rs,
# protection_evicts_the_lowest_priority_first_and_the_high_priority_survives): a node whose
# workloads share a 384 MiB memory cgroup runs `high` (priority 1000, an HTTP endpoint probed
# every 50 ms, re-reading 96 MiB of its own), `low` (priority 0) and then `hog` (priority 500:
# 200 MiB plus its own 96 MiB file, then 8 MiB more a second). Each run does it with
# protection on and with it off; RUNS separate runs (default 3). Reports, per arm, the median
# and the spread of: kernel OOM kills, the high-priority container's memory stall (its PSI
# `full` total over the 60 s after the hog starts) and its HTTP latency p99 and max.
# usage: sudo tests/bench/protection.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
RUNS=${RUNS:-3}
cargo build --release -p hyperbox-node
cargo test --release -p hyperbox-e2e --test node_pressure --no-run 2>&1 | tail -1
exe=$(ls -t target/release/deps/node_pressure-* | grep -v '\.d$' | head -1)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$RUNS"); do
  echo "run $i of $RUNS" >&2
  "$exe" --exact protection_evicts_the_lowest_priority_first_and_the_high_priority_survives --nocapture 2>/dev/null |
    grep '^PROTECTION_AB ' | sed 's/^PROTECTION_AB //' >>"$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def arm(on):
    return [r for r in rows if r["protection"] == on]
def fmt(xs, unit=""):
    return f"{statistics.median(xs):g}{unit} (runs {', '.join(f'{x:g}' for x in xs)})"
for on in (True, False):
    a = arm(on)
    print(f"protection {'on ' if on else 'off'} ({len(a)} runs): OOM kills {fmt([r['oomKills'] for r in a])}; "
          f"high stall {fmt([r['highStallMs'] for r in a], ' ms')}; p99 {fmt([r['p99Ms'] for r in a], ' ms')}; "
          f"max {fmt([r['maxMs'] for r in a], ' ms')}; failed requests {fmt([r['failed'] for r in a])}; "
          f"hog ended: {', '.join(r['hog'] or 'still running' for r in a)}; low: {', '.join(r['low'] or 'running' for r in a)}")
on, off = arm(True), arm(False)
m = lambda rs, k: statistics.median(r[k] for r in rs)
if m(on, "highStallMs") > 0:
    print(f"high-priority stall, off/on: {m(off, 'highStallMs') / m(on, 'highStallMs'):.1f}x; max latency off/on: {m(off, 'maxMs') / max(m(on, 'maxMs'), 0.1):.1f}x")
PY
