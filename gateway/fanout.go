package gateway

import (
	"sync"

	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// localSub is one connection's subscription to one queue. It is immutable:
// a rejoin replaces it.
type localSub struct {
	mounts []string
	// node is the id of the queue node the subscription was made through
	// (the node whose link carried the join's OK reply), and link that very
	// link. The subscription lives as long as that link's connection: it
	// ends when the link goes down or is stopped, or when the node closes
	// the queue, whatever the table says by then. Only events from that link
	// reach it, so a subscriber never mixes two nodes' orders of a queue
	// while its bucket moves.
	//
	// A live hand-off (handoff.go) replaces the subscription with one
	// bound to the bucket's new owner: first detached (node the new owner,
	// link nil: no link's events reach it) until the gateway has that
	// node's link, then on it. A join is bound to the node that served it
	// (servedBy: the node it went to, as today's nodes relay no replies).
	node string
	link *nodeLink
	// from, on a subscription a hand-off rebound, is the link of the node
	// that handed the queue off. Should that hand-off fail after its mark,
	// the old owner keeps the queue and closes it on its own link
	// (QueueClosed) to send the subscribers back: queueClosed applies to
	// this subscription too.
	from *nodeLink
	// live, on a subscription a hand-off rebound, says the new owner
	// confirmed it holds the bucket with this gateway's subscribers
	// (bucket_held). Until then the subscription depends on the old owner
	// too: should from's link go down, the hand-off may never complete
	// and the new owner may never have the subscriber, so linkLost ends
	// it.
	live bool
}

// unconfirmed reports whether sub was rebound by a hand-off from node
// from and the new owner has not confirmed it yet.
func (sub *localSub) unconfirmed(from string) bool {
	return sub.from != nil && !sub.live && sub.from.node.ID == from
}

// index maps each queue to the local connections subscribed to it, per
// mount, so a fan-out walks exactly the connections that want its event. It
// is sharded by queue name so fan-outs of different queues don't share a lock.
type index struct {
	shards [256]indexShard
}

type indexShard struct {
	mu     sync.RWMutex
	queues map[string]map[string]map[*conn]*localSub // queue → mount → conn → its subscription; guarded by mu
}

func (ix *index) init() {
	for i := range ix.shards {
		ix.shards[i].queues = make(map[string]map[string]map[*conn]*localSub)
	}
}

func (ix *index) shard(queue string) *indexShard {
	var h uint32 = 2166136261 // FNV-1a: cheap, and only spreads locks
	for i := 0; i < len(queue); i++ {
		h = (h ^ uint32(queue[i])) * 16777619
	}
	return &ix.shards[h%uint32(len(ix.shards))]
}

// set replaces c's subscription to queue, old (nil if none), with sub (nil
// to remove it).
func (ix *index) set(queue string, c *conn, old, sub *localSub) {
	sh := ix.shard(queue)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	mounts := sh.queues[queue]
	if old != nil && mounts != nil {
		for _, m := range old.mounts {
			if conns := mounts[m]; conns != nil {
				delete(conns, c)
				if len(conns) == 0 {
					delete(mounts, m)
				}
			}
		}
		if len(mounts) == 0 {
			delete(sh.queues, queue)
			mounts = nil
		}
	}
	if sub == nil {
		return
	}
	if mounts == nil {
		mounts = make(map[string]map[*conn]*localSub, len(sub.mounts))
		sh.queues[queue] = mounts
	}
	for _, m := range sub.mounts {
		conns := mounts[m]
		if conns == nil {
			conns = make(map[*conn]*localSub)
			mounts[m] = conns
		}
		conns[c] = sub
	}
}

func (ix *index) count() int {
	n := 0
	for i := range ix.shards {
		sh := &ix.shards[i]
		sh.mu.RLock()
		n += len(sh.queues)
		sh.mu.RUnlock()
	}
	return n
}

// queueConn is one connection's subscription to one queue, by name.
type queueConn struct {
	queue string
	c     *conn
}

// via returns the subscriptions made through l: to queue only, or to every
// queue when queue is "". It is a snapshot taken under the shard locks; the
// caller checks each again under the connection's subMu (lock order: subMu,
// then a shard lock).
func (ix *index) via(l *nodeLink, queue string) []queueConn {
	through := func(sub *localSub) bool { return sub.link == l }
	if queue != "" {
		return ix.collect(through, queue, nil)
	}
	return ix.collect(through, "", func(string) bool { return true })
}

// viaFunc returns the subscriptions made through l to the queues keep
// takes, as via does.
func (ix *index) viaFunc(l *nodeLink, keep func(queue string) bool) []queueConn {
	return ix.collect(func(sub *localSub) bool { return sub.link == l }, "", keep)
}

// closedBy returns the subscriptions to queue that a QueueClosed from link
// l ends: those made through l, and those a hand-off moved off l.
func (ix *index) closedBy(l *nodeLink, queue string) []queueConn {
	return ix.collect(func(sub *localSub) bool { return sub.closedBy(l) }, queue, nil)
}

// closedBy reports whether a QueueClosed from link l ends sub.
func (sub *localSub) closedBy(l *nodeLink) bool { return sub.link == l || sub.from == l }

// collect returns the subscriptions match takes: to queue alone when keep
// is nil, else to every queue keep takes.
func (ix *index) collect(match func(*localSub) bool, queue string, keep func(string) bool) []queueConn {
	var out []queueConn
	collect := func(q string, mounts map[string]map[*conn]*localSub) {
		var seen map[*conn]bool // a connection on several mounts counts once
		if len(mounts) > 1 {
			seen = make(map[*conn]bool)
		}
		for _, conns := range mounts {
			for c, sub := range conns {
				if !match(sub) || seen[c] {
					continue
				}
				if seen != nil {
					seen[c] = true
				}
				out = append(out, queueConn{q, c})
			}
		}
	}
	if keep == nil {
		sh := ix.shard(queue)
		sh.mu.RLock()
		collect(queue, sh.queues[queue])
		sh.mu.RUnlock()
		return out
	}
	for i := range ix.shards {
		sh := &ix.shards[i]
		sh.mu.RLock()
		for q, mounts := range sh.queues {
			if keep(q) {
				collect(q, mounts)
			}
		}
		sh.mu.RUnlock()
	}
	return out
}

// fanout queues one event or state change from link l to every local
// subscriber of its mount whose subscription was made through l (through
// any link when l is nil, as in benchmarks). The frame is prepared once per
// encoding, not once per subscriber.
func (s *Server) fanout(l *nodeLink, d *imqpb.Deliver) {
	s.m.linkDelivers.Inc()
	sh := s.index.shard(d.GetQueue())
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	var bin, js *websocket.PreparedMessage
	var jsSize int
	jsFailed := false
	for c, sub := range sh.queues[d.GetQueue()][d.GetMount()] {
		if l != nil && sub.link != l {
			continue // made through another node while the queue's bucket moved
		}
		if !c.json {
			if bin == nil {
				bin, _ = websocket.NewPreparedMessage(websocket.BinaryMessage, d.GetFrame())
			}
			c.send(outFrame{pm: bin, size: len(d.GetFrame())})
			continue
		}
		if js == nil && !jsFailed {
			b, err := frameToJSON(d.GetFrame())
			if err != nil {
				s.log.Error("encode event as JSON", "queue", d.GetQueue(), "err", err)
				jsFailed = true
				continue
			}
			js, _ = websocket.NewPreparedMessage(websocket.TextMessage, b)
			jsSize = len(b)
		}
		if js != nil {
			c.send(outFrame{pm: js, size: jsSize})
		}
	}
}

func frameToJSON(frame []byte) ([]byte, error) {
	var m imqpb.ServerMessage
	if err := proto.Unmarshal(frame, &m); err != nil {
		return nil, err
	}
	return wire.MarshalJSON(&m)
}

// linkLost ends every local subscription made through link l, which went
// down or was stopped: each subscriber is told NODE_LOST and may rejoin (the
// queue may come back empty, or on another node). It goes by the link the
// subscription was made through, not by the table, which may have changed
// since; and by the link rather than the node id, so that the old link of a
// restarted node (new address, new link) does not end subscriptions already
// made through the new one.
//
// It also ends the subscriptions a hand-off from l's node rebound to
// another node that has not confirmed them (localSub.live): that hand-off
// may now never complete, and the new owner drop the bucket.
func (s *Server) linkLost(l *nodeLink) {
	n := 0
	const msg = "the queue's node was lost; rejoin (history and state may be gone)"
	for _, p := range s.index.via(l, "") {
		if p.c.endSub(p.queue, l, imqpb.Reason_REASON_NODE_LOST, msg) {
			n++
		}
	}
	rebound := func(sub *localSub) bool { return sub.from == l && !sub.live }
	for _, p := range s.index.collect(rebound, "", func(string) bool { return true }) {
		if p.c.endWhere(p.queue, rebound, imqpb.Reason_REASON_NODE_LOST, msg) {
			n++
		}
	}
	if n > 0 {
		s.log.Warn("subscriptions lost with queue node", "node", l.node.ID, "addr", l.node.LinkAddr, "subscriptions", n)
	}
}

// queueClosed ends the local subscriptions to a queue that link l's node no
// longer holds (its bucket moved), with the node's reason: the subscribers
// rejoin, on the new owner. Subscriptions to the queue made through other
// nodes stay, except those a hand-off from l's node had moved: that
// hand-off failed, and l's node took the queue back.
func (s *Server) queueClosed(l *nodeLink, qc *imqpb.QueueClosed) {
	reason, msg := qc.GetReason(), qc.GetMessage()
	if reason == imqpb.Reason_REASON_UNSPECIFIED {
		reason = imqpb.Reason_REASON_MOVED
	}
	if msg == "" {
		msg = "the queue moved to another node; rejoin"
	}
	n := 0
	for _, p := range s.index.closedBy(l, qc.GetQueue()) {
		if p.c.endClosed(p.queue, l, reason, msg) {
			n++
		}
	}
	s.log.Debug("queue closed by its node", "node", l.node.ID, "queue", qc.GetQueue(), "reason", reason.String(), "subscriptions", n)
}
