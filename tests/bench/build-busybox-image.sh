#!/usr/bin/env bash
# Build a busybox-static OCI image with umoci and push it with skopeo.
# usage: build-busybox-image.sh REGISTRY_ADDR REPO:TAG [PAD_MB]
# PAD_MB adds /pad, that many MiB of random bytes (a slower pull, and a unique digest).
set -euo pipefail
addr=$1 ref=$2 pad_mb=${3:-0}
tag=${ref##*:}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/oci"
umoci new --image "$work/oci:$tag"
umoci unpack --image "$work/oci:$tag" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/www"
chmod 1777 "$root/tmp"
if [ "$pad_mb" -gt 0 ]; then
  head -c "$((pad_mb << 20))" /dev/urandom >"$root/pad"
fi
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' >"$root/etc/group"
umoci repack --image "$work/oci:$tag" "$work/bundle"
umoci config --image "$work/oci:$tag" --config.cmd sh --config.env PATH=/bin:/usr/bin
skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:$tag" "docker://$addr/$ref"
