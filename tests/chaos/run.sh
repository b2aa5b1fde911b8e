#!/usr/bin/env bash
# Chaos soak (issue 6): a registry, a Git remote behind `git daemon`, hyperbox-node and
# hyperbox-operator, then ROUNDS rounds of one random disruption each (kill -9 of a daemon, a
# push, a registry or Git outage, a delete behind the operator's back), each followed by a
# settle and the invariant checks of tests/chaos/chaos.py. Exits non-zero on any violation.
#
# usage: sudo tests/chaos/run.sh [ROUNDS]         (default 20)
#   CHAOS_SEED=N         replay a run (the seed is printed first)
#   HYPERBOX_BIN_DIR=D   use the binaries in D (e.g. target/debug) instead of a release build
#   CHAOS_KEEP=1         keep the work dir (logs) after the run
#   CHAOS_STRESS_CREATE=N  instead of the soak, recreate one workload N times on the node alone
#                        and stop at the first create that hangs (CHAOS_HOLD=1 keeps it for gdb)
# Needs root on Linux (Debian 12): real containers, mounts and cgroups.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-20}
tests/install-deps.sh
. tests/bench/lib.sh
if [ -n "${HYPERBOX_BIN_DIR:-}" ]; then
  bin=$(cd "$HYPERBOX_BIN_DIR" && pwd)
else
  nice -n 10 cargo build --release -p hyperbox-node -p hyperbox-operator
  bin=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
for b in hyperbox-node hyperbox-operator; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing" >&2; exit 1; }
done
seed=${CHAOS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
work=$(mktemp -d /tmp/hyperbox-chaos.XXXXXX)
cg=hyperbox-chaos-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  # The daemons python started (it kills them itself unless it was killed).
  for f in "$work"/pids/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    kill -9 -- "-$p" 2>/dev/null
    kill -9 "$p" 2>/dev/null
  done
  # Forks of the node daemon that outlived it (runtime helpers that never exec'd) carry the
  # daemon's command line, which names the work dir.
  for f in /proc/[0-9]*/cmdline; do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = $$ ] && continue
    grep -qF -- "$work/" "$f" 2>/dev/null && kill -9 "$p" 2>/dev/null
  done
  # Containers outlive the node by design: kill them through their cgroups.
  for _ in 1 2 3; do
    for p in $(cat /sys/fs/cgroup/pids/"$cg"/*/cgroup.procs /sys/fs/cgroup/pids/"$cg"/cgroup.procs 2>/dev/null); do
      kill -9 "$p" 2>/dev/null
    done
    sleep 0.2
  done
  unmount_under "$work"
  for d in /sys/fs/cgroup/*/"$cg"; do
    [ -d "$d" ] || continue
    find "$d" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
    rmdir "$d" 2>/dev/null
  done
  if [ "${CHAOS_KEEP:-0}" = 1 ]; then
    echo "work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 tests/chaos/chaos.py --rounds "$rounds" --seed "$seed" --bin-dir "$bin" --work "$work" \
  --cgroup-parent "/$cg" --repo-root "$PWD" --stress-create "${CHAOS_STRESS_CREATE:-0}"
