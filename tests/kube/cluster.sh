#!/usr/bin/env bash
# A real Kubernetes control plane for tests: etcd (embedded, etcd/main.go) and kube-apiserver
# built from the k8s.io/kubernetes Go module (go.mod pins every staging module), on loopback,
# the way envtest starts them: a generated service-account key pair, a token file with an
# admin, RBAC on, a self-signed serving certificate. No kubelet, no controller-manager.
#
#   tests/kube/cluster.sh up DIR     start; writes DIR/kubeconfig (admin) and DIR/bin/kubectl,
#                                    returns once /readyz answers
#   tests/kube/cluster.sh down DIR   stop and remove DIR
#   tests/kube/cluster.sh restart-apiserver DIR   stop the API server and start it again
#   tests/kube/cluster.sh build      only build (cached under $HYPERBOX_KUBE_CACHE)
#
# The binaries are built once and kept in $HYPERBOX_KUBE_CACHE (default
# /var/cache/hyperbox-kube/<k8s version>); the first build takes about 3 minutes on 2 cores.
# With KUBEBUILDER_ASSETS naming a directory that holds kube-apiserver and etcd (what
# setup-envtest installs), those are used instead, and kubectl too if it is there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
k8s_version=$(awk '($1 == "require" && $2 == "k8s.io/kubernetes") {print $3} ($1 == "k8s.io/kubernetes" && $2 ~ /^v/) {print $2}' "$here/go.mod" | head -1)
[ -n "$k8s_version" ] || { echo "cluster.sh: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }
cache=${HYPERBOX_KUBE_CACHE:-/var/cache/hyperbox-kube/$k8s_version}

# Binaries: kube-apiserver and etcd from $KUBEBUILDER_ASSETS when it has them (what
# setup-envtest installs), else built; kubectl, helm and argolua always from the cache.
build() {
  local assets=${KUBEBUILDER_ASSETS:-}
  if [ -n "$assets" ] && [ -x "$assets/kube-apiserver" ] && [ -x "$assets/etcd" ]; then
    server_bin=$assets
  else
    server_bin=$cache
  fi
  bin=$cache
  built && return
  command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
  command -v go >/dev/null || { echo "cluster.sh: go is not installed (https://go.dev/dl)" >&2; exit 1; }
  mkdir -p "$cache"
  # Tests start clusters in parallel: one build at a time, the others wait and reuse it.
  exec 9>"$cache/.build.lock"
  flock 9
  if built; then
    flock -u 9
    return
  fi
  local v=${k8s_version#v} ld
  # Without these the API server reports v0.0.0-master, which version-skew checks refuse.
  ld="-X k8s.io/component-base/version.gitVersion=$k8s_version"
  ld="$ld -X k8s.io/component-base/version.gitMajor=${v%%.*}"
  ld="$ld -X k8s.io/component-base/version.gitMinor=$(echo "$v" | cut -d. -f2)"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
  if [ "$server_bin" = "$cache" ] && { [ ! -x "$cache/kube-apiserver" ] || [ ! -x "$cache/etcd" ]; }; then
    echo "cluster.sh: building kube-apiserver and etcd ($k8s_version) into $cache" >&2
    (cd "$here" && go build -ldflags "$ld" -o "$cache/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver &&
      go build -o "$cache/etcd.tmp" ./etcd)
    for b in kube-apiserver etcd; do mv "$cache/$b.tmp" "$cache/$b"; done
  fi
  if [ ! -x "$cache/kubectl" ]; then
    echo "cluster.sh: building kubectl ($k8s_version) into $cache" >&2
    (cd "$here" && go build -ldflags "$ld" -o "$cache/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl)
    mv "$cache/kubectl.tmp" "$cache/kubectl"
  fi
  # helm (its own module: its k8s.io requirements differ from the API server's), and the
  # Lua VM Argo CD embeds, for the health check.
  local hv
  hv=$(helm_version)
  if [ ! -x "$cache/helm-$hv" ]; then
    echo "cluster.sh: building helm $hv into $cache" >&2
    (cd "$here/helm" && go build -ldflags "-X helm.sh/helm/v3/internal/version.version=$hv" -o "$cache/helm.tmp" helm.sh/helm/v3/cmd/helm)
    mv "$cache/helm.tmp" "$cache/helm-$hv"
  fi
  ln -sf "helm-$hv" "$cache/helm"
  if [ ! -x "$cache/argolua" ]; then
    (cd "$here/argolua" && go build -o "$cache/argolua.tmp" .)
    mv "$cache/argolua.tmp" "$cache/argolua"
  fi
  flock -u 9
}

helm_version() {
  awk '($1 == "require" && $2 == "helm.sh/helm/v3") {print $3} $1 == "helm.sh/helm/v3" {print $2}' "$here/helm/go.mod" | head -1
}

# Whether every binary is there.
built() {
  [ -x "$server_bin/kube-apiserver" ] && [ -x "$server_bin/etcd" ] || return 1
  local b
  for b in kubectl "helm-$(helm_version)" argolua; do
    [ -x "$cache/$b" ] || return 1
  done
  [ -L "$cache/helm" ] || ln -sf "helm-$(helm_version)" "$cache/helm"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The admin kubeconfig, trusting the self-signed serving certificate (and its CA) that the
# API server wrote at start.
write_kubeconfig() {
  local dir=$1 port=$2 token=$3
  cat >"$dir/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: hyperbox-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 "$dir/certs/apiserver.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: hyperbox-test
  context: {cluster: hyperbox-test, user: admin}
current-context: hyperbox-test
EOF
  mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
}

up() {
  local dir=$1
  build
  mkdir -p "$dir/bin" "$dir/certs"
  dir=$(cd "$dir" && pwd)
  for b in kubectl helm argolua; do ln -sf "$cache/$b" "$dir/bin/$b"; done
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  local token
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin-uid,system:masters" >"$dir/tokens.csv"
  # Two HyperBox nodes outside the cluster, each with its own credential: user
  # hyperbox:node:<name> in group hyperbox:nodes, as a client certificate with that CN and O
  # would name them (the chart's node identity policy checks the name).
  for n in edge-a edge-b; do
    echo "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'),hyperbox:node:$n,$n-uid,hyperbox:nodes" >>"$dir/tokens.csv"
  done
  local etcd_port peer_port api_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  "$server_bin/etcd" --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  echo "$etcd_port $api_port" >"$dir/ports"
  if [ -n "${HYPERBOX_KUBE_AUDIT:-}" ]; then
    # Every request's metadata (who, verb, resource) in DIR/audit.log: what the benchmarks
    # count requests per client with.
    printf 'apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n' >"$dir/audit-policy.yaml"
  fi
  start_apiserver "$dir" || { down "$dir"; return 1; }
  write_kubeconfig "$dir" "$api_port" "$token"
  echo "cluster.sh: API server ready at https://127.0.0.1:$api_port ($dir/kubeconfig)" >&2
}

# Start kube-apiserver on the ports in DIR/ports and wait for /readyz.
start_apiserver() {
  local dir=$1 etcd_port api_port token
  read -r etcd_port api_port <"$dir/ports"
  token=$(head -1 "$dir/tokens.csv" | cut -d, -f1)
  local audit=()
  if [ -f "$dir/audit-policy.yaml" ]; then
    audit=(--audit-policy-file="$dir/audit-policy.yaml" --audit-log-path="$dir/audit.log" --audit-log-maxsize=1000)
  fi
  "$server_bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --cert-dir="$dir/certs" \
    --secure-port="$api_port" --bind-address=127.0.0.1 \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    ${audit[@]+"${audit[@]}"} >>"$dir/apiserver.log" 2>&1 &
  echo $! >"$dir/apiserver.pid"
  for _ in $(seq 120); do
    if curl -sfk -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || break
    sleep 0.5
  done
  echo "cluster.sh: the API server did not become ready; last lines of $dir/apiserver.log:" >&2
  tail -20 "$dir/apiserver.log" >&2
  return 1
}

# Stop the API server (SIGTERM, then SIGKILL) and start it again: same port, certificate and
# etcd data; what clients see is a real API server restart.
restart_apiserver() {
  local dir=$1 pid
  build
  pid=$(cat "$dir/apiserver.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  start_apiserver "$dir"
}

down() {
  local dir=$1
  [ -d "$dir" ] || return 0
  for p in apiserver etcd; do
    if [ -f "$dir/$p.pid" ]; then
      kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$(cat "$dir/$p.pid")" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$(cat "$dir/$p.pid")" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

case "${1:-}" in
  up) [ -n "${2:-}" ] || { echo "usage: $0 up DIR" >&2; exit 2; }; up "$2" ;;
  down) [ -n "${2:-}" ] || { echo "usage: $0 down DIR" >&2; exit 2; }; down "$2" ;;
  restart-apiserver) [ -n "${2:-}" ] || { echo "usage: $0 restart-apiserver DIR" >&2; exit 2; }; restart_apiserver "$2" ;;
  build) build; echo "$cache" ;;
  *) echo "usage: $0 up DIR | down DIR | restart-apiserver DIR | build" >&2; exit 2 ;;
esac
