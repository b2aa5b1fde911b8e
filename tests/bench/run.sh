#!/usr/bin/env bash
# Node runtime benchmarks, each against a peer on the same machine in the same run:
#  (a) apply -> container process running, image cached   vs  `runc run -d` of the same bundle
#  (b) cold image preparation (pull + unpack + EROFS + mount) of a ~500 MB, 3-layer image
#      vs  `skopeo copy` + `umoci unpack` from the same registry
# Prints medians and ratios; hyperfine JSON goes to $OUT (default target/bench).
# usage: sudo tests/bench/run.sh [--quick]
#   BIN=DIR  use DIR/hyperbox-node (another build, for an A/B comparison in the same session)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs_a=30 runs_b=5
[ "${1:-}" = --quick ] && runs_a=10 runs_b=2
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node
  BIN=$PWD/target/release
fi
node=$BIN/hyperbox-node
out=${OUT:-$PWD/target/bench}
mkdir -p "$out"
work=$(mktemp -d /tmp/hyperbox-bench.XXXXXX)
sock=$work/node.sock
reg_pid="" node_pid=""
cleanup() {
  set +e
  [ -n "$node_pid" ] && { "$node" --socket "$sock" delete bench >/dev/null 2>&1; kill "$node_pid"; wait "$node_pid"; }
  runc delete -f hb-bench-runc >/dev/null 2>&1
  [ -n "$reg_pid" ] && kill "$reg_pid"
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"

echo "== images"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1
# The big image: three layers from this machine's toolchain trees (a real, varied file mix).
big=$work/big
build_big_image "$big"
layers=$big_layers
skopeo copy --quiet --dest-tls-verify=false "oci:$big/oci:1" "docker://$reg/bench/big:1"
rm -rf "$big"
echo "big image: $layers layers, $((big_bytes / 1000000)) MB unpacked"

echo "== node"
"$node" --socket "$sock" serve --state-dir "$work/state" --insecure-registry "$reg" \
  --image-keep-for 1h >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
"$node" --socket "$sock" pull "$reg/bench/busybox:1"

echo "== (a) apply -> running, cached image"
cat >"$work/bench.yaml" <<YAML
apiVersion: hyperbox.dev/v1alpha1
kind: Workload
metadata: {name: bench}
spec:
  image: $reg/bench/busybox:1
  command: [sleep, '1000']
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
YAML
hyperfine --style basic --warmup 3 --runs "$runs_a" --export-json "$out/start-hyperbox.json" \
  --prepare "$node --socket $sock delete bench >/dev/null 2>&1 || true" \
  "$node --socket $sock apply -f $work/bench.yaml"
# The peer: the same image unpacked by umoci into a runtime bundle, run by runc.
runc_bundle "$reg/bench/busybox:1" "$work"
hyperfine --style basic --warmup 3 --runs "$runs_a" --export-json "$out/start-runc.json" \
  --prepare "runc delete -f hb-bench-runc >/dev/null 2>&1 || true" \
  "runc run -d --bundle $work/runc-bundle hb-bench-runc"
runc delete -f hb-bench-runc >/dev/null 2>&1 || true
if command -v crun >/dev/null; then
  crun run -d --bundle "$work/runc-bundle" hb-bench-crun 2>&1 | head -1 || true
  crun delete -f hb-bench-crun >/dev/null 2>&1 || true
else
  echo "crun: not measured (Debian's crun 1.8 refuses this hybrid cgroup host: see STACK.md)"
fi
"$node" --socket "$sock" delete bench >/dev/null

echo "== (b) cold image preparation: pull + verify + unpack + EROFS + mount"
hyperfine --style basic --runs "$runs_b" --export-json "$out/pull-hyperbox.json" \
  --prepare "$node --socket $sock rmi $reg/bench/big:1 >/dev/null 2>&1 || true; sync" \
  "$node --socket $sock pull $reg/bench/big:1"
hyperfine --style basic --runs "$runs_b" --export-json "$out/pull-skopeo-umoci.json" \
  --prepare "rm -rf $work/peer-big $work/peer-big-bundle; sync" \
  "skopeo copy --quiet --src-tls-verify=false docker://$reg/bench/big:1 oci:$work/peer-big:1 && umoci unpack --image $work/peer-big:1 $work/peer-big-bundle >/dev/null"
grep "image prepared" "$work/node.log" | tail -1

python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
def med(name):
    r = json.load(open(os.path.join(out, name)))["results"][0]
    return r["median"], r["min"], r["max"]
a, b = med("start-hyperbox.json"), med("start-runc.json")
c, d = med("pull-hyperbox.json"), med("pull-skopeo-umoci.json")
print()
print("| path | hyperbox median | peer median | ratio |")
print("|---|---|---|---|")
print(f"| apply -> running (cached) | {a[0]*1000:.1f} ms | runc run -d: {b[0]*1000:.1f} ms | {a[0]/b[0]:.2f}x |")
print(f"| cold pull+unpack+EROFS+mount | {c[0]:.2f} s | skopeo copy + umoci unpack: {d[0]:.2f} s | {c[0]/d[0]:.2f}x |")
PY
