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
}

// index maps each queue to the local connections subscribed to it, per
// mount, so a fan-out walks exactly the connections that want its event. It
// is sharded by queue name so fan-outs of different queues don't share a lock.
type index struct {
	shards [256]indexShard
}

type indexShard struct {
	mu     sync.RWMutex
	queues map[string]map[string]map[*conn]struct{} // queue → mount → conns; guarded by mu
}

func (ix *index) init() {
	for i := range ix.shards {
		ix.shards[i].queues = make(map[string]map[string]map[*conn]struct{})
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
		mounts = make(map[string]map[*conn]struct{}, len(sub.mounts))
		sh.queues[queue] = mounts
	}
	for _, m := range sub.mounts {
		conns := mounts[m]
		if conns == nil {
			conns = make(map[*conn]struct{})
			mounts[m] = conns
		}
		conns[c] = struct{}{}
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

// take removes every queue for which match is true and returns, for each,
// its subscribed connections.
func (ix *index) take(match func(queue string) bool) map[string]map[*conn]struct{} {
	out := make(map[string]map[*conn]struct{})
	for i := range ix.shards {
		sh := &ix.shards[i]
		sh.mu.Lock()
		for q, mounts := range sh.queues {
			if !match(q) {
				continue
			}
			conns := make(map[*conn]struct{})
			for _, cs := range mounts {
				for c := range cs {
					conns[c] = struct{}{}
				}
			}
			out[q] = conns
			delete(sh.queues, q)
		}
		sh.mu.Unlock()
	}
	return out
}

// fanout queues one event or state change to every local subscriber of its
// mount. The frame is prepared once per encoding, not once per subscriber.
func (s *Server) fanout(d *imqpb.Deliver) {
	s.m.linkDelivers.Inc()
	sh := s.index.shard(d.GetQueue())
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	var bin, js *websocket.PreparedMessage
	var jsSize int
	jsFailed := false
	for c := range sh.queues[d.GetQueue()][d.GetMount()] {
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

// nodeLost ends every local subscription to a queue on node: each subscriber
// is told NODE_LOST and may rejoin (the queue may come back empty).
func (s *Server) nodeLost(nodeID string) {
	table := s.table.Load()
	lost := s.index.take(func(q string) bool {
		node, _ := table.Lookup(q)
		return node.ID == nodeID
	})
	n := 0
	for queue, subs := range lost {
		for c := range subs {
			if !c.lostQueue(queue) {
				continue
			}
			n++
			c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Unsubscribed{Unsubscribed: &imqpb.Unsubscribed{
				Queue: queue, Reason: imqpb.Reason_REASON_NODE_LOST, Rejoin: true,
				Message: "the queue's node was lost; rejoin (history and state may be gone)",
			}}})
		}
	}
	if n > 0 {
		s.log.Warn("subscriptions lost with queue node", "node", nodeID, "queues", len(lost), "subscriptions", n)
	}
}
