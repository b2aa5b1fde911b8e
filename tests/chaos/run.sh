#!/usr/bin/env bash
# Chaos soak (issue 6): a registry, a Git remote behind `git daemon`, hyperbox-node and
# hyperbox-operator, then ROUNDS rounds of one random disruption each (kill -9 of a daemon, a
# push, a registry or Git outage, a delete behind the operator's back), each followed by a
# settle and the invariant checks of tests/chaos/chaos.py. Exits non-zero on any violation.
#
# usage: sudo tests/chaos/run.sh [ROUNDS]         (default 20)
#   CHAOS_SEED=N         replay a run (the seed is printed first)
#   HYPERBOX_BIN_DIR=D   use the binaries in D (e.g. target/debug) instead of a release build
#   CHAOS_KEEP=1         keep the work dir (logs) after the run
#   CHAOS_STRESS_CREATE=N  instead of the soak, recreate one workload N times on the node alone
#                        and stop at the first create that hangs (CHAOS_HOLD=1 keeps it for gdb)
# Needs root on Linux (Debian 12): real containers, mounts and cgroups.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-20}
tests/install-deps.sh
. tests/bench/lib.sh
. tests/chaos/lib.sh
chaos_setup hyperbox-chaos

python3 tests/chaos/chaos.py --rounds "$rounds" --seed "$seed" --bin-dir "$bin" --work "$work" \
  --cgroup-parent "/$cg" --repo-root "$PWD" --stress-create "${CHAOS_STRESS_CREATE:-0}"
