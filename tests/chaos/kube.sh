#!/usr/bin/env bash
# Chaos soak of the Kubernetes path (issue 20): a real API server, three nodes and two
# operators electing a leader, then ROUNDS rounds of one disruption each (kill -9 of the
# leader, the standby or a node; API server restarts; the leader cut off from the API server;
# the leader's clock 5 minutes ahead; a node's heartbeats cut while it stays reachable;
# rollouts), each followed by a settle and the invariant checks of tests/chaos/kube_chaos.py.
# Exits non-zero on any violation.
#
# usage: sudo tests/chaos/kube.sh [ROUNDS]        (default 20)
#   CHAOS_SEED=N         replay a run (the seed is printed first)
#   HYPERBOX_BIN_DIR=D   use the binaries in D (e.g. target/debug) instead of a release build
#   CHAOS_KEEP=1         keep the work dir (logs) after the run
# Needs root on Linux (Debian 12): real containers, mounts and cgroups.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-20}
tests/install-deps.sh
tests/kube/cluster.sh build >/dev/null
. tests/bench/lib.sh
. tests/chaos/lib.sh
# The API server and etcd go first.
chaos_extra_cleanup() {
  tests/kube/cluster.sh down "$work/kube" >/dev/null 2>&1
}
chaos_setup hyperbox-kchaos

python3 tests/chaos/kube_chaos.py --rounds "$rounds" --seed "$seed" --bin-dir "$bin" --work "$work" \
  --cgroup-parent "/$cg" --repo-root "$PWD"
