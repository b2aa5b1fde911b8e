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
