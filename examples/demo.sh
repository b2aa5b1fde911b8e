#!/usr/bin/env bash
# HyperBox's main job on one machine (edge mode): a local Git repository of Workload manifests
# (examples/edge/apps) reconciled onto this node by hyperbox-operator + hyperbox-node.
#
#  1. start a local OCI registry and push the example image (busybox-static, umoci + skopeo)
#  2. start hyperbox-node, create a Git repo from examples/edge, start hyperbox-operator on it
#  3. show the workloads running
#  4. commit again: change one workload, remove another; show the node converging
# Ctrl-C (or the end) stops everything and cleans up. HYPERBOX_DEMO_WAIT=1 keeps it running.
# Needs root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-deps.sh
. tests/bench/lib.sh
cargo build --release -p hyperbox-node -p hyperbox-operator
node_bin=$PWD/target/release/hyperbox-node
op_bin=$PWD/target/release/hyperbox-operator

work=$(mktemp -d /tmp/hyperbox-demo.XXXXXX)
sock="$work/node.sock"
reg_pid="" node_pid="" op_pid=""
node() { "$node_bin" --socket "$sock" "$@"; }
cleanup() {
  trap - EXIT INT TERM
  echo; echo "== stopping: operator, workloads, node, registry"
  [ -n "$op_pid" ] && { kill "$op_pid" 2>/dev/null; wait "$op_pid" 2>/dev/null; } || true
  if [ -n "$node_pid" ]; then
    for w in $(node get -o json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(w["name"] for w in json.load(sys.stdin)))'); do
      node delete "$w" >/dev/null 2>&1 || true
    done
    kill "$node_pid" 2>/dev/null; wait "$node_pid" 2>/dev/null || true
  fi
  [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null || true
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; return 1
}

echo "== local OCI registry on 127.0.0.1:5050"
start_registry "$work/registry" 5050
tests/bench/build-busybox-image.sh 127.0.0.1:5050 hyperbox/busybox:demo

echo "== hyperbox-node (state in $work/node)"
metrics=127.0.0.1:$(free_port)
"$node_bin" --socket "$sock" serve --state-dir "$work/node" --run-dir "$work/run" \
  --insecure-registry 127.0.0.1:5050 --allow-host-path /etc/os-release \
  --metrics-listen "$metrics" >"$work/node.log" 2>&1 &
node_pid=$!
wait_for 10 "the node socket" test -S "$sock"

echo "== a Git repository made from examples/edge"
repo="$work/fleet"
git init -q -b main "$repo"
cp -r examples/edge/. "$repo/"
git -C "$repo" add -A
git -C "$repo" -c user.name=demo -c user.email=demo@hyperbox.invalid commit -q -m "fleet: hello, web, worker"
git -C "$repo" log --oneline

echo "== hyperbox-operator git --repo file://$repo --path apps"
"$op_bin" git --repo "file://$repo" --branch main --path apps --interval 2s \
  --node "unix://$sock" --state-dir "$work/operator" >"$work/operator.log" 2>&1 &
op_pid=$!
rev1=$(git -C "$repo" rev-parse HEAD)
wait_for 60 "the first sync" bash -c "'$op_bin' status --state-dir '$work/operator' -o json | grep -q '\"lastAppliedRevision\": \"$rev1\"'"
wait_for 60 "web to be ready" bash -c "'$node_bin' --socket '$sock' get web -o json | grep -q '\"ready\": true'"
"$op_bin" status --state-dir "$work/operator"
echo
node get -o wide
echo "== logs of hello"
node logs hello
echo "== the web workload answers"
busybox wget -q -O - http://127.0.0.1:8088/index.html
echo "== per-container telemetry (eBPF and cgroups) at http://$metrics/metrics"
node node | grep '^features'
busybox wget -q -O - "http://$metrics/metrics" |
  grep -E '^(hyperbox_container_process_execs_total|container_network_io_bytes_total|hyperbox_container_tcp_accepts_total|container_cpu_time_seconds_total)\{namespace="default",workload="web"' || true

echo
echo "== second commit: worker scaled to 1 replica, hello removed"
sed -i 's/replicas: 2/replicas: 1/' "$repo/apps/worker.yaml"
git -C "$repo" rm -q apps/hello.yaml
git -C "$repo" -c user.name=demo -c user.email=demo@hyperbox.invalid commit -q -am "fleet: scale worker, drop hello"
rev2=$(git -C "$repo" rev-parse HEAD)
wait_for 60 "the second sync" bash -c "'$op_bin' status --state-dir '$work/operator' -o json | grep -q '\"lastAppliedRevision\": \"$rev2\"'"
wait_for 30 "worker to converge" bash -c "'$node_bin' --socket '$sock' get worker -o json | python3 -c 'import json,sys; w=json.load(sys.stdin); sys.exit(0 if len(w[\"replicas\"])==1 and w[\"phase\"]==\"Running\" else 1)'"
"$op_bin" status --state-dir "$work/operator"
echo
node get -o wide

echo
echo "== third commit: worker scaled back to 2 with a new MODE: a rolling update"
sed -i 's/replicas: 1/replicas: 2/; s/value: demo}/value: demo-v2}/' "$repo/apps/worker.yaml"
git -C "$repo" -c user.name=demo -c user.email=demo@hyperbox.invalid commit -q -am "fleet: worker v2"
rev3=$(git -C "$repo" rev-parse HEAD)
wait_for 60 "the third sync" bash -c "'$op_bin' status --state-dir '$work/operator' -o json | grep -q '\"lastAppliedRevision\": \"$rev3\"'"
wait_for 60 "the worker rollout" bash -c "'$node_bin' --socket '$sock' get worker -o json | python3 -c 'import json,sys; w=json.load(sys.stdin); sys.exit(0 if w[\"updatedReplicas\"]==w[\"availableReplicas\"]==w[\"currentReplicas\"]==2 and w[\"observedGeneration\"]==w[\"generation\"] else 1)'"
node get worker -o json | python3 -c 'import json,sys; w=json.load(sys.stdin); print("worker generation %d: %d updated, %d available, %d containers" % (w["generation"], w["updatedReplicas"], w["availableReplicas"], w["currentReplicas"]))'
node get -o wide

if [ "${HYPERBOX_DEMO_WAIT:-0}" = 1 ]; then
  echo "== running; commit to $repo to change the fleet; Ctrl-C to stop"
  wait "$op_pid"
fi
