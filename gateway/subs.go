package gateway

import (
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// queueOps is what a connection knows of one queue: whether the node has it
// subscribed (sub), and the joins and leaves still in flight. Only the
// latest of those decides the final state: the link delivers requests in
// order and the node applies them in order, so a reply or timeout of an older
// one must not change the local subscription.
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
	c.subMu.Lock()
	if c.subs[queue] == nil && c.subscribed() >= c.s.cfg.MaxSubscriptions {
		c.subMu.Unlock()
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "a connection may join %d queues", c.s.cfg.MaxSubscriptions))
		return
	}
	e, seq := c.opLocked(queue)
	c.subMu.Unlock()
	if e == nil {
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "a connection may join %d queues", c.s.cfg.MaxSubscriptions))
		return
	}
	sent := c.forward(id, queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Join{Join: m}}, func(r *imqpb.NodeReply) {
		c.subMu.Lock()
		latest := !c.dead && e.seq == seq
		var leave, lost bool
		switch {
		case !latest:
			// A later join or leave decides; after the reader ends,
			// leaveAll has already sent the leave that follows this join.
		case r.GetCode() == imqpb.Code_OK:
			sub := &localSub{mounts: make([]string, len(r.GetJoined().GetMounts()))}
			for i, ms := range r.GetJoined().GetMounts() {
				sub.mounts[i] = ms.GetName()
			}
			c.s.index.set(queue, c, e.sub, sub)
			e.sub = sub
		case r.GetCode() == imqpb.Code_TIMEOUT:
			// The node may still apply the join: a leave after it makes
			// the outcome certain, and an earlier subscription is gone too.
			leave, lost = true, e.sub != nil
			c.unsubscribeLocked(queue, e)
		}
		c.doneLocked(queue, e)
		c.subMu.Unlock()
		if leave {
			c.leaveNode(queue)
		}
		if lost {
			c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Unsubscribed{Unsubscribed: &imqpb.Unsubscribed{
				Queue: queue, Reason: imqpb.Reason_REASON_TIMEOUT, Rejoin: true,
				Message: "a join timed out and ended the subscription; rejoin",
			}}})
		}
		c.replyNode(id, r, func(rep *imqpb.Reply) { rep.Result = &imqpb.Reply_Joined{Joined: r.GetJoined()} })
	})
	if !sent {
		c.subMu.Lock()
		c.doneLocked(queue, e)
		c.subMu.Unlock()
	}
}

func (c *conn) leave(id uint64, m *imqpb.Leave) {
	queue := m.GetQueue()
	if err := wire.ValidateQueueName(queue); err != nil {
		c.replyErr(id, err)
		return
	}
	c.subMu.Lock()
	e, seq := c.opLocked(queue)
	if e != nil {
		c.unsubscribeLocked(queue, e) // no events after a leave, whatever the node says
	}
	c.subMu.Unlock()
	if e == nil {
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "too many joins and leaves in flight"))
		return
	}
	sent := c.forward(id, queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Leave{Leave: m}}, func(r *imqpb.NodeReply) {
		c.subMu.Lock()
		retry := r.GetCode() == imqpb.Code_TIMEOUT && !c.dead && e.seq == seq
		c.doneLocked(queue, e)
		c.subMu.Unlock()
		if retry { // the node may not have it: say it again, without waiting
			c.leaveNode(queue)
		}
		c.replyNode(id, r, nil)
	})
	if !sent {
		c.subMu.Lock()
		c.doneLocked(queue, e)
		c.subMu.Unlock()
	}
}

// leaveAll runs when the reader ends: every queue joined, or with a join in
// flight, is left on its node (after the join, in link order).
func (c *conn) leaveAll() {
	c.subMu.Lock()
	c.dead = true
	var queues []string
	for queue, e := range c.subs {
		c.unsubscribeLocked(queue, e)
		queues = append(queues, queue)
	}
	c.subMu.Unlock()
	for _, queue := range queues {
		c.leaveNode(queue)
	}
}

// lostQueue ends the subscription to queue after its node was lost; the
// fan-out index no longer holds it. It reports whether there was one.
func (c *conn) lostQueue(queue string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil {
		return false
	}
	e.sub = nil
	if e.inflight == 0 {
		delete(c.subs, queue)
	}
	return true
}
