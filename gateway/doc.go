// Package gateway terminates game clients' WebSockets, authenticates them,
// keeps each connection's subscriptions and routes every queue operation over
// a link to the queue node that owns the queue (through the bucket table). It
// receives each event once per gateway and fans it out to its local
// subscribers, encoding the client frame once for all of them.
//
// Goroutines: per client connection one reader (runs for the connection's
// life) and at most one writer (started when frames are queued, ends when the
// queue is empty: an idle connection holds no writer and no write buffer);
// per queue node one link (a dialer/reader goroutine and a writer goroutine,
// ending at Shutdown). The fan-out runs on the link reader and never blocks:
// it appends to bounded per-connection send queues, and a connection that
// overflows its queue is sent a goodbye and closed (slow consumer).
//
// gateway imports internal/ and proto/; it never imports queuenode/.
package gateway
