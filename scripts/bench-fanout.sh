#!/usr/bin/env bash
# Runs the fan-out benchmark of BENCHMARKS.md: imq dev pinned to core 0, the
# load generator pinned to core 1. Extra arguments go to imqbench.
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/imq ./cmd/imq
go build -o bin/imqbench ./cmd/imqbench
port=${IMQ_BENCH_PORT:-18080}
iport=$((port + 1)) # the gateway's internal listener: /metrics
${IMQ_BENCH_ENV:-} taskset -c 0 bin/imq dev --addr 127.0.0.1:$port --internal-addr 127.0.0.1:$iport --link-addr 127.0.0.1:0 --log-level warn >/tmp/imq-bench-server.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
	curl -sf http://127.0.0.1:$port/healthz >/dev/null && break
	sleep 0.1
done
echo "machine: $(nproc) cores, $(grep 'model name' /proc/cpuinfo | head -1 | cut -d: -f2 | xargs), $(uname -r)"
echo "server: bin/imq dev pinned to core 0 (pid $server); load: bin/imqbench pinned to core 1"
taskset -c 1 bin/imqbench --url ws://127.0.0.1:$port/ws --metrics-url http://127.0.0.1:$iport/metrics --server-pid "$server" "$@"
