// Package cluster is the cluster runtime that gateways and queue nodes share:
// it makes the process a member of the cluster (internal/member), finds the
// boss, and keeps the process's bucket table current by long-polling the
// boss (GET /v1/table?after=V). It is the one place that
//
//   - starts the membership with the process's role, id and addresses, and
//     leaves it gracefully, bounded and idempotently, at shutdown;
//   - discovers the boss: the newest live boss member (member.NewestBoss, the
//     boss every member follows) or an explicit URL;
//   - hands each newer table to the service's install hook, in version order
//     and one at a time, then advertises the version in the membership and
//     releases the waiters of WaitVersion: a waiter of version v returns only
//     once the service has finished installing v (a gateway's links warmed up
//     and routes switched; a queue node's moved queues closed);
//   - asks the boss at once (Kick) when a peer shows a newer table than the
//     one installed: in the membership's gossip, or in a version a link
//     carries (KickIfBehind).
//
// While the boss is away the last table stays in force: routing never waits
// for the boss. A standalone service (no membership) has no Cluster.
//
// The package also holds the table's HTTP form, which the boss, gateways and
// queue nodes all serve at TablePath: ServeTable and DecodeTable.
//
// cluster imports internal/bucket and internal/member; services import it,
// never the reverse. Concurrency: every method is safe for concurrent use;
// the install hook and the peers callback run on one goroutine each, never
// concurrently with themselves.
package cluster
