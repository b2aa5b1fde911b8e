#!/usr/bin/env bash
# How much memory pressure the pressure tests' "starved" container makes, outside the node:
# READERS loops of `cat` over a 96 MiB file on a file-backed EROFS mount, in a v1 memory
# cgroup of 32 MiB (as the node's containers are on this hybrid host) and a v2 cgroup for PSI,
# optionally with their reads throttled (blkio v1) to imitate a slow disk.
#   tests/support/memory-pressure-probe.sh READERS [READ_BYTES_PER_SECOND]
# Prints the v2 cgroup's memory some/full avg10 and io some avg10 at 10, 20 and 30 s. Root only;
# drops the page cache first so that every run starts cold. RELIABILITY.md has the figures.
set -euo pipefail
readers=${1:?usage: $0 READERS [READ_BYTES_PER_SECOND]}
bps=${2:-}
work=$(mktemp -d)
name="hb-probe-$$"
v1=/sys/fs/cgroup/memory/$name
v2=/sys/fs/cgroup/unified/$name
blk=/sys/fs/cgroup/blkio/$name
cleanup() {
  for d in "$v1" "$v2" "$blk"; do
    [ -d "$d" ] || continue
    while read -r p; do kill -9 "$p" 2>/dev/null || true; done <"$d/cgroup.procs"
  done
  sleep 1
  rmdir "$v2" "$v1" "$blk" 2>/dev/null || true
  umount "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/src" "$work/mnt"
head -c $((96 << 20)) /dev/urandom >"$work/src/big"
mkfs.erofs -q "$work/img" "$work/src" >/dev/null 2>&1 || mkfs.erofs "$work/img" "$work/src" >/dev/null
mount -t erofs -o ro "$work/img" "$work/mnt"
mkdir -p "$v1" "$v2"
echo 32M >"$v1/memory.limit_in_bytes"
join="echo \$\$ > $v1/cgroup.procs; echo \$\$ > $v2/cgroup.procs"
if [ -n "$bps" ]; then
  mkdir -p "$blk"
  dev=$(stat -c '%d' "$work/img")
  echo "$((dev >> 8)):$((dev & 255)) $bps" >"$blk/blkio.throttle.read_bps_device"
  join="$join; echo \$\$ > $blk/cgroup.procs"
fi
sync
echo 3 >/proc/sys/vm/drop_caches
for _ in $(seq "$readers"); do
  sh -c "$join; exec sh -c 'while :; do cat $work/mnt/big > /dev/null; done'" &
done
field() { sed -n "s/^$1 avg10=\([0-9.]*\).*/\1/p" "$2"; }
for t in 10 20 30; do
  sleep 10
  echo "${t}s memory.some=$(field some "$v2/memory.pressure") memory.full=$(field full "$v2/memory.pressure") io.some=$(field some "$v2/io.pressure")"
done
