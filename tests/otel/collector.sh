#!/usr/bin/env bash
# A real OpenTelemetry Collector for tests: OpenTelemetry Collector v0.161.0 (core
# go.opentelemetry.io/collector v0.161.0 with its stable modules at v1.67.0, and contrib
# exporter/fileexporter v0.161.0), built from main.go beside this file. Its only components are
# the OTLP receiver (HTTP and gRPC) and the file exporter.
#
# Why v0.161.0 and not the newest release: every collector module has to be at one release,
# and v0.161.0 is the newest release at which contrib's fileexporter resolves and passes
# `go mod tidy` from the Go module proxy (its later releases do not). The file exporter writes
# exactly what the collector received, as OTLP/JSON, which is what the tests check against.
#
#   tests/otel/collector.sh up DIR PORT   start; OTLP/HTTP on 127.0.0.1:PORT, OTLP/gRPC on
#                                         127.0.0.1:PORT+1; everything received (metrics,
#                                         traces, logs) is appended to DIR/out.json, one
#                                         OTLP/JSON object per line (resourceMetrics,
#                                         resourceSpans or resourceLogs); log in
#                                         DIR/collector.log, pid in DIR/pid; returns once the
#                                         HTTP port accepts connections
#   tests/otel/collector.sh down DIR      stop it; DIR and out.json are left in place
#   tests/otel/collector.sh build         only build (cached under $HYPERBOX_OTEL_CACHE)
#
# The binary is built once and kept in $HYPERBOX_OTEL_CACHE (default
# /var/cache/hyperbox-otel/<collector version>); the first build takes a few minutes on 2 cores.
# HYPERBOX_OTEL_BUILD_JOBS sets `go build -p` (default: the number of cores).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
otel_version=$(awk '($1 == "require" && $2 == "go.opentelemetry.io/collector/otelcol") {print $3} ($1 == "go.opentelemetry.io/collector/otelcol" && $2 ~ /^v/) {print $2}' "$here/go.mod" | head -1)
[ -n "$otel_version" ] || { echo "collector.sh: no go.opentelemetry.io/collector/otelcol version in $here/go.mod" >&2; exit 1; }
cache=${HYPERBOX_OTEL_CACHE:-/var/cache/hyperbox-otel/$otel_version}
bin=$cache/otelcol

build() {
  [ -x "$bin" ] && return
  command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
  command -v go >/dev/null || { echo "collector.sh: go is not installed (https://go.dev/dl)" >&2; exit 1; }
  mkdir -p "$cache"
  # Tests start collectors in parallel: one build at a time, the others wait and reuse it.
  exec 9>"$cache/.build.lock"
  flock 9
  if [ ! -x "$bin" ]; then
    echo "collector.sh: building the OpenTelemetry Collector ($otel_version) into $cache" >&2
    (cd "$here" && nice -n 10 go build -p "${HYPERBOX_OTEL_BUILD_JOBS:-$(nproc)}" -trimpath \
      -ldflags "-X main.version=$otel_version" -o "$bin.tmp" .) ||
      { rm -f "$bin.tmp"; echo "collector.sh: the build failed" >&2; exit 1; }
    mv "$bin.tmp" "$bin"
  fi
  flock -u 9
  exec 9>&-
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

up() {
  local dir=$1 port=$2
  case "$port" in '' | *[!0-9]*) echo "collector.sh: PORT must be a number, not '$port'" >&2; exit 2 ;; esac
  build
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "collector.sh: a collector is already running for $dir (pid $(cat "$dir/pid"))" >&2
    return 1
  fi
  if listening "$port"; then
    echo "collector.sh: 127.0.0.1:$port is already in use" >&2
    return 1
  fi
  # No telemetry of its own (its default would serve Prometheus metrics on :8888, which
  # collectors started in parallel would fight over).
  cat >"$dir/config.yaml.tmp" <<EOF
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:$port
      grpc:
        endpoint: 127.0.0.1:$((port + 1))
exporters:
  file:
    path: "$dir/out.json"
    format: json
    append: true
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    metrics:
      receivers: [otlp]
      exporters: [file]
    traces:
      receivers: [otlp]
      exporters: [file]
    logs:
      receivers: [otlp]
      exporters: [file]
EOF
  mv "$dir/config.yaml.tmp" "$dir/config.yaml"
  "$bin" --config "$dir/config.yaml" </dev/null >>"$dir/collector.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/pid"
  for _ in $(seq 240); do
    if listening "$port"; then
      echo "collector.sh: collector ready, OTLP/HTTP at http://127.0.0.1:$port, output in $dir/out.json" >&2
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "collector.sh: the collector did not listen on 127.0.0.1:$port within 60 s; $dir/collector.log:" >&2
    kill "$pid" 2>/dev/null || true
  else
    echo "collector.sh: the collector exited; $dir/collector.log:" >&2
  fi
  tail -40 "$dir/collector.log" >&2
  return 1
}

down() {
  local dir=$1 pid
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  # SIGTERM: the collector shuts down gracefully and the file exporter flushes out.json.
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "${1:-}" in
  up) [ -n "${2:-}" ] && [ -n "${3:-}" ] || { echo "usage: $0 up DIR PORT" >&2; exit 2; }; up "$2" "$3" ;;
  down) [ -n "${2:-}" ] || { echo "usage: $0 down DIR" >&2; exit 2; }; down "$2" ;;
  build) build; echo "$bin" ;;
  *) echo "usage: $0 up DIR PORT | down DIR | build" >&2; exit 2 ;;
esac
