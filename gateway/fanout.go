package gateway

import (
	"slices"
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

func (ls *localSub) wants(mount string) bool { return slices.Contains(ls.mounts, mount) }

// index maps each queue to the local connections subscribed to it, sharded
// by queue name so fan-outs of different queues don't share a lock.
type index struct {
	shards [256]indexShard
}

type indexShard struct {
	mu     sync.RWMutex
	queues map[string]map[*conn]*localSub // Guarded by mu.
}

func (ix *index) init() {
	for i := range ix.shards {
		ix.shards[i].queues = make(map[string]map[*conn]*localSub)
	}
}

func (ix *index) shard(queue string) *indexShard {
	var h uint32 = 2166136261 // FNV-1a: cheap, and only spreads locks
	for i := 0; i < len(queue); i++ {
		h = (h ^ uint32(queue[i])) * 16777619
	}
	return &ix.shards[h%uint32(len(ix.shards))]
}

func (ix *index) add(queue string, c *conn, sub *localSub) {
	sh := ix.shard(queue)
	sh.mu.Lock()
	subs := sh.queues[queue]
	if subs == nil {
		subs = make(map[*conn]*localSub)
		sh.queues[queue] = subs
	}
	subs[c] = sub
	sh.mu.Unlock()
}

func (ix *index) remove(queue string, c *conn) {
	sh := ix.shard(queue)
	sh.mu.Lock()
	if subs := sh.queues[queue]; subs != nil {
		delete(subs, c)
		if len(subs) == 0 {
			delete(sh.queues, queue)
		}
	}
	sh.mu.Unlock()
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

// take removes and returns every queue for which match is true.
func (ix *index) take(match func(queue string) bool) map[string]map[*conn]*localSub {
	out := make(map[string]map[*conn]*localSub)
	for i := range ix.shards {
		sh := &ix.shards[i]
		sh.mu.Lock()
		for q, subs := range sh.queues {
			if match(q) {
				out[q] = subs
				delete(sh.queues, q)
			}
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
	for c, sub := range sh.queues[d.GetQueue()] {
		if !sub.wants(d.GetMount()) {
			continue
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

// nodeLost ends every local subscription to a queue on node: each subscriber
// is told NODE_LOST and may rejoin (the queue may come back empty).
func (s *Server) nodeLost(nodeID string) {
	table := s.table.Load()
	lost := s.index.take(func(q string) bool { return table.Lookup(q).ID == nodeID })
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
