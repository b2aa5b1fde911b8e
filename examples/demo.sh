#!/usr/bin/env bash
# HyperBox's main job on one machine: start a registry with an example image, start the node
# runtime, apply the example Workloads and watch them run. Ctrl-C (or the end) cleans up:
# workloads deleted, daemon and registry stopped. Needs root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-deps.sh
cargo build --release -p hyperbox-node
node=target/release/hyperbox-node

work=$(mktemp -d /tmp/hyperbox-demo.XXXXXX)
sock="$work/node.sock"
registry_pid="" node_pid=""
cleanup() {
  trap - EXIT INT TERM
  echo; echo "== cleaning up"
  if [ -n "$node_pid" ]; then
    for w in hello web worker; do "$node" --socket "$sock" delete "$w" 2>/dev/null || true; done
    kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true
  fi
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== starting a local OCI registry on 127.0.0.1:5050"
mkdir -p "$work/registry"
cat >"$work/registry/config.yml" <<CFG
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry/data}}
http: {addr: 127.0.0.1:5050}
CFG
docker-registry serve "$work/registry/config.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/5050) 2>/dev/null && break; sleep 0.1; done

echo "== building and pushing the example image (busybox-static, umoci + skopeo)"
tests/bench/build-busybox-image.sh 127.0.0.1:5050 hyperbox/busybox:demo

echo "== starting hyperbox-node (state in $work/state)"
"$node" --socket "$sock" serve --state-dir "$work/state" --insecure-registry 127.0.0.1:5050 \
  >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

for f in examples/workloads/*.yaml; do
  echo "== hyperbox-node apply -f $f"
  "$node" --socket "$sock" apply -f "$f"
done
sleep 3
echo "== hyperbox-node get -o wide"
"$node" --socket "$sock" get -o wide
echo "== hyperbox-node logs hello"
"$node" --socket "$sock" logs hello
echo "== hyperbox-node logs worker"
"$node" --socket "$sock" logs worker --tail 200
echo "== curl the web workload (readiness probe passed)"
busybox wget -q -O - http://127.0.0.1:8088/index.html || true
echo "== hyperbox-node node"
"$node" --socket "$sock" node
echo "== changing the worker (2 -> 1 replica): the node replaces its containers"
sed 's/replicas: 2/replicas: 1/' examples/workloads/worker.yaml | "$node" --socket "$sock" apply -f -
"$node" --socket "$sock" get
if [ "${HYPERBOX_DEMO_WAIT:-0}" = 1 ]; then
  echo "== running; Ctrl-C to stop"; wait "$node_pid"
fi
