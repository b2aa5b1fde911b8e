#!/usr/bin/env bash
# Fleet node API benchmarks on one node (see fleet.py):
#  (a) a rolling update of 10 replicas with a readiness probe: total time, minimum ready count
#  (b) scaling 1 -> 50 replicas: time until all 50 run, against 50 `runc run -d` of the same
#      image in the same run
# usage: sudo tests/bench/fleet.sh    (BIN=DIR to use another build's hyperbox-node)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node
  BIN=$PWD/target/release
fi
node=$BIN/hyperbox-node
work=$(mktemp -d /tmp/hyperbox-fleet-bench.XXXXXX)
sock=$work/node.sock
reg_pid="" node_pid=""
cleanup() {
  set +e
  [ -n "$node_pid" ] && { kill "$node_pid"; wait "$node_pid"; }
  [ -n "$reg_pid" ] && kill "$reg_pid"
  for id in $(runc list -q 2>/dev/null | grep '^hb-fleet-'); do runc delete -f "$id" >/dev/null 2>&1; done
  for p in $(cat /sys/fs/cgroup/pids/hyperbox-fleet-bench/*/cgroup.procs 2>/dev/null); do kill -9 "$p"; done
  unmount_under "$work"
  rmdir /sys/fs/cgroup/*/hyperbox-fleet-bench/* /sys/fs/cgroup/*/hyperbox-fleet-bench 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1 >/dev/null
"$node" --socket "$sock" serve --state-dir "$work/node" --run-dir "$work/run" \
  --insecure-registry "$reg" --cgroup-parent /hyperbox-fleet-bench >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
"$node" --socket "$sock" pull "$reg/bench/busybox:1" >/dev/null
# The peer's bundle: the same image, unpacked by umoci, run by runc.
runc_bundle "$reg/bench/busybox:1" "$work" readonly
python3 tests/bench/fleet.py "$node" "$sock" "$reg/bench/busybox:1" "$work/runc-bundle"
