// Package queuenode holds IMQ queues in RAM and serves them to gateways over
// the link (proto/link.proto).
//
// Queue is the pure core: mounts, history, state, subscribers and the total
// order, with no locks, goroutines or clock. Server wraps queues in sharded
// maps; every operation on one queue runs under its shard's lock, which is
// what serializes the queue, and the frames it produces are appended to the
// gateways' bounded link buffers under that same lock, so every gateway sees
// each queue's events in offset order. No lock is held across I/O: each link
// has one reader goroutine (which executes requests) and one writer goroutine
// (which owns the socket's writes).
//
// queuenode imports internal/ and proto/ only; it never imports gateway/.
package queuenode
