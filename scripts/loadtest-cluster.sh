#!/usr/bin/env bash
# Runs `imq loadtest` against `imq cluster` (a boss, queue nodes and gateways
# as separate processes) the way scripts/loadtest-dev.sh runs it against
# `imq dev`: every cluster process pinned to core 0, the load generator to
# core 1, so the two are comparable. Bots are spread over the gateways.
# IMQ_NODES and IMQ_GATEWAYS size the cluster (default 2 and 2); arguments go
# to loadtest. Prints the cluster's total CPU time over the run.
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/imq ./cmd/imq
dir=$(mktemp -d /tmp/imq-loadtest-cluster.XXXXXX)
taskset -c 0 bin/imq cluster --queuenodes "${IMQ_NODES:-2}" --gateways "${IMQ_GATEWAYS:-2}" --dir "$dir" \
	>"$dir/cluster.out" 2>&1 &
launcher=$!
trap 'kill -INT $launcher 2>/dev/null; wait $launcher 2>/dev/null || true' EXIT
for _ in $(seq 300); do
	grep -q '^Try: ' "$dir/cluster.out" && break
	kill -0 $launcher 2>/dev/null || { cat "$dir/cluster.out"; exit 1; }
	sleep 0.1
done
urls=$(awk '/^Try: / {print $NF}' "$dir/cluster.out" | sed 's/?user=alice//g')
pids=$(awk '$2 ~ /^(boss|queuenode|gateway)$/ {print $3}' "$dir/cluster.out")
cpu() { local t=0; for p in $pids; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
rss() { local t=0; for p in $pids; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$p/status))); done; echo $t; }
sed -n '/^NAME/,/^$/p' "$dir/cluster.out"
cpu0=$(cpu)
TIMEFORMAT='loadtest CPU (all its processes): user %U s, system %S s, wall %R s'
time taskset -c 1 bin/imq loadtest --url "$urls" "$@" || status=$?
echo "cluster CPU over the run (all processes): $(( ($(cpu) - cpu0) * 10 )) ms; RSS at the end: $(rss) KiB"
exit ${status:-0}
