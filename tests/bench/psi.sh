#!/usr/bin/env bash
# Reading pressure for 1,000 containers: 1,000 cgroup v2 directories, each with a sleeping
# process, read round after round the way the node's sampler reads its containers (three
# *.pressure files and the cgroup id each, psi_read), against a plain `cat` of the same 3,000
# files per round (the peer: what a shell-script collector would do). Reports the median per
# round of ROUNDS rounds, for RUNS separate runs, with the spread.
# usage: sudo tests/bench/psi.sh    (BIN=DIR: a prebuilt psi_read; N=1000, RUNS=3, ROUNDS=20)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
RUNS=${RUNS:-3}
ROUNDS=${ROUNDS:-20}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node --example psi_read
  BIN=$PWD/target/release/examples
fi
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then root=/sys/fs/cgroup; else root=/sys/fs/cgroup/unified; fi
[ -e /proc/pressure/cpu ] || { echo "this kernel has no PSI" >&2; exit 1; }
base=$root/hyperbox-psi-bench
pids=()
cleanup() {
  set +e
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  sleep 0.5
  for d in "$base"/c*; do rmdir "$d" 2>/dev/null; done
  rmdir "$base" 2>/dev/null
}
trap cleanup EXIT
mkdir -p "$base"
for i in $(seq 1 "$N"); do
  mkdir -p "$base/c$i"
  sleep 3600 &
  pids+=($!)
  echo $! >"$base/c$i/cgroup.procs"
done
echo "$N cgroups with a process each under $base" >&2
python3 - "$BIN/psi_read" "$base" "$RUNS" "$ROUNDS" <<'PY'
import json, statistics, subprocess, sys, time, resource, glob
exe, base, runs, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
files = sorted(glob.glob(f"{base}/c*/cpu.pressure") + glob.glob(f"{base}/c*/memory.pressure") + glob.glob(f"{base}/c*/io.pressure"))
def ours():
    out = json.loads(subprocess.run([exe, base, str(rounds)], check=True, capture_output=True, text=True).stdout)
    assert all(r["read"] == r["cgroups"] for r in out), out[0]
    return statistics.median(r["wallUs"] for r in out) / 1000, statistics.median(r["cpuUs"] for r in out) / 1000, out[0]["cgroups"]
def peer():
    # xargs cat: one process reads every file (what a collector script would do), per round.
    walls, cpus = [], []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(["xargs", "-0", "cat"], input="\0".join(files).encode(), check=True, stdout=subprocess.DEVNULL)
        walls.append((time.perf_counter() - t) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000)
    return statistics.median(walls), statistics.median(cpus)
res = {"ours_wall": [], "ours_cpu": [], "peer_wall": [], "peer_cpu": []}
n = 0
for _ in range(runs):
    w, c, n = ours()
    res["ours_wall"].append(w); res["ours_cpu"].append(c)
    w, c = peer()
    res["peer_wall"].append(w); res["peer_cpu"].append(c)
def fmt(xs):
    return f"{statistics.median(xs):.1f} ms (runs {', '.join(f'{x:.1f}' for x in xs)})"
print(f"reading PSI of {n} containers, median per round of {rounds} rounds, {runs} runs:")
print(f"  hyperbox (3 files + cgroup id each): wall {fmt(res['ours_wall'])}, cpu {fmt(res['ours_cpu'])}")
print(f"  xargs cat of the {len(files)} files:   wall {fmt(res['peer_wall'])}, cpu {fmt(res['peer_cpu'])}")
print(f"  ratio (hyperbox / cat): wall {statistics.median(res['ours_wall'])/statistics.median(res['peer_wall']):.2f}x, cpu {statistics.median(res['ours_cpu'])/statistics.median(res['peer_cpu']):.2f}x")
per = statistics.median(res['ours_cpu']) / n * 1000
print(f"  per container: {per:.1f} us of cpu per round; at the sampler's 2 s period: {statistics.median(res['ours_cpu'])/2000*100:.2f}% of one cpu")
PY
