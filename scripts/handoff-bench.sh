#!/usr/bin/env bash
# Measures live bucket hand-off as BENCHMARKS.md reports it: hand-off time
# and publish→deliver p99 while a bucket of 1k or 10k queues with full
# histories moves, and the drain time of a queue node holding 10k queues
# (BenchmarkHandoff in e2e/handoff_bench_test.go: a boss with --handoff,
# two queue nodes and a gateway as processes on 127.0.0.1). It takes a few
# minutes and a few GB of memory. HISTORY sets the events per queue
# (default 256, a full history at the node's defaults); CASE picks one case
# (bucket/1k, bucket/10k, node/10k; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
IMQ_HANDOFF_BENCH=1 IMQ_HANDOFF_BENCH_HISTORY="${HISTORY:-256}" \
	go test -count=1 -run '^$' -bench "^BenchmarkHandoff\$/${CASE:-}" -benchtime 1x -timeout 60m -v ./e2e |
	grep -E '^(Benchmark|---|ok|FAIL|PASS)|handoff_bench_test|-ms|drain-s'
