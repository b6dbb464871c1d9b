package gateway

import (
	"context"
	"slices"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// lane keeps one connection's operations on one queue (publishes, state
// writes, joins and leaves) in the order the client sent them, across
// changes of the queue's route. While the route stays put, operations are
// pipelined: each is sent as it comes, all to one link, whose FIFO order the
// node keeps. When an operation would go to another link than the ones still
// in flight (a newer table, or a leave that follows its subscription), it
// and every later one are held until those are answered. When a node
// answers MOVED, the operation is held in its original place, nothing more
// is sent, and once every operation in flight is answered one resender
// (resendLane) waits for the table the node pointed at and sends the held
// operations again, oldest first, before any later one.
//
// Joins and leaves are in the lane too: a client that joins and then
// publishes expects its publish after its join (it sees its own event),
// and a state write before a join to be in the join's snapshot. Their own
// latest-wins sequence (subs.go) still decides the local subscription.
//
// The type is pure bookkeeping; conn's methods below do the sending. It is
// guarded by the connection's subMu. Its held operations each hold one of
// the connection's MaxInflight slots, which bounds them.
type lane struct {
	queue     string
	link      *nodeLink // where the operations in flight went
	inflight  int       // operations sent to link and not answered yet
	held      []*routed // operations to send, oldest (laneSeq) first
	moved     bool      // some of held were answered MOVED: resending them waits for a table
	probing   bool      // link is new to the lane: one operation at a time until one is answered
	resending bool      // a resender is waiting; it sends held when done
	seq       uint64    // numbers the operations in the order they came
}

// laneStep is what a lane needs once its operations in flight changed.
type laneStep int

const (
	laneBusy   laneStep = iota // operations in flight, or a resender waiting: nothing to do
	laneIdle                   // nothing in flight or held: the lane may go
	lanePump                   // held operations may be sent now (pump)
	laneResend                 // held operations answered MOVED: start the resender
)

// admit numbers rt, the newest operation, and reports whether it may be
// sent to target now; if so it counts as in flight there. Otherwise it is
// held behind the earlier ones.
func (ln *lane) admit(rt *routed, target *nodeLink) bool {
	ln.seq++
	rt.laneSeq = ln.seq
	if len(ln.held) == 0 && ln.take(target) {
		return true
	}
	ln.held = append(ln.held, rt)
	return false
}

// take reports whether the next operation may go to target now: nothing is
// waiting on a MOVED, and whatever is in flight went to target too. If so
// the operation counts as in flight.
//
// The first operation sent to a link new to the lane (the route changed),
// or sent again after MOVED, goes alone: a node that is not yet the
// queue's owner (it has not fetched the table the gateway routed by)
// answers it MOVED, and could accept the next one, pipelined behind it,
// once it has. So later operations wait until that one is answered.
func (ln *lane) take(target *nodeLink) bool {
	switch {
	case ln.moved || ln.resending:
		return false
	case ln.inflight > 0 && (ln.link != target || ln.probing):
		return false
	case ln.inflight == 0 && ln.link != nil && ln.link != target:
		ln.probing = true
	}
	ln.link = target
	ln.inflight++
	return true
}

// unsent takes back the take of an operation that could not be sent.
func (ln *lane) unsent() { ln.inflight-- }

// answered records that rt, in flight, was answered: moved, MOVED; again,
// to be sent again, ahead of every later operation (otherwise the answer
// is final). Any answer but MOVED shows the node serves the queue (or that
// nothing reached it): a probe is over.
func (ln *lane) answered(rt *routed, moved, again bool) {
	ln.inflight--
	if !moved {
		ln.probing = false
	}
	if !again {
		return
	}
	i, _ := slices.BinarySearchFunc(ln.held, rt.laneSeq, func(h *routed, seq uint64) int {
		switch {
		case h.laneSeq < seq:
			return -1
		case h.laneSeq > seq:
			return 1
		}
		return 0
	})
	ln.held = slices.Insert(ln.held, i, rt)
	ln.moved = true
}

// next says what the lane needs now. A resend is started once every
// operation in flight is answered: the later ones, sent to the same node,
// are answered MOVED too and take their places before anything is sent
// again.
func (ln *lane) next() laneStep {
	switch {
	case ln.inflight > 0 || ln.resending:
		return laneBusy
	case ln.moved:
		ln.resending = true
		return laneResend
	case len(ln.held) > 0:
		return lanePump
	}
	return laneIdle
}

// resume ends the resender's wait: the held operations may go.
func (ln *lane) resume() { ln.moved, ln.resending, ln.probing = false, false, true }

// laneFailure is a held operation that will not be sent, with the reason for
// imq_gateway_moved_failures_total ("" for none: a routing error).
type laneFailure struct {
	rt     *routed
	reason string
	err    error
}

// answer ends the failed operations; the caller does not hold subMu (done
// may take it).
func answer(failed []laneFailure) {
	for _, f := range failed {
		if f.reason != "" {
			f.rt.fail(f.reason, imqerr.From(f.err))
		} else {
			f.rt.finish(f.err)
		}
	}
}

// sendInLane sends rt, an operation of this connection, through its queue's
// lane: now, or once the earlier operations allow.
func (c *conn) sendInLane(rt *routed) {
	c.subMu.Lock()
	ln := c.lanes[rt.queue]
	if ln == nil {
		ln = c.newLaneLocked(rt.queue)
	}
	rt.lane = ln
	l, v, err := rt.route()
	if err == nil && ln.admit(rt, l) {
		if err = rt.sendTo(l, v); err != nil {
			ln.unsent()
		}
	}
	var failed []laneFailure
	if err != nil {
		failed = c.advanceLocked(ln, nil)
	}
	c.subMu.Unlock()
	answer(failed)
	if err != nil {
		rt.finish(err) // it never went: the lane has no trace of it
	}
}

// laneReplied takes the node's reply r to rt, sent on l: MOVED holds it for
// the resender (until its attempts run out), anything else is final.
func (c *conn) laneReplied(rt *routed, l *nodeLink, r *imqpb.NodeReply) {
	moved := r.GetCode() == imqpb.Code_MOVED
	again := moved && rt.attempts < maxMovedAttempts
	c.subMu.Lock()
	if moved {
		rt.moved = r.GetMessage()
		rt.nodeVersion = r.GetTableVersion()
		rt.via = nil // the node it was sent to does not own the queue
		rt.resend = again
	}
	ln := rt.lane
	ln.answered(rt, moved, again)
	failed := c.advanceLocked(ln, nil)
	c.subMu.Unlock()
	answer(failed)
	switch {
	case again:
	case moved:
		rt.fail("attempts", rt.movedErr())
	default:
		rt.done(r, l)
	}
}

// advanceLocked does what the lane needs next: sends what may go, starts the
// resender, or lets an idle lane go. It returns the held operations that
// will not be sent, appended to failed, for answer once subMu is released.
func (c *conn) advanceLocked(ln *lane, failed []laneFailure) []laneFailure {
	for {
		switch ln.next() {
		case laneBusy:
			return failed
		case laneIdle:
			delete(c.lanes, ln.queue)
			if c.spareLane == nil {
				*ln = lane{held: ln.held[:0]}
				c.spareLane = ln
			}
			return failed
		case laneResend:
			c.s.goTracked(func() { c.resendLane(ln) }) // ends within the held operations' time
			return failed
		case lanePump:
			failed = c.pumpLocked(ln, failed)
		}
	}
}

// pumpLocked sends the held operations, oldest first, while they may go.
// One that was answered MOVED is counted a retry, and not sent again when a
// later join or leave of the queue superseded it; one past its time, or
// held at shutdown, is answered instead of sent.
func (c *conn) pumpLocked(ln *lane, failed []laneFailure) []laneFailure {
	s := c.s
	now := time.Now()
	i := 0
	for ; i < len(ln.held); i++ {
		rt := ln.held[i]
		var reason string
		var err error
		var l *nodeLink
		var v uint64
		switch {
		case s.ctx.Err() != nil:
			reason, err = "shutdown", errShuttingDown
		case now.After(rt.deadline):
			reason, err = "deadline", rt.movedErr()
		case rt.resend && rt.op != nil && (c.dead || rt.op.seq != rt.seq):
			reason, err = "superseded", errSuperseded
		default:
			l, v, err = rt.route()
		}
		if err == nil {
			if !ln.take(l) {
				break
			}
			if rt.resend {
				rt.resend = false
				s.m.movedRetries.Inc()
			}
			if err = rt.sendTo(l, v); err != nil {
				ln.unsent()
			}
		}
		if err != nil {
			failed = append(failed, laneFailure{rt: rt, reason: reason, err: err})
		}
	}
	n := copy(ln.held, ln.held[i:])
	clear(ln.held[n:])
	ln.held = ln.held[:n]
	return failed
}

// newLaneLocked returns an empty lane for queue, in c.lanes.
func (c *conn) newLaneLocked(queue string) *lane {
	ln := c.spareLane
	if ln != nil {
		c.spareLane = nil
	} else {
		ln = &lane{}
	}
	ln.queue = queue
	if c.lanes == nil {
		c.lanes = make(map[string]*lane)
	}
	c.lanes[queue] = ln
	return ln
}

// resendLane is the lane's one resender: it waits, as routed.retry does for
// a single request, for the table the MOVED answers call for (bounded by
// movedWait and the earliest of the operations' deadlines), or for a short
// pause when the nodes were the ones behind, and then sends the held
// operations again in their order.
func (c *conn) resendLane(ln *lane) {
	s := c.s
	var want uint64
	attempts := 0
	var deadline time.Time
	c.subMu.Lock()
	for _, rt := range ln.held {
		if !rt.resend {
			continue
		}
		if rt.nodeVersion >= rt.version {
			w := rt.nodeVersion
			if w == rt.version {
				w++ // they disagree on a table they share: wait for a newer one
			}
			want = max(want, w)
		}
		attempts = max(attempts, rt.attempts)
		if deadline.IsZero() || rt.deadline.Before(deadline) {
			deadline = rt.deadline
		}
	}
	c.subMu.Unlock()

	ctx, cancel := context.WithDeadline(s.ctx, deadline)
	if want > 0 {
		wctx, wcancel := context.WithTimeout(ctx, s.movedWait)
		s.waitTable(wctx, want)
		wcancel()
	} else {
		t := time.NewTimer(staleNodeDelay * time.Duration(attempts))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	cancel()

	c.subMu.Lock()
	ln.resume()
	failed := c.advanceLocked(ln, nil)
	c.subMu.Unlock()
	answer(failed)
}
