#!/usr/bin/env bash
# Kubernetes benchmark (see kube.py): COUNT Workloads over 3 node runtimes against a real
# kube-apiserver (tests/kube/cluster.sh), the operator and nodes under the chart's RBAC.
# Reports apply -> all Ready=True, the operator's peak RSS and steady-state API requests/s,
# as the median of RUNS separate runs (a fresh cluster each) with their spread.
# Published anchor: Flux reconciles 1,000 Kustomizations in 4m15s at 190 MiB.
# usage: sudo tests/bench/kube.sh [COUNT [MODE [RUNS]]]   MODE: suspended (default) | tiny
#        (BIN=DIR to use another build's binaries)
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-1000}
mode=${2:-suspended}
runs=${3:-3}
tests/install-deps.sh
. tests/bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p hyperbox-node -p hyperbox-operator
  BIN=$PWD/target/release
fi
work=$(mktemp -d /tmp/hyperbox-kube-bench.XXXXXX)
reg_pid=""
cleanup_run() {
  set +e
  for i in 0 1 2; do
    for p in $(cat /sys/fs/cgroup/pids/hyperbox-kube-bench-$i/*/cgroup.procs 2>/dev/null); do kill -9 "$p"; done
  done
  sleep 0.5
  unmount_under "$work/run"
  for i in 0 1 2; do
    rmdir /sys/fs/cgroup/*/hyperbox-kube-bench-$i/* /sys/fs/cgroup/*/hyperbox-kube-bench-$i \
      /sys/fs/cgroup/unified/hyperbox-kube-bench-$i/* /sys/fs/cgroup/unified/hyperbox-kube-bench-$i 2>/dev/null
  done
  tests/kube/cluster.sh down "$work/cluster" >/dev/null 2>&1
  rm -rf "$work/run"
  set -e
}
cleanup() {
  set +e
  cleanup_run
  [ -n "$reg_pid" ] && kill "$reg_pid"
  rm -rf "$work"
}
trap cleanup EXIT
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" bench/busybox:1 >/dev/null
results=()
for r in $(seq "$runs"); do
  HYPERBOX_KUBE_AUDIT=1 tests/kube/cluster.sh up "$work/cluster" 2>/dev/null
  "$work/cluster/bin/kubectl" --kubeconfig "$work/cluster/kubeconfig" apply -f crds/hyperbox.yaml >/dev/null
  "$work/cluster/bin/kubectl" --kubeconfig "$work/cluster/kubeconfig" wait --for condition=established \
    crd/workloads.hyperbox.dev crd/hypernodes.hyperbox.dev >/dev/null
  line=$(python3 tests/bench/kube.py "$BIN/hyperbox-node" "$BIN/hyperbox-operator" "$work/cluster" \
    "$reg/bench/busybox:1" "$count" "$mode" charts/hyperbox "$work/run")
  echo "run $r: $line"
  results+=("$line")
  cleanup_run
done
printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
rs = [json.loads(l) for l in sys.stdin if l.strip()]
def show(key, unit):
    v = sorted(r[key] for r in rs)
    print(f"{key}: median {statistics.median(v)}{unit} (min {v[0]}, max {v[-1]}, {len(v)} runs)")
first = rs[0]
print("%d workloads, %s, 3 node runtimes, real kube-apiserver" % (first["count"], first["mode"]))
for k, u in [("apply_s", " s"), ("ready_s", " s"), ("rss_mib", " MiB"), ("operator_rps", " req/s"), ("nodes_rps", " req/s"), ("quiet_cpu_s", " s"), ("resync_requests", ""), ("resync_cpu_s", " s")]:
    show(k, u)
print("replicas per node (last run):", rs[-1]["replicas_per_node"])
print("anchor: Flux, 1,000 Kustomizations in 255 s at 190 MiB (published)")
'
