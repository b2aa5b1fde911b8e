#!/usr/bin/env bash
# The whole test suite: lint, unit tests, and end-to-end tests against a real registry,
# real containers, mounts and cgroups. Run as root on Linux (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fresh run takes about 6 GiB here (the debug build, the test builds and the fuzz build);
# the disk is shared, so say what there was if it runs out.
echo "free disk: $(df -h --output=avail . | tail -1 | tr -d ' ') (a fresh run needs about 6 GiB)" >&2
tests/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The e2e tests run the built binaries.
cargo build --workspace
# With arguments, they pick what to test (e.g. -p hyperbox-e2e --test edge_git).
if (($#)); then
  cargo test "$@"
else
  # Every stage runs even when one before it failed, and `cargo test` goes on past a failing
  # test binary (--no-fail-fast): one report shows every failure, not only the first.
  failed=()
  stage() {
    local name=$1
    shift
    echo "== $name" >&2
    "$@" || failed+=("$name")
  }
  stage "cargo test" cargo test --workspace --no-fail-fast
  # Edge install: the Debian package built from the debug build made above, installed,
  # checked (files, modes, completions, man pages, systemd-analyze verify, the units'
  # ExecStart lines run as written), removed and purged again (about 30 s).
  export HYPERBOX_BIN_DIR="${CARGO_TARGET_DIR:-target}/debug"
  stage "install" tests/install/run.sh
  # In-place upgrade: two package builds; the new node daemon re-adopts the old one's two
  # running containers (same ids and pids) after a KillMode=process restart (about 1 min).
  stage "upgrade" tests/install/upgrade.sh
  # Chaos soak: 20 rounds of kill -9, pushes, outages and drift deletes, on the debug build
  # made above (no release build in CI).
  stage "chaos" tests/chaos/run.sh 20
  # The Kubernetes path's soak: 20 rounds of leader and node kills, API server restarts,
  # leader cut-offs, clock skew, lost heartbeats and rollouts (about 3 min).
  stage "kube chaos" tests/chaos/kube.sh 20
  # A short coverage-guided fuzz of every untrusted-input parser (15 s each; an unoptimized
  # build because building dominates a run this short).
  stage "fuzz" env FUZZ_PROFILE=dev tests/fuzz/run.sh 15
  if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
  fi
  echo "all stages passed" >&2
fi
