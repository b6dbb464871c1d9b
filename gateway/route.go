package gateway

import (
	"context"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	// maxMovedAttempts bounds the sends of one request that nodes answer
	// MOVED; after the last the client is answered errMoving.
	maxMovedAttempts = 5
	// movedTableWait bounds one wait for a table newer than a MOVED reply's.
	movedTableWait = time.Second
	// staleNodeDelay, times the attempt, is the pause before sending again
	// when the node answered MOVED by a table older than the gateway's: the
	// request's table_version has already told it to fetch the newer one.
	staleNodeDelay = 20 * time.Millisecond
)

// routed is one client (or admin RPC) request on its way to the node that
// owns its queue. A MOVED reply does not reach the client: the request is
// sent again once the gateway's table has caught up with the node's. A
// client's request goes through its queue's lane (lane.go), which sends it
// again in its original order, after the connection's earlier operations on
// the queue and before its later ones; an admin RPC request retries on a
// goroutine of its own (retry), so the link reader never waits. done runs
// exactly once, with the final reply and the link it came on (nil when the
// gateway answered itself).
type routed struct {
	s *Server
	// c is the client connection the request came from; nil for the admin
	// RPC (rpc_call.go), whose requests are never joins or leaves.
	c     *conn
	queue string
	req   *imqpb.NodeRequest
	// op and seq, for a join or leave, name the operation in the
	// connection's per-queue sequence (subs.go): it is sent again only while
	// it is the latest.
	op  *queueOps
	seq uint64
	// via, if not nil, is the link to send the first attempt to rather
	// than the table's: a leave goes to the node its subscription was made
	// through, which may no longer own the queue by the table.
	via      *nodeLink
	deadline time.Time // the request's time, over all its attempts
	done     func(r *imqpb.NodeReply, l *nodeLink)

	// Written before each send, read after its reply (the link's mutex
	// orders the two); for a client's request, also guarded by c.subMu.
	attempts    int
	version     uint64 // of the table the last send was routed by
	moved       string // the last MOVED reply's message, for the client if retries end
	nodeVersion uint64 // the table version of the node that last answered MOVED

	// A client's request in its lane; guarded by c.subMu.
	lane    *lane
	laneSeq uint64 // its place among the lane's operations
	resend  bool   // answered MOVED and held to be sent again
}

// route returns the link the request goes to next, via or by the current
// table, and the version of the table.
func (rt *routed) route() (*nodeLink, uint64, error) {
	if rt.via != nil {
		return rt.via, rt.s.table().Version(), nil
	}
	return rt.s.linkFor(rt.queue)
}

// send routes the request and sends it. The error says it was not sent (no
// table, or the link is down or full).
func (rt *routed) send() error {
	l, v, err := rt.route()
	if err != nil {
		return err
	}
	return rt.sendTo(l, v)
}

// sendTo sends the request to l, routed by table version v.
func (rt *routed) sendTo(l *nodeLink, v uint64) error {
	rt.attempts++
	rt.version = v
	rt.req.TableVersion = v
	// Every attempt shares the request's deadline: retries never stretch it,
	// and each carries it to its node (deadline_ms), which drops the
	// request if call-outs keep it waiting past it.
	return l.request(rt.req, rt.deadline, func(r *imqpb.NodeReply) { rt.replied(l, r) })
}

// replied takes a reply from l: MOVED is retried, anything else is final.
// It runs on l's reader (or on its writer, for a timeout; or in down).
func (rt *routed) replied(l *nodeLink, r *imqpb.NodeReply) {
	if rt.c != nil {
		rt.c.laneReplied(rt, l, r)
		return
	}
	if r.GetCode() != imqpb.Code_MOVED {
		rt.done(r, l)
		return
	}
	nodeVersion := r.GetTableVersion()
	rt.moved = r.GetMessage()
	rt.s.goTracked(func() { rt.retry(nodeVersion) }) // ends within the request's time
}

// retry sends an admin RPC request again, by the table, after a MOVED
// answered by a node holding table nodeVersion. When the node is ahead of
// the table the request was routed by, it waits (bounded) until the gateway
// holds the node's table, which gives the queue to its new owner; when both
// routed by the same version (they disagree on a table they share: a bug),
// until the gateway holds a newer one. When the node is the one behind, it
// sends again after a short pause: the request's table_version has told the
// node to fetch the newer table. A client's lane does the same for all its
// held requests at once (resendLane).
func (rt *routed) retry(nodeVersion uint64) {
	s := rt.s
	if rt.attempts >= maxMovedAttempts {
		rt.fail("attempts", rt.movedErr())
		return
	}
	ctx, cancel := context.WithDeadline(s.ctx, rt.deadline)
	defer cancel()
	if nodeVersion >= rt.version {
		want := nodeVersion
		if nodeVersion == rt.version {
			want++
		}
		wctx, wcancel := context.WithTimeout(ctx, s.movedWait)
		s.waitTable(wctx, want)
		wcancel()
	} else {
		t := time.NewTimer(staleNodeDelay * time.Duration(rt.attempts))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	switch {
	case s.ctx.Err() != nil:
		rt.fail("shutdown", errShuttingDown)
		return
	case ctx.Err() != nil:
		rt.fail("deadline", rt.movedErr())
		return
	}
	s.m.movedRetries.Inc()
	if err := rt.send(); err != nil {
		rt.finish(err)
	}
}

// movedErr is errMoving with the node's last word, which says whose table
// is behind (or that a node has no table at all).
func (rt *routed) movedErr() *imqerr.Error {
	if rt.moved == "" {
		return errMoving
	}
	return imqerr.New(errMoving.Code, "%s (the last node said: %s)", errMoving.Message, rt.moved)
}

// fail ends a request that MOVED answers kept from its node.
func (rt *routed) fail(reason string, err *imqerr.Error) {
	rt.s.m.movedFailures.WithLabelValues(reason).Inc()
	rt.finish(err)
}

// finish ends the request with the gateway's own error reply.
func (rt *routed) finish(err error) {
	e := imqerr.From(err)
	rt.done(&imqpb.NodeReply{Code: e.Code, Message: e.Message}, nil)
}

// goTracked runs fn on a goroutine that Run waits for. Callers are
// goroutines Run waits for too (link readers), so the count is never zero
// while Run waits.
func (s *Server) goTracked(fn func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn()
	}()
}
