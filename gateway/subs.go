package gateway

import (
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/reasons"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// queueOps is what a connection knows of one queue: whether the node has it
// subscribed (sub), and the joins and leaves still in flight. Only the
// latest of those decides the final state: the link delivers requests in
// order and the node applies them in order, so a reply or timeout of an older
// one must not change the local subscription. A join or leave answered MOVED
// is sent again (route.go) only while it is the latest, under subMu, so it
// never overtakes a later one.
type queueOps struct {
	sub      *localSub // in the fan-out index while not nil
	seq      uint64    // the latest join or leave sent
	inflight int       // joins and leaves awaiting the node
}

// opLocked starts a join or leave of queue and returns its entry and number.
// It returns nil when the connection holds its limit of queues.
func (c *conn) opLocked(queue string) (*queueOps, uint64) {
	e := c.subs[queue]
	if e == nil {
		if len(c.subs) >= c.s.cfg.MaxSubscriptions+c.s.cfg.MaxInflight {
			return nil, 0
		}
		e = &queueOps{}
		c.subs[queue] = e
	}
	c.opSeq++
	e.seq = c.opSeq
	e.inflight++
	return e, e.seq
}

// doneLocked ends one operation on e and forgets the queue when nothing is
// left of it.
func (c *conn) doneLocked(queue string, e *queueOps) {
	e.inflight--
	if e.inflight == 0 && e.sub == nil && c.subs[queue] == e {
		delete(c.subs, queue)
	}
}

// unsubscribeLocked takes queue out of the fan-out.
func (c *conn) unsubscribeLocked(queue string, e *queueOps) {
	if e.sub != nil {
		c.s.index.set(queue, c, e.sub, nil)
		e.sub = nil
	}
}

func (c *conn) subscribed() int {
	n := 0
	for _, e := range c.subs {
		if e.sub != nil || e.inflight > 0 {
			n++
		}
	}
	return n
}

func (c *conn) join(id uint64, m *imqpb.Join) {
	queue := m.GetQueue()
	if err := wire.ValidateQueueName(queue); err != nil {
		c.replyErr(id, err)
		return
	}
	if !c.reserve(id) {
		return
	}
	c.subMu.Lock()
	var e *queueOps
	var seq uint64
	if c.subs[queue] != nil || c.subscribed() < c.s.cfg.MaxSubscriptions {
		e, seq = c.opLocked(queue)
	}
	c.subMu.Unlock()
	if e == nil {
		c.unreserve()
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "a connection may join %d queues", c.s.cfg.MaxSubscriptions))
		return
	}
	c.forward(queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Join{Join: m}}, e, seq, nil, func(r *imqpb.NodeReply, l *nodeLink) {
		c.subMu.Lock()
		latest := !c.dead && e.seq == seq
		var leave, lost bool
		var before *nodeLink // the link of the subscription this join ends or replaces
		if e.sub != nil {
			before = e.sub.link
		}
		now := l // the link of the subscription now
		var wait *detached
		switch {
		case !latest:
			// A later join or leave decides; after the reader ends,
			// leaveAll has already sent the leave that follows this join.
			before = nil
		case r.GetCode() == imqpb.Code_OK && l != nil:
			// The node that served the join holds the subscriber: l's
			// node, or the one the reply names (servedBy, handoff.go).
			// The lane counted it against l, where it went.
			node, bound := c.s.servedBy(l, r)
			sub := &localSub{mounts: make([]string, len(r.GetJoined().GetMounts())), node: node, link: bound}
			for i, ms := range r.GetJoined().GetMounts() {
				sub.mounts[i] = ms.GetName()
			}
			c.s.index.set(queue, c, e.sub, sub)
			e.sub = sub
			// Bound first, checked second: a link that goes down after
			// the check ends the subscription itself (linkLost). One not
			// up, or not known yet, is waited for (rebind).
			if bound != l && (bound == nil || !bound.isUp()) {
				if bound != nil {
					d := &localSub{mounts: sub.mounts, node: node}
					c.s.index.set(queue, c, sub, d)
					e.sub, sub = d, d
				}
				wait = &detached{c, queue, sub}
			}
			now = sub.link
			if before != nil && before.node.ID == node {
				before = now // the node has this subscriber: no leave there
			}
		case r.GetCode() == imqpb.Code_TIMEOUT:
			// The node may still apply the join: a leave after it makes
			// the outcome certain, and an earlier subscription is gone too.
			leave, lost = true, e.sub != nil
			c.unsubscribeLocked(queue, e)
		default:
			before = nil // the earlier subscription, if any, stands
		}
		// The leaves go under subMu, so that no later join of the queue
		// can reach the node first and be undone by them.
		if leave {
			c.leaveNode(queue, l) // where the join went
		}
		if before != nil && before != now {
			// The earlier subscription was made through another node (the
			// queue's bucket moved since): leave it there, so that node
			// does not keep a subscriber this connection no longer has.
			c.leaveNode(queue, before)
		}
		c.doneLocked(queue, e)
		c.subMu.Unlock()
		if wait != nil {
			c.s.goTracked(func() { c.s.rebind(wait.sub.node, r.GetTableVersion(), []detached{*wait}, nil) }) // ends within rebindWait
		}
		if lost {
			timedOut := reasons.Of(imqpb.Reason_REASON_TIMEOUT)
			c.s.m.unsubscribed.WithLabelValues(timedOut.Label).Inc()
			c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Unsubscribed{Unsubscribed: &imqpb.Unsubscribed{
				Queue: queue, Reason: imqpb.Reason_REASON_TIMEOUT, Rejoin: timedOut.Again(true),
				Message: "a join timed out and ended the subscription; rejoin",
			}}})
		}
		c.replyNode(id, r, func(rep *imqpb.Reply) { rep.Result = &imqpb.Reply_Joined{Joined: r.GetJoined()} })
	})
}

