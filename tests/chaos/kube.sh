#!/usr/bin/env bash
# Chaos soak of the Kubernetes path (issue 20): a real API server, three nodes and two
# operators electing a leader, then ROUNDS rounds of one disruption each (kill -9 of the
# leader, the standby or a node; API server restarts; the leader cut off from the API server;
# the leader's clock 5 minutes ahead; a node's heartbeats cut while it stays reachable;
# rollouts), each followed by a settle and the invariant checks of tests/chaos/kube_chaos.py.
# Exits non-zero on any violation.
#
# usage: sudo tests/chaos/kube.sh [ROUNDS]        (default 20)
#   CHAOS_SEED=N         replay a run (the seed is printed first)
#   HYPERBOX_BIN_DIR=D   use the binaries in D (e.g. target/debug) instead of a release build
#   CHAOS_KEEP=1         keep the work dir (logs) after the run
# Needs root on Linux (Debian 12): real containers, mounts and cgroups.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-20}
tests/install-deps.sh
tests/kube/cluster.sh build >/dev/null
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
work=$(mktemp -d /tmp/hyperbox-kchaos.XXXXXX)
cg=hyperbox-kchaos-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  for f in "$work"/pids/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    kill -9 -- "-$p" 2>/dev/null
    kill -9 "$p" 2>/dev/null
  done
  tests/kube/cluster.sh down "$work/kube" >/dev/null 2>&1
  for f in /proc/[0-9]*/cmdline; do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = $$ ] && continue
    grep -qF -- "$work/" "$f" 2>/dev/null && kill -9 "$p" 2>/dev/null
  done
  # Containers outlive their node by design: kill them through their cgroups.
  for _ in 1 2 3; do
    for p in $(find /sys/fs/cgroup/pids/"$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
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

python3 tests/chaos/kube_chaos.py --rounds "$rounds" --seed "$seed" --bin-dir "$bin" --work "$work" \
  --cgroup-parent "/$cg" --repo-root "$PWD"
