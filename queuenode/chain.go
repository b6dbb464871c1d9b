package queuenode

import (
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// Requests that wait for a call-out leave the link's reader: each session's
// requests on a queue with call-outs run in order in a chain, one goroutine
// per chain with work, so that a slow backend delays only the session that
// waits for it (not the link, the queue's other users or other queues) and
// a session's publishes, joins and leaves on a queue never overtake one
// another. A request that needs no call-out runs on the reader as before,
// unless its chain has work, which it then joins.
//
// Chains are bounded per link (maxChainedPerLink, Config.LinkBuffer) and
// per chain (maxChainedPerChain); a request past its deadline when its turn
// comes is answered TIMEOUT and dropped. Leaves are exempt from all three.

// maxChainedPerLink bounds the requests one link may have in its chains;
// more are answered LIMIT_EXCEEDED. Their payload bytes are bounded by
// Config.LinkBuffer too.
const maxChainedPerLink = 4096

// maxChainedPerChain bounds the requests one chain (one session on one
// queue) may have waiting, the running one included; more are answered
// LIMIT_EXCEEDED, so that a few sessions flooding a slow backend cannot
// take the whole link's bound from the others.
const maxChainedPerChain = 64

// Requests a chain refuses or drops, answered without running. Both are
// retryable; neither applies to a leave, which always runs.
var (
	errChainFull = &imqerr.Error{Code: imqpb.Code_LIMIT_EXCEEDED, Message: "too many operations waiting for the backend on this queue"}
	errExpired   = &imqerr.Error{Code: imqpb.Code_TIMEOUT, Message: "expired before the backend was asked; the gateway has already answered"}
)

// Reasons a chained request is answered without running, the reason label
// of imq_queuenode_chained_refused_total.
const (
	refusedLink    = "link"
	refusedChain   = "chain"
	refusedExpired = "expired"
)

// chainedOverhead approximates a chained request's bytes beside its payload.
const chainedOverhead = 256

// chainKey names the requests of one session on one queue.
type chainKey struct{ session, queue string }

// chain is one chainKey's requests waiting to run, in arrival order; the
// chain's goroutine runs them one at a time.
type chain struct {
	reqs []*imqpb.NodeRequest // Guarded by link.chainMu.
	n    int                  // Guarded by link.chainMu: reqs and the one running.
}

// requestQueue returns the queue a client operation names ("" for others).
func requestQueue(req *imqpb.NodeRequest) string {
	switch x := req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		return x.Join.GetQueue()
	case *imqpb.NodeRequest_Leave:
		return x.Leave.GetQueue()
	case *imqpb.NodeRequest_Publish:
		return x.Publish.GetQueue()
	case *imqpb.NodeRequest_SetState:
		return x.SetState.GetQueue()
	}
	return ""
}

func chainedBytes(req *imqpb.NodeRequest) int {
	return chainedOverhead + len(req.GetPublish().GetPayload()) + len(req.GetSetState().GetValue())
}

// enqueue hands req, a client operation on a queue with call-outs (route
// rt), to its chain when it needs a call-out or its chain has work. It
// reports whether it took req, which it then answers itself (possibly with
// LIMIT_EXCEEDED at once). It runs on the link's reader.
func (l *link) enqueue(rt *route, req *imqpb.NodeRequest) bool {
	key := chainKey{session: req.GetSession(), queue: requestQueue(req)}
	size := chainedBytes(req)
	l.chainMu.Lock()
	c := l.chains[key]
	if c == nil && !needsCallout(rt, req) {
		l.chainMu.Unlock()
		return false
	}
	// A leave is never refused: the gateway sends the leaves of closed
	// connections and of timed-out joins without asking for a reply, and
	// one dropped behind its chain's join would leave a subscriber here
	// that no session has. Leaves are small and bounded by subscriptions.
	_, leave := req.GetOp().(*imqpb.NodeRequest_Leave)
	if !leave && c != nil && c.n >= maxChainedPerChain {
		l.chainMu.Unlock()
		l.s.m.chainedRefused.WithLabelValues(refusedChain).Inc()
		l.s.finish(l, req, opName(req), errChainFull)
		return true
	}
	if n := l.chained; !leave && (n >= maxChainedPerLink || l.chainedBytes+size > l.s.cfg.LinkBuffer) {
		l.chainMu.Unlock()
		l.s.m.chainedRefused.WithLabelValues(refusedLink).Inc()
		l.s.finish(l, req, opName(req), imqerr.New(imqpb.Code_LIMIT_EXCEEDED,
			"this gateway has %d requests waiting for call-outs on queue node %s, its limit", n, l.s.cfg.NodeID))
		return true
	}
	l.chained++
	l.chainedBytes += size
	start := c == nil
	if start {
		c = &chain{}
		if l.chains == nil {
			l.chains = make(map[chainKey]*chain)
		}
		l.chains[key] = c
	}
	c.reqs = append(c.reqs, req)
	c.n++
	l.chainMu.Unlock()
	if start {
		l.async.Add(1)
		go func() { // ends when the chain is empty
			defer l.async.Done()
			l.runChain(key, c, rt)
		}()
	}
	return true
}

