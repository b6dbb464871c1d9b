package gateway

import (
	"context"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// The gateway's half of a live bucket hand-off (docs/handoff.md, "The
// gateways"). When the old owner A marks bucket b moving to B, every local
// subscription to a queue of b made through A's link is moved to B's link,
// and B is told (BucketAdopted) so that it starts sending b's events to this
// gateway. A's link is FIFO and A sends nothing more of b after the mark;
// B sends nothing of b before the BucketAdopted: so the subscriptions may
// wait for B's link (a table the gateway has not fetched yet) without
// losing or doubling an event.
//
// A subscription between the two links is detached: in the fan-out index,
// with node set to B and link nil, so that no link's events reach it (a
// late event of b from A is ignored, as is any from a link it is not bound
// to). Its leave goes by the table meanwhile: the old owner answers one
// with a reply MOVED (the lane sends it again once the table routes to the
// new owner) and forwards one without a reply to the new owner.

const (
	// rebindWait bounds the wait for the new owner's link: for a table
	// that names it, and for the link to be up. Past it the detached
	// subscriptions end (MOVED, rejoin).
	rebindWait = 5 * time.Second
	// linkUpPoll is how often a rebind looks again at a link that has been
	// up before and is dialling again.
	linkUpPoll = 20 * time.Millisecond
)

// detached is one subscription taken off its link, waiting for the link of
// its node: sub is the detached localSub (link nil), so the rebind moves it
// only if nothing has replaced it since (a rejoin, a leave, the connection
// closing).
type detached struct {
	c     *conn
	queue string
	sub   *localSub
}

// bucketMoving takes A's mark that bucket m.bucket moves to m.to_node. It
// runs on A's link reader and does not block it: it detaches the
// subscriptions at once (so that nothing more of the bucket from A reaches
// them), and a goroutine finds B's link, binds them to it and sends
// BucketAdopted there.
func (s *Server) bucketMoving(from *nodeLink, m *imqpb.BucketMoving) {
	to := m.GetToNode()
	var subs []detached
	for _, p := range s.index.viaFunc(from, func(q string) bool { return bucket.Of(q, int(m.GetBits())) == int(m.GetBucket()) }) {
		if sub := p.c.detach(p.queue, from, to); sub != nil {
			subs = append(subs, detached{p.c, p.queue, sub})
		}
	}
	s.log.Debug("bucket moving", "from", from.node.ID, "to", to, "bucket", m.GetBucket(), "bits", m.GetBits(),
		"table_version", m.GetTableVersion(), "subscriptions", len(subs))
	adopted := &imqpb.BucketAdopted{Bucket: m.GetBucket(), Bits: m.GetBits(), FromNode: from.node.ID}
	s.goTracked(func() { s.rebind(to, m.GetTableVersion(), subs, adopted) }) // ends within rebindWait
}

// detach takes c's subscription to queue off link from, if it was made
// through it, and leaves it waiting for node to's link. It returns the
// detached subscription, or nil when there was none through from.
func (c *conn) detach(queue string, from *nodeLink, to string) *localSub {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || e.sub.link != from {
		return nil
	}
	sub := &localSub{mounts: e.sub.mounts, node: to, from: from}
	c.s.index.set(queue, c, e.sub, sub)
	e.sub = sub
	return sub
}

// rebind binds the detached subscriptions subs to node to's link, once the
// gateway holds a table of version v or newer that names it and the link is
// up (bounded by rebindWait), and then, when adopted is not nil, sends it on
// that link: a request without reply, never refused by the link's bound.
// When the link cannot be had, or its connection changed while the
// subscriptions were being bound (the node may have dropped this gateway's
// subscribers with it), they end: MOVED, rejoin. The BucketAdopted goes even
// when no subscription moved: the new owner holds the bucket's events for
// every gateway that got the mark until it hears from it.
func (s *Server) rebind(to string, v uint64, subs []detached, adopted *imqpb.BucketAdopted) {
	ctx, cancel := context.WithTimeout(s.ctx, s.rebindWait)
	l, conn := s.linkTo(ctx, to, v)
	cancel()
	moved := 0
	ok := l != nil
	if ok {
		bound := subs[:0]
		for _, d := range subs {
			if sub := d.c.bind(d.queue, d.sub, l); sub != nil {
				bound = append(bound, detached{d.c, d.queue, sub})
			}
		}
		subs, moved = bound, len(bound)
		var frame []byte
		if adopted != nil {
			frame, _ = link.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_BucketAdopted{BucketAdopted: adopted}})
		}
		// Checked after binding: a link that goes down from now on ends
		// the bound subscriptions itself (linkLost finds them).
		ok = l.sendIfCurrent(conn, frame)
	}
	if adopted != nil {
		s.m.rebinds.WithLabelValues(okLabel(ok)).Inc()
	}
	if ok {
		s.m.subsRebound.Add(float64(moved))
		s.log.Debug("subscriptions rebound", "node", to, "subscriptions", moved, "adopted", adopted != nil)
		return
	}
	ended := 0
	for _, d := range subs {
		if d.c.endSubIf(d.queue, d.sub, imqpb.Reason_REASON_MOVED, "the queue moved to another node, which could not be reached; rejoin") {
			ended++
		}
	}
	s.log.Debug("rebind failed", "node", to, "table_version", v, "subscriptions_ended", ended)
}

