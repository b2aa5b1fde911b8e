#!/usr/bin/env bash
# In-place upgrade test (issue 11): the old package's node daemon runs two workloads, the new
# package is installed over it, the daemon is restarted as systemd's try-restart does under
# KillMode=process (SIGTERM to the main process only), and the new daemon, started from the
# new package's unit ExecStart with its config file, re-adopts both containers: same
# container ids, same pids, no restart.
#
#   tests/install/upgrade.sh      (as root; HYPERBOX_BIN_DIR=DIR to test prebuilt binaries)
#
# The two packages are built from the same binaries with different Debian revisions (-1, -2):
# dpkg performs a real upgrade (prerm upgrade, new files, postinst configure OLD-VERSION), but
# the daemon code on both sides is this tree's. Same refusals and cleanup as run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

step() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }

tests/install-deps.sh
. tests/bench/lib.sh

if dpkg-query -W -f='${Status}' hyperbox 2>/dev/null | grep -qv "not-installed"; then
  fail "the hyperbox package is installed here; this test installs and purges it: remove it first"
fi
[[ ! -e /etc/hyperbox ]] || fail "/etc/hyperbox exists; this test would purge it: move it away first"
preexisting_state=0
[[ ! -e /var/lib/hyperbox && ! -e /var/lib/hyperbox-operator ]] || preexisting_state=1

target="${CARGO_TARGET_DIR:-$repo/target}"
if [[ -n "${HYPERBOX_BIN_DIR:-}" ]]; then
  bin_dir="$HYPERBOX_BIN_DIR"
else
  cargo build -q -p hyperbox-node -p hyperbox-operator
  bin_dir="$target/debug"
fi

work="$(mktemp -d /tmp/hyperbox-upgrade.XXXXXX)"
cg="hyperbox-upgrade-test-$$"
sock="$work/run/node.sock"
installed=0
node_pid="" reg_pid=""
cleanup() {
  set +e
  if [[ -n "$node_pid" ]] && kill -0 "$node_pid" 2>/dev/null; then
    for w in sleeper-a sleeper-b; do
      timeout 30 /usr/bin/hyperbox-node --socket "$sock" delete "$w" >/dev/null 2>&1
    done
    kill "$node_pid"
    wait "$node_pid"
  fi
  # Containers outlive the node by design: kill what is left through their cgroups.
  for _ in 1 2 3; do
    for p in $(cat /sys/fs/cgroup/pids/"$cg"/*/cgroup.procs /sys/fs/cgroup/"$cg"/*/cgroup.procs 2>/dev/null); do
      kill -9 "$p" 2>/dev/null
    done
    sleep 0.2
  done
  [[ -n "$reg_pid" ]] && kill "$reg_pid" 2>/dev/null
  unmount_under "$work"
  for d in /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg"; do
    [[ -d "$d" ]] || continue
    find "$d" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
    rmdir "$d" 2>/dev/null
  done
  if ((installed)); then
    dpkg -P hyperbox >/dev/null 2>&1
    ((preexisting_state)) || rm -rf --one-file-system /var/lib/hyperbox /var/lib/hyperbox-operator
  fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

step "two package builds and a registry with a busybox image"
old_deb="$(node-runtime/packaging/build-deb.sh --bin-dir "$bin_dir" --out "$work/deb" --revision 1)"
new_deb="$(node-runtime/packaging/build-deb.sh --bin-dir "$bin_dir" --out "$work/deb" --revision 2)"
port="$(free_port)"
reg="127.0.0.1:$port"
start_registry "$work/registry" "$port"
tests/bench/build-busybox-image.sh "$reg" upgrade/busybox:1

step "the old package's node runs two workloads"
installed=1
dpkg -i "$old_deb" >/dev/null
old_version="$(dpkg-query -W -f='${Version}' hyperbox)"
# The admin's settings, in the config file (a modified conffile: the upgrade keeps it).
cat >>/etc/hyperbox/node.toml <<TOML
socket = "$sock"
state-dir = "$work/state"
run-dir = "$work/run"
cgroup-parent = "/$cg"
insecure-registry = ["$reg"]
TOML
start_node() {
  tests/install/execstart.py /lib/systemd/system/hyperbox-node.service 2>>"$work/node.log" &
  node_pid=$!
  wait_for 30 /usr/bin/hyperbox-node --socket "$sock" node || {
    cat "$work/node.log" >&2
    fail "the node did not serve $sock"
  }
}
start_node
for w in sleeper-a sleeper-b; do
  cat <<YAML
---
apiVersion: hyperbox.dev/v1alpha1
kind: Workload
metadata:
  name: $w
spec:
  image: $reg/upgrade/busybox:1
  command: [sleep, "100000"]
  network: none
YAML
done >"$work/workloads.yaml"
/usr/bin/hyperbox-node --socket "$sock" apply -f "$work/workloads.yaml" --timeout 120s >&2
# name containerId pid, one line per replica, sorted.
replicas() {
  /usr/bin/hyperbox-node --socket "$sock" get -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)
items = items.get("items", items) if isinstance(items, dict) else items
for w in sorted(items, key=lambda w: w["name"]):
    for r in w["replicas"]:
        if r.get("phase") != "Running" or not r.get("containerId") or not r.get("pid"):
            sys.exit("%s: replica %s is %s" % (w["name"], r["index"], r.get("phase")))
        print(w["name"], r["containerId"], r["pid"], w["restarts"])
'
}
wait_for 60 replicas || fail "the workloads did not run: $(replicas 2>&1)"
before="$(replicas)"
echo "$before" >&2
[[ "$(wc -l <<<"$before")" == 2 ]] || fail "want two running replicas: $before"
# Why KillMode=process: where the host tracks services in a v2 tree (hybrid or pure v2), say
# whether the containers left the daemon's cgroup there. Under systemd that cgroup is the unit's.
read -r _ _ first_pid _ <<<"$before"
daemon_cg="$(sed -n 's/^0:://p' "/proc/$node_pid/cgroup")"
container_cg="$(sed -n 's/^0:://p' "/proc/$first_pid/cgroup")"
echo "v2 cgroup of the daemon: ${daemon_cg:-none}; of a container: ${container_cg:-none}" >&2

step "install the new package over the old one"
dpkg -i "$new_deb" >/dev/null
new_version="$(dpkg-query -W -f='${Version}' hyperbox)"
[[ "$old_version" != "$new_version" ]] || fail "not an upgrade: $old_version -> $new_version"
grep -qx "cgroup-parent = \"/$cg\"" /etc/hyperbox/node.toml || fail "node.toml edits lost by the upgrade"
kill -0 "$node_pid" || fail "the upgrade stopped the old daemon (only a restart may)"
echo "ok: $old_version -> $new_version; the old daemon still runs" >&2

step "restart as systemd does with KillMode=process: SIGTERM to the daemon only"
kill -TERM "$node_pid"
wait "$node_pid" || fail "the old daemon exited non-zero: $(tail -5 "$work/node.log")"
node_pid=""
while read -r name id pid restarts; do
  kill -0 "$pid" 2>/dev/null || fail "$name's container (pid $pid) died with the daemon"
done <<<"$before"
echo "ok: both containers outlive the daemon" >&2
start_node
wait_for 60 replicas || fail "the new daemon does not run the workloads: $(replicas 2>&1)"
after="$(replicas)"
echo "$after" >&2
[[ "$after" == "$before" ]] || fail "containers changed across the upgrade: before: $before; after: $after"
grep -q "adopt" "$work/node.log" || echo "note: the node log does not mention adoption" >&2
echo "PASS: in-place upgrade: same container ids and pids, no restarts" >&2
