#!/usr/bin/env bash
# Measures failure detection and recovery as BENCHMARKS.md reports them: the
# end-to-end test that SIGKILLs a queue node under chat traffic (3 queue
# nodes, 2 gateways, a boss, as processes), run with the default memberlist
# settings, RUNS times (default 5). Each run prints when the boss's table
# dropped the node and when the last affected client was back in its room,
# receiving, both counted from the kill.
set -euo pipefail
cd "$(dirname "$0")/.."
for i in $(seq "${RUNS:-5}"); do
	IMQ_E2E_GOSSIP=default go test -count=1 -v -run '^TestClusterQueueNodeKilled$' ./e2e |
		grep -o 'killed node out of the table.*' | sed "s/^/run $i: /"
done
