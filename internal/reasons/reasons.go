// Package reasons is the one table of why the server ends a connection
// (goodbye) or a subscription (unsubscribed): for each imqpb.Reason, its
// label in logs and metrics, the WebSocket close code the gateway sends
// with it, whether the client should come back (reconnect or rejoin), and
// whether the queue may have been lost with it. The gateway, the Go client
// and the load tester all read it, so a reason means one thing everywhere
// (centrifuge keeps its disconnects the same way, in disconnect.go).
//
// A new Reason in proto/imq.proto needs a row here; a test fails until it
// has one.
//
// # Imports
//
// reasons imports proto/ and gorilla/websocket's close code names only, so
// that the gateway and the client (package client, which may import this
// module's internal packages) can both use it. It holds no mutable state;
// it is safe for concurrent use.
package reasons

import (
	"github.com/gorilla/websocket"

	imqpb "github.com/imq-dev/imq/proto"
)

// Retry says whether a client comes back after a reason: reconnects after a
// goodbye, rejoins after an unsubscribed.
type Retry uint8

const (
	// Terminal: do not come back; connecting or joining again would be
	// refused the same way (or needs the user's action).
	Terminal Retry = iota + 1
	// Backoff: come back after the usual backoff.
	Backoff
	// AtOnce: come back at once, to any gateway: this one is going away
	// and the others are not loaded by the client's fault. The gateway
	// spreads its goodbyes over time; the client adds no growing backoff.
	AtOnce
	// PerCase: the sender decides and says so in the message's flag
	// (Goodbye.reconnect, Unsubscribed.rejoin): AUTH_FAILED is terminal
	// for a refused token but not for an auth backend that failed.
	PerCase
)

// Info is one row of the table.
type Info struct {
	Reason imqpb.Reason
	// Label names the reason in logs and metric labels: lower case, a
	// bounded set.
	Label string
	// CloseCode is the WebSocket close code (RFC 6455 section 7.4) the
	// gateway sends after a goodbye with this reason.
	CloseCode int
	// Retry says whether the client comes back.
	Retry Retry
	// QueueLost: when this reason ends a subscription, the queue may have
	// been lost with its history, state and offsets (a new epoch follows),
	// so a gap that comes with it is the announced loss, not a bug.
	QueueLost bool
	// Doc says what the reason means, in a few words.
	Doc string
}

// table is indexed by the Reason's number; every value of the enum has a
// row (TestEveryReasonHasARow).
var table = [...]Info{
	imqpb.Reason_REASON_UNSPECIFIED:    {Label: "other", CloseCode: websocket.CloseNormalClosure, Retry: PerCase, Doc: "no reason given; the message's flag decides"},
	imqpb.Reason_REASON_SHUTDOWN:       {Label: "shutdown", CloseCode: websocket.CloseGoingAway, Retry: AtOnce, Doc: "the gateway is shutting down or restarting; reconnect at once, to any gateway"},
	imqpb.Reason_REASON_SLOW_CONSUMER:  {Label: "slow_consumer", CloseCode: websocket.CloseTryAgainLater, Retry: Backoff, Doc: "the client read too slowly and its send queue overflowed"},
	imqpb.Reason_REASON_PING_TIMEOUT:   {Label: "ping_timeout", CloseCode: websocket.CloseGoingAway, Retry: Backoff, Doc: "the client sent nothing within the timeout"},
	imqpb.Reason_REASON_AUTH_FAILED:    {Label: "auth_failed", CloseCode: websocket.ClosePolicyViolation, Retry: PerCase, Doc: "the token was refused (terminal), or the auth backend failed or the source spent its failed-auth budget (reconnect later)"},
	imqpb.Reason_REASON_AUTH_TIMEOUT:   {Label: "auth_timeout", CloseCode: websocket.ClosePolicyViolation, Retry: Terminal, Doc: "no connect arrived within the timeout"},
	imqpb.Reason_REASON_PROTOCOL_ERROR: {Label: "protocol_error", CloseCode: websocket.CloseMessageTooBig, Retry: Terminal, Doc: "the client broke the protocol (a frame over the size limit)"},
	imqpb.Reason_REASON_SERVER_FULL:    {Label: "server_full", CloseCode: websocket.CloseTryAgainLater, Retry: Backoff, Doc: "the gateway's connection limit is reached"},
	imqpb.Reason_REASON_NODE_LOST:      {Label: "node_lost", CloseCode: websocket.CloseNormalClosure, Retry: Backoff, QueueLost: true, Doc: "the queue's node or the link to it was lost; rejoin (history and state may be gone)"},
	imqpb.Reason_REASON_MOVED:          {Label: "moved", CloseCode: websocket.CloseNormalClosure, Retry: Backoff, QueueLost: true, Doc: "the queue's bucket moved to another node without a hand-off (its queues start afresh), or a hand-off failed or a hold passed its bound (the queue kept, same epoch); rejoin"},
	imqpb.Reason_REASON_QUEUE_CLOSED:   {Label: "queue_closed", CloseCode: websocket.CloseNormalClosure, Retry: Terminal, QueueLost: true, Doc: "the server dropped the queue"},
	imqpb.Reason_REASON_KICKED:         {Label: "kicked", CloseCode: websocket.CloseNormalClosure, Retry: Terminal, Doc: "a backend removed the user"},
	imqpb.Reason_REASON_TIMEOUT:        {Label: "timeout", CloseCode: websocket.CloseNormalClosure, Retry: Backoff, Doc: "the queue node did not answer a join in time; rejoin"},
}

// Of returns r's row. A reason this build does not know (a newer server's)
// gets the UNSPECIFIED row, whose Retry is PerCase: the message's flag
// decides.
func Of(r imqpb.Reason) Info {
	if r < 0 || int(r) >= len(table) || table[r].Label == "" {
		r = imqpb.Reason_REASON_UNSPECIFIED
	}
	i := table[r]
	i.Reason = r
	return i
}

// All returns every row, in the enum's order.
func All() []Info {
	out := make([]Info, 0, len(table))
	for r := range table {
		out = append(out, Of(imqpb.Reason(r)))
	}
	return out
}

// Again reports whether the client should come back (reconnect after a
// goodbye, rejoin after an unsubscribed): the row's Retry, or for a PerCase
// row the flag the sender set. The sender sets the flag with Again too, so
// that both ends agree.
func (i Info) Again(flag bool) bool {
	switch i.Retry {
	case Terminal:
		return false
	case Backoff, AtOnce:
		return true
	}
	return flag
}

// AtOnce reports whether the client comes back at once rather than after
// a growing backoff.
func (i Info) AtOnce() bool { return i.Retry == AtOnce }
