#!/usr/bin/env bash
# Edge GitOps benchmarks: webhook push->running latency, sync time and memory at 1,000 and
# 10,000 manifests, no-change sync, fetch vs plain git. See edge.py.
# usage: sudo tests/bench/edge.sh
#   BIN=DIR      use DIR/hyperbox-node and DIR/hyperbox-operator (another build, for an A/B
#                comparison in the same session) instead of building this tree
#   BENCH_FS=host  run in /tmp on the host filesystem instead of a fresh ext4 (see below)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node -p hyperbox-operator
  BIN=$PWD/target/release
fi
node=$BIN/hyperbox-node
op=$BIN/hyperbox-operator
work=$(mktemp -d /tmp/hyperbox-edge-bench.XXXXXX)
sock=$work/node.sock
reg_pid="" node_pid="" img=""
cleanup() {
  set +e
  [ -n "$node_pid" ] && { kill "$node_pid"; wait "$node_pid"; }
  [ -n "$reg_pid" ] && kill "$reg_pid"
  for p in $(cat /sys/fs/cgroup/pids/hyperbox-edge-bench/*/cgroup.procs 2>/dev/null); do kill -9 "$p"; done
  unmount_under "$work"
  rmdir /sys/fs/cgroup/*/hyperbox-edge-bench/* /sys/fs/cgroup/*/hyperbox-edge-bench 2>/dev/null
  rm -rf "$work"
  [ -n "$img" ] && rm -f "$img"
}
trap cleanup EXIT
# Everything (node state, repositories, the registry) lives on a fresh ext4 with a journal, the
# default of mkfs.ext4 and of a normal install. The host's root here is ext4 without a journal,
# where inode allocation skips every inode freed in the last minutes (ext4's recently_deleted
# check): after the test suite or an earlier run has deleted many files, each file creation
# costs up to a millisecond, and the figures depend on what ran before, not on this code.
if [ "${BENCH_FS:-fresh}" != host ]; then
  img=$(mktemp /tmp/hyperbox-edge-bench-fs.XXXXXX)
  truncate -s 4G "$img"
  mkfs.ext4 -q -F "$img"
  mount -o loop "$img" "$work"
fi
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1
run_dir=()
"$node" serve --help | grep -q -- --run-dir && run_dir=(--run-dir "$work/run")
"$node" --socket "$sock" serve --state-dir "$work/node" "${run_dir[@]}" --insecure-registry "$reg" \
  --cgroup-parent /hyperbox-edge-bench >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
"$node" --socket "$sock" pull "$reg/bench/busybox:1"
python3 tests/bench/edge.py "$node" "$op" "$sock" "$reg/bench/busybox:1" "$work"
