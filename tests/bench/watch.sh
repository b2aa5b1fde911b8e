#!/usr/bin/env bash
# Watch versus polling (see watch.py): 1,000 workloads spread by one edge operator over 3
# node runtimes on this machine; the operator's requests, bytes and CPU over 10 syncs
# (5 minutes at the default 30 s interval) of steady state, polling the nodes and watching
# them, alternated ROUNDS times (default 3).
# usage: sudo tests/bench/watch.sh    (BIN=DIR: another build; WORKLOADS=N, ROUNDS=N, SYNCS=N)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node -p hyperbox-operator
  BIN=$PWD/target/release
fi
work=$(mktemp -d /tmp/hyperbox-watch-bench.XXXXXX)
reg_pid=""
cleanup() {
  set +e
  pkill -f "hyperbox-operator git .*$work" 2>/dev/null
  pkill -f "hyperbox-node --socket $work" 2>/dev/null
  sleep 1
  [ -n "$reg_pid" ] && kill "$reg_pid"
  for i in 0 1 2; do
    for p in $(cat /sys/fs/cgroup/pids/hyperbox-watch-bench-$i/*/cgroup.procs 2>/dev/null); do kill -9 "$p"; done
  done
  sleep 0.5
  unmount_under "$work"
  for i in 0 1 2; do
    rmdir /sys/fs/cgroup/*/hyperbox-watch-bench-$i/* /sys/fs/cgroup/*/hyperbox-watch-bench-$i 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1 >/dev/null
python3 tests/bench/watch.py "$BIN/hyperbox-node" "$BIN/hyperbox-operator" "$reg/bench/busybox:1" "$work"
