#!/usr/bin/env bash
# Installs what HyperBox builds and tests with (Debian 12). Idempotent: only missing packages
# are installed. Needs root.
set -euo pipefail

packages=(
  # build (clang, libbpf headers and bpftool compile the eBPF programs in ebpf/)
  libseccomp-dev pkg-config libssl-dev zlib1g-dev git clang libbpf-dev bpftool
  # runtime: EROFS images
  erofs-utils
  # tests: a real registry, image tools, a static userland, htpasswd for registry auth
  docker-registry skopeo umoci busybox-static apache2-utils
  # tests: a real ssh server for git over ssh
  openssh-server openssh-client
  # tests: a real Prometheus to scrape /metrics; iptables drops packets to force TCP retransmits
  prometheus iptables
  # benchmarks: the peer runtime, a timer, load
  runc hyperfine stress-ng time
  # tests: an operator whose clock runs ahead (clock skew)
  faketime
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a registry service on :5000 where systemd runs; tests start their own.
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
# The real Kubernetes control plane the kube tests start (etcd, kube-apiserver, kubectl built
# from the Go modules; about 3 minutes the first time, cached in /var/cache/hyperbox-kube).
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH=$PATH:/usr/local/go/bin
fi
"$(dirname "$0")/kube/cluster.sh" build >/dev/null
# A real OpenTelemetry Collector for the telemetry tests (built from the collector's Go modules,
# about a minute the first time, cached in /var/cache/hyperbox-otel).
"$(dirname "$0")/otel/collector.sh" build >/dev/null
