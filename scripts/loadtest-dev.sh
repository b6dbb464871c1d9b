#!/usr/bin/env bash
# Runs `imq loadtest` against `imq dev` as BENCHMARKS.md does: the server
# pinned to core 0, the load generator (and its workers) to core 1. Every
# 2 s it samples the server's RSS, CPU time and connection count, and prints
# the sample with the most connections at the end. Arguments go to loadtest.
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/imq ./cmd/imq
port=${IMQ_BENCH_PORT:-18180}
iport=$((port + 1)) # the gateway's internal listener: /varz
taskset -c 0 bin/imq dev --addr 127.0.0.1:$port --internal-addr 127.0.0.1:$iport --link-addr 127.0.0.1:0 --log-level warn >/tmp/imq-loadtest-server.log 2>&1 &
server=$!
sampler=
trap 'kill $sampler 2>/dev/null || true; kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
	curl -sf http://127.0.0.1:$port/healthz >/dev/null && break
	sleep 0.1
done
rss() { awk '/VmRSS/ {print $2}' /proc/$server/status; }
cpu() { awk '{print $14+$15}' /proc/$server/stat; } # clock ticks (1/100 s)
echo "server idle: RSS $(rss) KiB"
(
	best=0
	while sleep 2; do
		conns=$(curl -s http://127.0.0.1:$iport/varz | awk -F'[:,]' '/"connections"/ {gsub(/ /,"",$2); print $2}')
		[ -n "$conns" ] || continue
		if [ "$conns" -ge "$best" ]; then
			best=$conns
			echo "$conns $(rss) $(cpu)" >/tmp/imq-loadtest-peak
		fi
	done
) &
sampler=$!
TIMEFORMAT='loadtest CPU (all its processes): user %U s, system %S s, wall %R s'
time taskset -c 1 bin/imq loadtest --url ws://127.0.0.1:$port/ws "$@" || status=$?
read -r conns rss_kib cpu_ticks </tmp/imq-loadtest-peak || true
echo "server at peak connections ($conns): RSS $rss_kib KiB; server CPU over the run: $(( $(cpu) ))0 ms"
exit ${status:-0}