// leave forwards a leave to the node the subscription was made through
// (which, while the queue's bucket moves, may not be the table's owner), or
// by the table when there is none; a join still in flight to the table's
// node is left there too.
func (c *conn) leave(id uint64, m *imqpb.Leave) {
	queue := m.GetQueue()
	if err := wire.ValidateQueueName(queue); err != nil {
		c.replyErr(id, err)
		return
	}
	if !c.reserve(id) {
		return
	}
	c.subMu.Lock()
	e, seq := c.opLocked(queue)
	var via *nodeLink
	if e != nil {
		if e.sub != nil {
			via = e.sub.link
			if e.inflight > 1 { // a join on its way, by the table
				if l, _, err := c.s.linkFor(queue); err == nil && l != via {
					c.leaveNode(queue, l)
				}
			}
		}
		c.unsubscribeLocked(queue, e) // no events after a leave, whatever the node says
	}
	c.subMu.Unlock()
	if e == nil {
		c.unreserve()
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "too many joins and leaves in flight"))
		return
	}
	c.forward(queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Leave{Leave: m}}, e, seq, via, func(r *imqpb.NodeReply, l *nodeLink) {
		c.subMu.Lock()
		// A timeout leaves the outcome unknown, and a leave the gateway
		// could not send (l nil: the link was full, say) never reached the
		// node, while the subscription is already gone here: say it again,
		// without a reply (such a leave is never refused), unless a later
		// join or leave decides.
		retry := (r.GetCode() == imqpb.Code_TIMEOUT || l == nil) && !c.dead && e.seq == seq
		if l == nil {
			l = via
		}
		if retry { // under subMu, before any later join of the queue
			c.leaveNode(queue, l)
		}
		c.doneLocked(queue, e)
		c.subMu.Unlock()
		c.replyNode(id, r, nil)
	})
}

// leaveAll runs when the reader ends: every queue joined, or with a join in
// flight, is left on its node (after the join, in link order). A
// subscription is left on the node it was made through, so that a table
// change since does not send the leave to a node that never had it; a queue
// with a join or leave in flight is left by the table too, where that
// request went (a leave a node does not need is harmless).
func (c *conn) leaveAll() {
	type left struct {
		queue    string
		via      *nodeLink
		inflight bool
	}
	c.subMu.Lock()
	c.dead = true
	var queues []left
	for queue, e := range c.subs {
		var via *nodeLink
		if e.sub != nil {
			via = e.sub.link
		}
		c.unsubscribeLocked(queue, e)
		queues = append(queues, left{queue, via, e.inflight > 0})
	}
	c.subMu.Unlock()
	for _, q := range queues {
		if q.via != nil {
			c.leaveNode(q.queue, q.via)
		}
		if q.via == nil || q.inflight {
			if l, _, err := c.s.linkFor(q.queue); err == nil && l != q.via {
				c.leaveNode(q.queue, l)
			}
		}
	}
}

// endSub ends the subscription to queue if it was made through link l, and
// tells the client why, and whether to rejoin as the reason's row says
// (rejoin for the reasons of a lost link or a moved queue). The check, the removal from the
// fan-out index and the message all happen under subMu, so the message
// cannot pass the reply to a later join of the queue. It reports whether
// there was such a subscription.
func (c *conn) endSub(queue string, l *nodeLink, reason imqpb.Reason, msg string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || e.sub.link != l {
		return false
	}
	c.endLocked(queue, e, reason, msg)
	return true
}

// endClosed is endSub for a QueueClosed from link l: it also ends a
// subscription a hand-off moved off l (localSub.from).
func (c *conn) endClosed(queue string, l *nodeLink, reason imqpb.Reason, msg string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || !e.sub.closedBy(l) {
		return false
	}
	c.endLocked(queue, e, reason, msg)
	return true
}

// endSubIf is endSub for the subscription sub itself, whatever its link
// (a detached one has none: handoff.go).
func (c *conn) endSubIf(queue string, sub *localSub, reason imqpb.Reason, msg string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || e.sub != sub {
		return false
	}
	c.endLocked(queue, e, reason, msg)
	return true
}

// endWhere is endSub for a subscription match takes, whatever its link.
func (c *conn) endWhere(queue string, match func(*localSub) bool, reason imqpb.Reason, msg string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || !match(e.sub) {
		return false
	}
	c.endLocked(queue, e, reason, msg)
	return true
}

// endLocked ends the subscription e and tells the client; the caller holds
// subMu.
func (c *conn) endLocked(queue string, e *queueOps, reason imqpb.Reason, msg string) {
	node := e.sub.node
	c.unsubscribeLocked(queue, e)
	if e.inflight == 0 {
		delete(c.subs, queue)
	}
	info := reasons.Of(reason)
	c.s.m.unsubscribed.WithLabelValues(info.Label).Inc()
	c.s.log.Debug("subscription ended", "session", c.session, "queue", queue, "node", node, "reason", reason.String())
	c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Unsubscribed{Unsubscribed: &imqpb.Unsubscribed{
		Queue: queue, Reason: reason, Rejoin: info.Again(true), Message: msg,
	}}})
}
