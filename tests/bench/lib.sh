# Shared by the demo and the benchmark scripts (source it).

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_registry DIR PORT: a docker-registry on 127.0.0.1:PORT storing in DIR; sets reg_pid.
start_registry() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
    "$dir/data" "$port" >"$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
  echo "registry on 127.0.0.1:$port did not start (see $dir/registry.log)" >&2
  return 1
}

# unmount_under DIR: lazily unmount everything mounted below DIR (deepest first).
unmount_under() {
  grep " $1" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}

# runc_bundle IMAGE DIR [readonly]: the peer's runtime bundle in DIR/runc-bundle, made from
# IMAGE (docker://…, plain HTTP) by skopeo and umoci, set to run `sleep 1000` without a
# terminal; `readonly` also makes its rootfs read-only (several containers share it).
runc_bundle() {
  local image=$1 dir=$2 readonly=${3:-}
  skopeo copy --quiet --src-tls-verify=false "docker://$image" "oci:$dir/peer-oci:1"
  umoci unpack --image "$dir/peer-oci:1" "$dir/runc-bundle" >/dev/null
  python3 - "$dir/runc-bundle/config.json" "$readonly" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["args"] = ["sleep", "1000"]
c["process"]["terminal"] = False
if sys.argv[2] == "readonly":
    c["root"]["readonly"] = True
json.dump(c, open(p, "w"))
PY
}

# build_big_image DIR: the big benchmark image in the OCI layout DIR/oci, tag 1: three layers
# from this machine's toolchain trees (/usr/include, /usr/lib/gcc, /usr/bin: a real, varied
# file mix), one per tree. Sets big_bytes (unpacked) and big_layers.
build_big_image() {
  local big=$1 tree
  umoci init --layout "$big/oci"
  umoci new --image "$big/oci:1"
  for tree in /usr/include /usr/lib/gcc /usr/bin; do
    # A fresh unpack per layer, so each repack adds exactly one tree as one layer.
    rm -rf "$big/bundle"
    umoci unpack --image "$big/oci:1" "$big/bundle" >/dev/null
    mkdir -p "$big/bundle/rootfs$tree"
    cp -a "$tree/." "$big/bundle/rootfs$tree/"
    umoci repack --image "$big/oci:1" "$big/bundle"
  done
  big_bytes=$(du -sb "$big/bundle/rootfs" | cut -f1)
  big_layers=$(python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=i["manifests"][0]["digest"].split(":")[1]; print(len(json.load(open(d+"/blobs/sha256/"+m))["layers"]))' "$big/oci")
  rm -rf "$big/bundle"
}
