# Shared by the two soaks (run.sh: the edge path, kube.sh: the Kubernetes path). Sourced after
# tests/bench/lib.sh (for unmount_under).
#
#   chaos_setup PREFIX   sets bin (HYPERBOX_BIN_DIR, else a release build), seed (CHAOS_SEED,
#                        else random), work (a new /tmp/PREFIX.XXXXXX) and cg (a cgroup name)
#   chaos_cleanup        kills what the soak started and its containers, unmounts, removes the
#                        cgroups and the work dir (kept with CHAOS_KEEP=1); installed as the
#                        EXIT trap by chaos_setup, with the soak's own `chaos_extra_cleanup`
#                        (if defined) run first

chaos_setup() {
  local prefix=$1
  if [ -n "${HYPERBOX_BIN_DIR:-}" ]; then
    bin=$(cd "$HYPERBOX_BIN_DIR" && pwd)
  else
    nice -n 10 cargo build --release -p hyperbox-node -p hyperbox-operator
    bin=${CARGO_TARGET_DIR:-$PWD/target}/release
  fi
  for b in hyperbox-node hyperbox-operator; do
    [ -x "$bin/$b" ] || { echo "$bin/$b is missing" >&2; exit 1; }
  done
  seed=${CHAOS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
  work=$(mktemp -d "/tmp/$prefix.XXXXXX")
  cg=$prefix-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')
  trap chaos_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

chaos_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if declare -F chaos_extra_cleanup >/dev/null; then
    chaos_extra_cleanup
  fi
  # The daemons python started (it kills them itself unless it was killed).
  for f in "$work"/pids/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    kill -9 -- "-$p" 2>/dev/null
    kill -9 "$p" 2>/dev/null
  done
  # Forks of a node daemon that outlived it (runtime helpers that never exec'd) carry the
  # daemon's command line, which names the work dir.
  for f in /proc/[0-9]*/cmdline; do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = $$ ] && continue
    grep -qF -- "$work/" "$f" 2>/dev/null && kill -9 "$p" 2>/dev/null
  done
  # Containers outlive their node by design: kill them through their cgroups.
  for _ in 1 2 3; do
    for p in $(find /sys/fs/cgroup/pids/"$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
      kill -9 "$p" 2>/dev/null
    done
    sleep 0.2
  done
  unmount_under "$work"
  for d in /sys/fs/cgroup/*/"$cg"; do
    [ -d "$d" ] || continue
    find "$d" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
    rmdir "$d" 2>/dev/null
  done
  if [ "${CHAOS_KEEP:-0}" = 1 ]; then
    echo "work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
