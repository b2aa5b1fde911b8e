#!/usr/bin/env bash
# Edge GitOps benchmarks: webhook push->running latency, sync time and memory at 1,000 and
# 10,000 manifests, no-change sync, fetch vs plain git. See edge.py. usage: sudo tests/bench/edge.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
cargo build --release -p hyperbox-node -p hyperbox-operator
node=$PWD/target/release/hyperbox-node
op=$PWD/target/release/hyperbox-operator
work=$(mktemp -d /tmp/hyperbox-edge-bench.XXXXXX)
sock=$work/node.sock
reg_pid="" node_pid=""
cleanup() {
  set +e
  [ -n "$node_pid" ] && { kill "$node_pid"; wait "$node_pid"; }
  [ -n "$reg_pid" ] && kill "$reg_pid"
  for p in $(cat /sys/fs/cgroup/pids/hyperbox-edge-bench/*/cgroup.procs 2>/dev/null); do kill -9 "$p"; done
  unmount_under "$work"
  rmdir /sys/fs/cgroup/*/hyperbox-edge-bench/* /sys/fs/cgroup/*/hyperbox-edge-bench 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1
"$node" --socket "$sock" serve --state-dir "$work/node" --insecure-registry "$reg" \
  --cgroup-parent /hyperbox-edge-bench >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
"$node" --socket "$sock" pull "$reg/bench/busybox:1"
python3 tests/bench/edge.py "$node" "$op" "$sock" "$reg/bench/busybox:1" "$work"
