// Package boss is IMQ's boss: the one process that changes the bucket table.
// It watches the cluster through membership (internal/member), turns the live
// queue nodes into table versions (internal/bucket Join, Leave and
// Readdress), persists each version, and serves it to gateways and queue
// nodes, which long-poll GET /v1/table?after=V (internal/cluster). It also
// serves the operators' JSON views: /v1/nodes (every member with its role,
// addresses, status, buckets and its own /varz) and /v1/table, beside
// /metrics, /healthz and /varz.
//
// # Reconcile
//
// The boss reconciles the table with membership whenever membership changes,
// when it starts, and once a second as a safety net. One goroutine does it,
// so reconciles never overlap. A reconcile:
//
//  1. Takes the live queue nodes: members with role queuenode, alive or
//     suspect (a suspect may still refute), one per id. When two
//     incarnations of one id are live (a node restarted before its old self
//     was declared dead), the newer Meta.Started wins. A node that announces
//     no link address is left out: nobody could reach it.
//  2. Catches up: if any live member holds a table version newer than the
//     boss's (the boss lost its data directory, or an earlier boss published
//     versions it never persisted), the boss fetches that member's
//     GET /v1/table, checks it, and adopts the newest one before changing
//     anything. It never publishes a version lower than one already in the
//     cluster; while the newest version cannot be fetched it changes nothing.
//  3. Waits for the cluster after a restart: a boss that restarted with a
//     persisted table that has nodes removes nothing until it has heard from
//     the cluster, that is until a join through the persisted peers or the
//     seed addresses succeeds, or Config.ReconcileGrace has passed. Before
//     that it sees nobody, and would otherwise empty the table.
//  4. Plans (a pure function): table nodes that are not live leave, in id
//     order; live nodes not in the table join, in id order; a node whose link
//     address changed (a restart on a new address) is readdressed, which moves
//     no bucket. A leave moves exactly the leaver's buckets; a join moves
//     exactly the buckets it steals.
//  5. If the table changed: persists it, then publishes it (long-pollers
//     wake), and logs "bucket table published" with what changed.
//
// # Moves, drain and hand-off reports
//
// Step 4 is the instant form, used while Config.Handoff is off (today's
// queue nodes do not hand off): the live nodes that are not draining become
// the table at once, pending moves included. With Config.Handoff the boss
// keeps a target layout (planTable of the live, non-draining nodes, never
// with moves; persisted) and publishes the current table moved one step
// toward it (bucket.Table.Advance, docs/handoff.md rules 1-4): a dead
// owner's buckets are reassigned at once, a live owner's are marked moving,
// at most Config.MaxMoves at a time, and a mark not completed within
// Config.MoveTimeout is given up and retried at a later reconcile. A drain
// that would leave no node in the layout keeps every live node in it.
//
// Actions reach the reconcile goroutine as ops through one bounded channel:
// POST /v1/handoff (signed with the cluster key, internal/clusterauth; a
// boss without ClusterKeys is insecure and takes unsigned reports) and the
// operators' POST /v1/nodes/{id}/drain and undrain (Config.OperatorKeys,
// or signed with the cluster key by a member: a queue node drains itself
// at SIGTERM and undrains itself when it starts again; members are trusted,
// see drainAuthorized).
// Ops arriving within a few milliseconds of each other are applied in one
// reconcile, so close reports share one published table; each is answered
// after the table and draining set are persisted and published.
//
// # Persistence
//
// With Config.DataDir set, the boss keeps DataDir/boss-state.json:
//
//	{
//	  "format": 1,
//	  "table": {"version": 7, "bits": 5, "nodes": [{"id": "qn-1", "link_addr": "10.0.0.5:7100"}, ...],
//	            "owners": [0, 0, 1, ...]},
//	  "peers": ["10.0.0.5:7946", "10.0.0.6:7946"],
//	  "draining": ["qn-3"],
//	  "layout": {...the target layout, a table, with Config.Handoff...},
//	  "saved": "2025-01-02T15:04:05Z"
//	}
//
// where "table" is bucket.Table's JSON form and "peers" lists the gossip
// addresses of the other live members, so that a restarted boss can rejoin
// them at once instead of waiting for them to find it. Each write goes to a
// temporary file in DataDir which is synced, renamed over the old one, and the
// directory synced: a crash leaves the old state or the new, never a mix. A
// version is persisted before it is published. A failed write is logged and
// counted, the version is still published (routing matters more), and
// /healthz reports the boss unhealthy until a later write succeeds; writes are
// retried at each reconcile. Without a DataDir nothing is persisted, and a
// restarted boss recovers the table from the members (step 2 above).
//
// # While the boss is down
//
// Gateways and queue nodes keep routing by the last table they hold; nothing
// is rebalanced: a queue node that dies meanwhile stays in the table and its
// queues are unavailable until the boss is back and removes it. Members keep
// trying to rejoin the boss's gossip address, and the boss tries its persisted
// peers, so membership heals by itself when the boss returns.
//
// # Imports and concurrency
//
// boss imports internal/bucket, internal/member, internal/cluster,
// internal/clusterauth, internal/obs and proto/ (error codes), never another
// service. A Boss is
// safe for concurrent use: the table lives behind an atomic pointer and is
// replaced whole; only the reconcile goroutine changes it.
package boss
