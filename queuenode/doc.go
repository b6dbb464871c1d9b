// Package queuenode holds IMQ queues in RAM and serves them to gateways over
// the link (proto/link.proto).
//
// Queue is the pure core: mounts, history, state, subscribers and the total
// order, with no locks, goroutines or clock. Server wraps queues in sharded
// maps; every operation on one queue runs under its shard's lock, which is
// what serializes the queue, and the frames it produces are appended to the
// gateways' bounded link buffers under that same lock, so every gateway sees
// each queue's events in offset order. No lock is held across I/O: each link
// has one reader goroutine (which executes requests, or hands them to a
// chain, below) and one writer goroutine (which owns the socket's writes).
//
// Call-outs (Config.Callouts, callout.go) ask a backend over HTTP whether a
// client may join, publish or change state, and tell it when one left. A call-out never
// holds a shard lock or the link's reader: a request that needs one is
// handed to the chain of its session and queue (chain.go), a goroutine that
// runs that session's requests on that queue in order (call-out first, then
// the operation under the shard lock, ownership checked again) and ends
// when it has none left; the chains end when their link closes. Requests on
// queues without call-outs, and backend requests (NodeRequest.backend),
// run on the reader as before. Chains are bounded per link and per chain,
// and drop a request whose gateway deadline passed before its turn. Leave
// notifications go through a bounded queue drained by a few workers that
// Run starts and Shutdown stops, so they are asynchronous: hook bodies
// carry a node-wide seq that orders them (see Callout).
//
// The node's memory budget (Config.MaxNodeBytes, budget.go) is an atomic
// total of every queue's Bytes: a write reserves room with a
// compare-and-swap before it takes its shard lock and settles what it
// really added under the lock, so the total never passes the budget and
// no global lock is taken per write. A write for a queue the node does not
// serve is answered MOVED before it reserves anything. A reservation that
// does not fit evicts the oldest history across the node first, one
// eviction at a time and with no shard lock held by the caller; when the
// node's history (an atomic total beside the first) cannot make room, it
// is refused at once without walking the queues. Queue creation per user
// is rate-limited by a sharded, bounded map of token buckets.
//
// The admin RPC's reads (get_state, history, queue_info; reads.go) run like
// other operations but never create a queue or mount (NOT_FOUND).
//
// Under the queue-name prefixes of Config.OwnedState, state keys belong to
// users: a client may set or delete only the key equal to its user id and
// keys under "<user>/" (checkStateOwner, FORBIDDEN otherwise); the backend
// (admin RPC, join call-out seeds) may write any key.
//
// With Config.InternalAddr the node has an internal HTTP listener for
// operators and the cluster: /metrics, /healthz, /varz and GET /v1/table
// (HandleHTTP), with the limits of every internal listener
// (obs.NewInternalServer). New binds it, before joining the membership,
// whose metadata carries its address (the boss reads the node's /varz
// there); Run serves it in one goroutine, which Shutdown ends. The budget's
// gauges are imq_queuenode_budget_used_bytes and imq_queuenode_budget_bytes,
// /varz's bytes and max_bytes.
//
// A node runs standalone (Config.Member nil: it owns every queue) or in
// cluster mode. In cluster mode it is a member of the cluster's membership
// (internal/member), follows the boss's bucket table (internal/cluster)
// and serves only the queues whose bucket the table gives it: other requests
// are answered MOVED with the table's version (also before it has a table:
// version 0). A request routed by a newer table holds its link's reader
// until the node has fetched that table (at most a second; UNAVAILABLE
// after), so a node that was paused never serves, closes or answers by a
// table it should have replaced (fence). When a new table gives a bucket
// to another node with no move marked (the boss thought this node dead),
// the node closes the bucket's queues and sends each gateway with
// subscribers one QueueClosed (reason MOVED), so the clients rejoin on the
// new owner in a new epoch; a bucket marked moving away, or adopted, keeps
// its queues. The table lives behind an atomic pointer; ownership is
// checked under the queue's shard lock, and a table change stores the table
// before it sweeps the shards, so no request can keep a moved queue alive
// (see checkOwnerLocked). The node also closes the links of a gateway that
// the membership declares dead or left, in case its connections stay open.
//
// The node's end of a live bucket hand-off (docs/handoff.md; handoff.go)
// moves a bucket's queues whole: Queue.Snapshot and RestoreQueue turn a
// queue into a QueueSnapshot (proto/link.proto) and back, keeping its
// epoch, offsets, history, evictions, state versions and subscribers
// (named by gateway id between nodes, bound to link keys on each);
// exportBucket takes a bucket's queues out of the shards, importQueues
// installs them all or none, within the memory budget. RestoreQueue checks
// a snapshot whole, since it comes from another node.
//
// handoff_out.go runs the hand-offs the table marks from this node, one at
// a time: dial the target (a node link, role node), freeze the bucket
// (intercept and checkOwnerLocked hold its requests in arrival order,
// bounded), export it (every shard lock taken once: nothing that passed
// the owner check before the freeze is still running, nothing recreates
// a queue after), send BucketMoving on every gateway link, stream the
// snapshots in frames of at most 1 MiB and wait for the ack; then answer
// the held and later requests MOVED, in order (the gateway sends them
// again to the new owner), forward only leaves without a reply
// (origin_gateway set) and report to the boss, until a table gives the
// bucket away and a grace has passed. A failed hand-off puts the queues back (same
// epoch), ends the marked gateways' subscriptions with QueueClosed(MOVED)
// and runs the held requests here. handoff_in.go is the target: staging
// within the memory budget, importQueues, the adopted mark, the forwarded
// leaves, and the per-gateway holds of events until BucketAdopted.
// handoff_state.go is the state both share.
//
// queuenode imports internal/ and proto/ only; it never imports gateway/ or
// boss/ (its tests run a real boss).
package queuenode
