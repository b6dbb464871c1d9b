package queuenode

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// The queue node's end of a bucket hand-off (docs/handoff.md, steps 3 and
// 4): the owner takes a bucket's queues out whole (exportBucket) and the
// node adopting the bucket installs them (importQueues). Freezing the
// bucket, the link between the nodes and the gateways' rebinding are the
// callers' part.

// maxBucketBits bounds the bits exportBucket accepts: a bucket number is
// an int, and a shift by 64 or more means no table.
const maxBucketBits = 62

// exportBucket takes every queue of bucket b, in a table of 2^bits
// buckets, out of this node and returns their snapshots (Queue.Snapshot,
// subscribers named by gateway id), by name. Each queue leaves under its shard
// lock, its bytes released from the node's budget as when it is dropped.
// Nothing is told to anyone: the caller has frozen the bucket and hands
// the snapshots on (or imports them back, should the hand-off fail).
func (s *Server) exportBucket(bits, b int) ([]*imqpb.QueueSnapshot, error) {
	if bits < 0 || bits > maxBucketBits || b < 0 || b >= 1<<bits {
		return nil, fmt.Errorf("queuenode: export bucket %d of a table of %d bits: no such bucket", b, bits)
	}
	var out []*imqpb.QueueSnapshot
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, q := range sh.queues {
			if bucket.Of(name, bits) == b {
				out = append(out, q.Snapshot(gatewayOfKey))
				s.removeQueueLocked(sh, q)
			}
		}
		sh.mu.Unlock()
	}
	slices.SortFunc(out, func(x, y *imqpb.QueueSnapshot) int { return strings.Compare(x.GetName(), y.GetName()) })
	return out, nil
}

// importQueues installs the queues of snaps, restored (RestoreQueue) with
// this node's limits, each in place of any queue of the same name this
// node holds (a stale copy, closed as a moved queue is: its gateways are
// told). It installs all of them or none: a snapshot that RestoreQueue
// refuses, a name given twice, or queues that do not fit the node's memory
// budget (nothing is evicted for them; a stale copy they replace counts
// until it goes) or its MaxQueues is an error, with nothing installed and
// nothing charged.
//
// Each subscriber is bound to this node's newest link with its gateway.
// Those whose gateway has no link here are left out and returned, by
// queue: no leave call-out is made for them, the caller decides.
func (s *Server) importQueues(snaps []*imqpb.QueueSnapshot) (unbound map[string][]Subscriber, err error) {
	im, err := s.prepareImport(snaps)
	if err != nil {
		return nil, err
	}
	return s.install(im), nil
}

// pendingImport is an import that prepareImport restored and charged to
// the node's budget, for install.
type pendingImport struct {
	queues  []*Queue
	unbound map[string][]Subscriber
	now     time.Time
}

// prepareImport restores snaps and reserves their bytes: importQueues
// without installing anything.
func (s *Server) prepareImport(snaps []*imqpb.QueueSnapshot) (*pendingImport, error) {
	im := &pendingImport{queues: make([]*Queue, len(snaps)), now: s.cfg.Now()}
	links := s.newestLinks()
	seen := make(map[string]bool, len(snaps))
	var need int64
	var maxEpoch uint64
	for i, snap := range snaps {
		q, left, err := RestoreQueue(snap, &s.cfg.Limits, im.now, func(id string) (string, bool) {
			key, ok := links[id]
			return key, ok
		})
		if err != nil {
			return nil, err
		}
		if seen[q.Name()] {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "queue snapshots: %s twice", q.Name())
		}
		seen[q.Name()] = true
		im.queues[i] = q
		need += q.Bytes()
		maxEpoch = max(maxEpoch, q.Epoch())
		for _, sub := range left {
			im.addUnbound(q.Name(), sub)
		}
	}
	if n := s.queueCount.Load() + int64(len(im.queues)); n > int64(s.cfg.MaxQueues) {
		s.m.refused.WithLabelValues(refusedMaxQueues).Inc()
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s would hold %d queues with the %d handed to it; its limit is %d",
			s.cfg.NodeID, n, len(im.queues), s.cfg.MaxQueues)
	}
	if !s.tryReserve(need) {
		s.m.refusedNodeBytes.Inc()
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s has no room in its memory budget (%d bytes, --max-node-bytes) for the %d queues (%d bytes) handed to it",
			s.cfg.NodeID, s.cfg.MaxNodeBytes, len(im.queues), need)
	}
	s.epochMu.Lock()
	s.lastEpoch = max(s.lastEpoch, maxEpoch) // a later incarnation on this node gets a newer epoch
	s.epochMu.Unlock()
	return im, nil
}

func (im *pendingImport) addUnbound(queue string, sub Subscriber) {
	if im.unbound == nil {
		im.unbound = make(map[string][]Subscriber)
	}
	im.unbound[queue] = append(im.unbound[queue], sub)
}

// install puts im's queues in the shards, each under its shard's lock,
// and returns the subscribers left out.
func (s *Server) install(im *pendingImport) (unbound map[string][]Subscriber) {
	for _, q := range im.queues {
		sh := s.shardFor(q.Name())
		sh.mu.Lock()
		// A link that closes leaves s.links before its subscribers are
		// removed from the shards, under each shard's lock (serveLink,
		// removeGateway). So a link still in s.links now will find this
		// queue installed when it goes; the subscribers of one gone since
		// prepareImport are dropped here, or nothing would ever drop them.
		s.mu.RLock()
		var gone []string
		for _, key := range q.Gateways() {
			if s.links[key] == nil {
				gone = append(gone, key)
			}
		}
		s.mu.RUnlock()
		for _, key := range gone {
			q.RemoveGateway(key, im.now, func(sub Subscriber) {
				sub.Gateway = gatewayOfKey(key)
				im.addUnbound(q.Name(), sub)
			})
		}
		if old := sh.queues[q.Name()]; old != nil {
			s.closeQueueLocked(sh, old)
		}
		sh.queues[q.Name()] = q
		s.queueCount.Add(1)
		s.settleLocked(q, q.Bytes()) // takes over the reservation
		sh.mu.Unlock()
	}
	return im.unbound
}

// newestLinks returns, by gateway id, the key of this node's newest link
// with each gateway: a gateway that reconnected may still have its old
// link open here until the node notices it closed.
func (s *Server) newestLinks() map[string]string {
	serial := func(key string) uint64 {
		n, _ := strconv.ParseUint(key[strings.LastIndexByte(key, '/')+1:], 10, 64)
		return n
	}
	out := make(map[string]string)
	s.mu.RLock()
	defer s.mu.RUnlock()
	for key, l := range s.links {
		if cur, ok := out[l.gateway]; !ok || serial(key) > serial(cur) {
			out[l.gateway] = key
		}
	}
	return out
}
