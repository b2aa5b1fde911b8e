#!/usr/bin/env bash
# Coverage-guided fuzzing of HyperBox's untrusted-input parsers with libFuzzer on stable Rust.
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET]     (default 20)
#   FUZZ_PROFILE=dev tests/fuzz/run.sh 15      (unoptimized: builds in about half the time,
#                                               runs several times slower; what CI uses)
#
# Builds every target once, runs each for the given time and exits non-zero if any crashed
# (panic, failed property, timeout or out-of-memory). Crash inputs land in
# tests/fuzz/artifacts/<target>/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> artifacts/<target>/<file>
#
# cargo-fuzz needs nightly-only rustc flags (-Z...). RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept them, and `-s none` skips the sanitizers (AddressSanitizer needs a
# nightly-built std). Coverage instrumentation (sancov inline 8-bit counters, pc table,
# trace-compares) and `--cfg fuzzing` still apply, as do debug assertions.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
targets=(manifest api_body oci webhook layer)

if ! cargo fuzz --version >/dev/null 2>&1; then
  nice -n 10 cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
mode=()
if [[ ${FUZZ_PROFILE:-release} == dev ]]; then
  mode=(--dev)
fi
nice -n 10 cargo fuzz build -s none "${mode[@]}"

failed=()
for t in "${targets[@]}"; do
  # New inputs go to work/<t> (ignored by git); the checked-in seeds in corpus/<t> are read only.
  mkdir -p "work/$t" "artifacts/$t"
  echo "== fuzz $t for ${secs}s"
  if ! nice -n 10 cargo fuzz run -s none "${mode[@]}" "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: crashes in: ${failed[*]} (inputs under tests/fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crashes in ${targets[*]}"