// runChain runs c's requests in order until none is left, then forgets c.
func (l *link) runChain(key chainKey, c *chain, rt *route) {
	var done *imqpb.NodeRequest
	for {
		l.chainMu.Lock()
		if done != nil {
			c.n--
			l.chained--
			l.chainedBytes -= chainedBytes(done)
		}
		if len(c.reqs) == 0 {
			delete(l.chains, key)
			l.chainMu.Unlock()
			return
		}
		req := c.reqs[0]
		c.reqs[0] = nil
		c.reqs = c.reqs[1:]
		l.chainMu.Unlock()
		l.s.runChained(l, rt, req)
		done = req
	}
}

// runChained runs one request of a chain: its call-out, if it needs one,
// with no lock held, then the operation as the reader would run it. Once
// the link is closed nothing runs: there is no one to answer, and a join
// would only add a subscriber for removeGateway to remove (serveLink waits
// for the chains before it removes the link's subscribers). A request
// whose turn comes after its deadline does not run either (see expired).
func (s *Server) runChained(l *link, rt *route, req *imqpb.NodeRequest) {
	if l.ctx.Err() != nil {
		return
	}
	if s.expired(req) {
		s.m.chainedRefused.WithLabelValues(refusedExpired).Inc()
		s.finish(l, req, opName(req), errExpired)
		return
	}
	res := &calloutResult{}
	if needsCallout(rt, req) {
		var done bool
		if res, done = s.runCallouts(l, rt, req); done {
			return
		}
	}
	s.execute(l, req, rt, res)
}

// runCallouts makes req's call-outs (it needs some: needsCallout) and
// returns what they decided; done says req is answered (or its link
// closed) and must not run.
func (s *Server) runCallouts(l *link, rt *route, req *imqpb.NodeRequest) (res *calloutResult, done bool) {
	res = &calloutResult{}
	if err := s.precheck(req); err != nil {
		s.finish(l, req, opName(req), err)
		return nil, true
	}
	var err error
	switch x := req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		res.seed, err = s.co.join(l.ctx, rt, req, x.Join)
	case *imqpb.NodeRequest_Publish:
		res.payload, res.rewritten, err = s.co.publish(l.ctx, rt, req, x.Publish)
	case *imqpb.NodeRequest_SetState:
		err = s.co.setState(l.ctx, rt, req, x.SetState)
	}
	if l.ctx.Err() != nil {
		return nil, true
	}
	if err != nil {
		s.finish(l, req, opName(req), err)
		return nil, true
	}
	return res, false
}

// expired reports whether req, whose turn in its chain has come, is past
// the deadline its gateway set (NodeRequest.deadline_ms). The gateway has
// answered it TIMEOUT already, and the client may have sent it again: run
// now, a publish would happen twice. A leave is never expired: it must
// apply, or a subscriber would stay that no session has.
func (s *Server) expired(req *imqpb.NodeRequest) bool {
	d := req.GetDeadlineMs()
	if d == 0 {
		return false
	}
	if _, leave := req.GetOp().(*imqpb.NodeRequest_Leave); leave {
		return false
	}
	return s.cfg.Now().UnixMilli() > d
}

// precheck refuses, before its call-out, a join, publish or state change
// that would fail anyway: the backend is not asked about a malformed
// request, a state key the owner rule refuses, or a queue this node does
// not serve (the gateway retries a MOVED one elsewhere).
func (s *Server) precheck(req *imqpb.NodeRequest) error {
	if err := checkClient(req); err != nil {
		return err
	}
	queue := requestQueue(req)
	if err := wire.ValidateQueueName(queue); err != nil {
		return err
	}
	switch x := req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		if len(x.Join.GetMounts()) == 0 {
			return imqerr.New(imqpb.Code_INVALID_MOUNT, "join %s: name at least one mount", queue)
		}
		for _, m := range x.Join.GetMounts() {
			if err := wire.ValidateMountName(m.GetName()); err != nil {
				return err
			}
		}
	case *imqpb.NodeRequest_Publish:
		if err := wire.ValidateMountName(x.Publish.GetMount()); err != nil {
			return err
		}
		if n := len(x.Publish.GetPayload()); n > s.cfg.Limits.MaxPayload {
			return imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "payload is %d bytes; the limit is %d", n, s.cfg.Limits.MaxPayload)
		}
	case *imqpb.NodeRequest_SetState:
		st := x.SetState
		if err := wire.ValidateMountName(st.GetMount()); err != nil {
			return err
		}
		if err := wire.ValidateStateKey(st.GetKey()); err != nil {
			return err
		}
		if n := len(st.GetValue()); !st.GetDelete() && n > s.cfg.Limits.MaxStateValue {
			return imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "state value is %d bytes; the limit is %d", n, s.cfg.Limits.MaxStateValue)
		}
		if err := s.checkStateOwner(req, st); err != nil {
			return err
		}
	}
	sh := s.shardFor(queue)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return s.checkOwnerLocked(queue)
}