// bind moves c's detached subscription to queue, sub, to link l, unless
// something replaced it since. It returns the bound subscription.
func (c *conn) bind(queue string, sub *localSub, l *nodeLink) *localSub {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub != sub {
		return nil
	}
	next := &localSub{mounts: sub.mounts, node: sub.node, link: l, from: sub.from}
	c.s.index.set(queue, c, sub, next)
	e.sub = next
	return next
}

// linkTo returns the link to node id and its connection, once the gateway
// routes by a table of version v or newer naming the node and the link is
// up, or nils when ctx ends first. A table that does not name the node
// makes it wait for a newer one.
func (s *Server) linkTo(ctx context.Context, id string, v uint64) (*nodeLink, *link.Conn) {
	for {
		r := s.routes.Load()
		if r.table.Version() >= v {
			if l := r.links[id]; l != nil {
				if conn := l.waitUp(ctx); conn != nil {
					return l, conn
				}
				return nil, nil
			}
			v = r.table.Version() + 1
		}
		if !s.waitTable(ctx, v) {
			return nil, nil
		}
	}
}

// waitUp returns l's connection once it is up, or nil when ctx ends first.
func (l *nodeLink) waitUp(ctx context.Context) *link.Conn {
	select {
	case <-l.everUp:
	case <-ctx.Done():
		return nil
	}
	t := time.NewTicker(linkUpPoll)
	defer t.Stop()
	for {
		l.mu.Lock()
		conn := l.conn
		l.mu.Unlock()
		if conn != nil {
			return conn
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil
		}
	}
}

// sendIfCurrent reports whether conn is still l's connection, and if so
// sends frame (if not nil) on it, past the link's bound.
func (l *nodeLink) sendIfCurrent(conn *link.Conn, frame []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn != conn || conn == nil {
		return false
	}
	return frame == nil || conn.SendAlways(frame) == nil
}

// servedBy returns where a join answered OK on link l binds its
// subscription: node l's, or, when the reply names another node that
// served it (served_by), that node and its link if the gateway has one
// (nil otherwise). Today's queue nodes never set served_by: during a
// hand-off the old owner answers MOVED rather than relay a reply
// (docs/handoff.md, step 5). The gateway honours the field so that a node
// that relays replies binds its joins right; this is the one place that
// reads it.
func (s *Server) servedBy(l *nodeLink, r *imqpb.NodeReply) (string, *nodeLink) {
	sb := r.GetServedBy()
	if sb == "" || sb == l.node.ID {
		return l.node.ID, l
	}
	return sb, s.routes.Load().links[sb]
}

// bucketHeld takes node l's word that it adopted bucket m.bucket from
// m.from_node and holds this gateway's subscribers to it: the
// subscriptions that hand-off rebound to l are live there, and no longer
// end with the old owner's link (linkLost). A QueueClosed from the old
// owner still ends them (localSub.from): it sends one only when it took
// the bucket back, the hand-off having failed.
func (s *Server) bucketHeld(l *nodeLink, m *imqpb.BucketAdopted) {
	n := 0
	for _, p := range s.rebound(l, m) {
		if p.c.confirm(p.queue, l, m.GetFromNode()) {
			n++
		}
	}
	s.log.Debug("bucket held by its new owner", "node", l.node.ID, "from", m.GetFromNode(), "bucket", m.GetBucket(), "bits", m.GetBits(), "subscriptions", n)
}

// bucketDropped takes node l's word that it gave up holding bucket
// m.bucket for this gateway (it did not confirm in time) and removed its
// subscribers: the subscriptions a hand-off from m.from_node rebound to l,
// still unconfirmed, end (MOVED, rejoin). Those bound to l when it gave up
// were ended by its QueueClosed already.
func (s *Server) bucketDropped(l *nodeLink, m *imqpb.BucketAdopted) {
	from := m.GetFromNode()
	match := func(sub *localSub) bool { return sub.link == l && sub.unconfirmed(from) }
	n := 0
	for _, p := range s.rebound(l, m) {
		if p.c.endWhere(p.queue, match, imqpb.Reason_REASON_MOVED, "the queue moved to another node, which did not keep this subscription; rejoin") {
			n++
		}
	}
	s.log.Debug("bucket dropped by its new owner", "node", l.node.ID, "from", from, "bucket", m.GetBucket(), "bits", m.GetBits(), "subscriptions_ended", n)
}

// rebound returns the subscriptions to the queues of m's bucket bound to l
// that a hand-off from m.from_node rebound and l has not confirmed.
func (s *Server) rebound(l *nodeLink, m *imqpb.BucketAdopted) []queueConn {
	from := m.GetFromNode()
	return s.index.collect(func(sub *localSub) bool { return sub.link == l && sub.unconfirmed(from) }, "",
		func(q string) bool { return bucket.Of(q, int(m.GetBits())) == int(m.GetBucket()) })
}

// confirm marks c's subscription to queue live (localSub.live), if it is
// bound to l and was rebound by a hand-off from node from.
func (c *conn) confirm(queue string, l *nodeLink, from string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	e := c.subs[queue]
	if e == nil || e.sub == nil || e.sub.link != l || !e.sub.unconfirmed(from) {
		return false
	}
	next := *e.sub
	next.live = true
	c.s.index.set(queue, c, e.sub, &next)
	e.sub = &next
	return true
}
