#!/usr/bin/env bash
# eBPF telemetry overhead, on vs off in the same run (see ebpf.py): exec/s of an exec-heavy
# container, loopback MiB/s of a network-heavy one, the whole machine's CPU time for each and
# at idle, and the daemon's memory with 100 and 1,000 containers; and what the kernel's timing
# of the programs costs by itself (empty programs: ebpf-floor.bpf.c, loaded by ebpf-floor.c).
# usage: sudo tests/bench/ebpf.sh [RUNS]      (default 3 runs per mode)
#   BIN=DIR  use DIR/hyperbox-node instead of building this tree
#   EXECS=10000 NET_MIB=256 NET_ROUNDS=16 IDLE_S=20 COUNTS=100,1000  sizes
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
RUNS=${1:-3}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node
  BIN=$PWD/target/release
fi
"$BIN/hyperbox-node" --version | grep -q '^  ebpf: built' || { echo "$BIN/hyperbox-node was built without eBPF" >&2; exit 1; }
work=$(mktemp -d /tmp/hyperbox-ebpf-bench.XXXXXX)
reg_pid=""
cleanup() {
  set +e
  [ -n "$reg_pid" ] && kill "$reg_pid"
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1
clang -O2 -g -target bpf -I"/usr/include/$(uname -m)-linux-gnu" -c tests/bench/ebpf-floor.bpf.c -o "$work/floor.bpf.o"
cc -O2 -Wall tests/bench/ebpf-floor.c -lbpf -o "$work/ebpf-floor"
python3 tests/bench/ebpf.py "$BIN/hyperbox-node" "$reg/bench/busybox:1" "$work" "$RUNS" "$work/ebpf-floor" "$work/floor.bpf.o"
