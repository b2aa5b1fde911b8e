#!/usr/bin/env bash
# Layer store benchmarks (see layers.py), flattened store (one EROFS per image) against the
# layer store (one EROFS per layer, shared), in the same run:
#  (a) pull big:1 (3 layers, ~550 MB unpacked), then big:2 (the same 3 layers plus a layer
#      holding a 3-byte file): time and growth of the state dir
#  (b) cold preparation of big:1 against `skopeo copy` + `umoci unpack`, and against the time
#      the disk takes to write the image's bytes once (dd, fsync)
#  (c) a deploy loop: 20 versions that change only the top layer (1 MiB), pulled one after
#      the other: total time and disk growth
# usage: sudo tests/bench/layers.sh    (BIN=DIR: another build; ROUNDS=N, default 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node
  BIN=$PWD/target/release
fi
work=$(mktemp -d /tmp/hyperbox-layers-bench.XXXXXX)
reg_pid=""
cleanup() {
  set +e
  pkill -f "hyperbox-node --socket $work" 2>/dev/null
  sleep 1
  [ -n "$reg_pid" ] && kill "$reg_pid"
  unmount_under "$work"
  rmdir /sys/fs/cgroup/*/hyperbox-layers-bench 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
build_big_image "$work/big"
python3 tests/bench/layers.py "$BIN/hyperbox-node" "$reg" "$work/big/oci" "$work"
