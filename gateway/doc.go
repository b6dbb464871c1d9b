// Package gateway terminates game clients' WebSockets, authenticates them,
// keeps each connection's subscriptions and routes every queue operation over
// a link to the queue node that owns the queue (through the bucket table). It
// receives each event once per gateway and fans it out to its local
// subscribers, encoding the client frame once for all of them.
//
// Listeners. The client port (Config.Addr) serves /ws, the admin RPC and
// /healthz only; the internal listener (Config.InternalAddr), for operators
// and the cluster, serves /metrics, /healthz, /varz, /v1/table and kicks
// passed on by other gateways. The membership advertises the internal one.
//
// Routing. Standalone (Config.QueueNode), one node owns every queue. In
// cluster mode (Config.Member) the gateway is a member of the cluster, learns
// the bucket table from the boss (internal/cluster; it also serves its
// current table at /v1/table, internally) and keeps one link per node of the table,
// started and stopped as nodes join, leave or change address. Each request
// carries the table version it was routed by. A node that does not own the
// queue by its own table answers MOVED with its version: the gateway waits
// until its table has caught up with the node's (or, when the node is the
// one behind, briefly) and sends the request again, up to 5 times, so the
// client notices nothing; past that the client is answered UNAVAILABLE,
// retryable. A connection's operations on one queue keep their order
// across a move (lane.go): pipelined while the route stays put; when it
// changes, later ones wait for the earlier ones' answers, and MOVED ones are
// sent again first, in order. A join or leave is sent again only while it is
// the connection's latest operation on the queue. A leave goes to the node the
// subscription was made through, and a join that replaces a subscription
// made through another node leaves that node, so no node keeps a subscriber
// the gateway no longer has. A request the in-flight limit refuses changes
// nothing.
//
// Subscriptions belong to the link they were made through: only that link's
// events reach them, and they end (Unsubscribed, rejoin) when that link goes
// down or is stopped (NODE_LOST) or its node closes the queue because its
// bucket moved (QueueClosed: MOVED), whatever the table says by then.
//
// Live hand-off (handoff.go; the contract is docs/handoff.md). A node's
// BucketMoving mark moves the subscriptions made through its link to the
// bucket's queues to the new owner's link: at once off the old link (its
// later events of the bucket reach nobody), and onto the new one once the
// gateway has a table naming the new owner and the link is up (bounded:
// past it they end, MOVED, rejoin); then the gateway tells the new owner
// BucketAdopted, and only then does it send the bucket's events. During a
// hand-off the old owner answers requests MOVED and the lane sends them
// again to the new owner; a reply naming another node (served_by, which
// today's nodes do not set; see servedBy) binds its join to that node.
//
// Admin RPC (rpc*.go; the contract is docs/openapi.json). POST
// /rpc/v1/<method> on the client port, authenticated by an API key
// (Config.APIKeys, compared in constant time), each call bounded by
// RPCMaxBody, RPCTimeout and, across calls, RPCMaxInflight. Params are
// decoded strictly and checked before anything is sent, so bad input
// changes nothing. Queue operations go to the queue's owner through the same
// routing as client requests (rpc_call.go: backend requests, MOVED retried),
// and the handler waits for the reply. Kick closes this gateway's sessions of
// the user (an index of connections by user) and asks the other live gateway
// members over the same RPC with "local": true, signed, at their internal
// listeners.
//
// Tokens (auth.go, jwks.go): a connect token is a JWT verified with the
// HS256 secret or a public key (a PEM file, or a login service's JWKS,
// cached and refetched at most once per JWKSMinRefetch for an unknown key
// id), each key pinned to the algorithm of its type; exp, a bounded
// lifetime, aud and iss are checked.
//
// Admission (admission.go, listener.go): a connection is pending from
// accept until its connect succeeds, capped in total and per source address
// apart from the authenticated connections; failed authentications are
// rate-limited per source address.
//
// Auth call-out (auth_callout.go, Config.AuthURL): a connect token that is
// not a valid JWT of this gateway is POSTed to the backend from the
// connection's reader, bounded by AuthCalloutTimeout and a pool of
// AuthCalloutConcurrency slots: the connection has nothing else to do
// before it is authenticated.
//
// Goroutines: per client connection one reader (runs for the connection's
// life) and at most one writer (started when frames are queued, ends when the
// queue is empty: an idle connection holds no writer and no write buffer);
// per queue node one link (a dialer/reader goroutine and a writer goroutine,
// ending when the node leaves the table or at Shutdown); in cluster mode the
// cluster runtime's table watcher (internal/cluster) and memberlist's own
// (ending at Shutdown); and one short goroutine per request answered MOVED,
// ending within the request timeout; one per hand-off mark (and per join
// served by a node whose link is not up), ending within rebindWait.
// With a JWKS URL, one refresher, ending at Shutdown.
// Per connection refused at accept, one drain (at most 32 at once) that
// reads what the client still sends for at most 500 ms so the refusal is
// not lost to a reset; Shutdown waits for them.
// Per admin RPC call net/http's handler goroutine; a broadcast adds up to 64
// publishers and a kick one goroutine per other gateway, all ending before
// the call answers, within its timeout.
// The fan-out runs on the link reader and never blocks: it appends to bounded
// per-connection send queues, and a connection that overflows its queue is
// sent a goodbye and closed (slow consumer).
//
// Locks: a connection's subMu comes before an index shard's lock (and a
// link's mutex, when a retried join or leave is queued or a link is checked
// up), which
// comes before a connection's send mutex; a link's mutex is never held while
// calling out. Routing state (table and links) is an immutable snapshot
// behind an atomic pointer: a lookup takes no lock and does not allocate.
//
// gateway imports internal/ and proto/; it never imports queuenode/.
package gateway
