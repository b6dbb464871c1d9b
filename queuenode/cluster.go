package queuenode

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/member"
	imqpb "github.com/imq-dev/imq/proto"
)

// movedMessage is what gateways pass on to clients whose queue was closed
// because its bucket moved.
const movedMessage = "the queue's bucket moved to another node; rejoin"

// startCluster joins the membership and makes the cluster runtime install
// the boss's tables with applyTable (Run starts following them). It runs in
// New, once the listeners are bound.
func (s *Server) startCluster() error {
	c, err := cluster.Start(cluster.Config{
		Member:  *s.cfg.Member,
		Meta:    member.Meta{Role: member.RoleQueueNode, ID: s.cfg.NodeID, LinkAddr: s.LinkAddr(), HTTPAddr: s.InternalAddr()},
		Install: s.applyTable,
		OnPeers: s.onMembersChange,
		Logger:  s.log,
	})
	if err != nil {
		return fmt.Errorf("queuenode: %w", err)
	}
	s.cluster = c
	return nil
}

// leaveCluster leaves the membership gracefully, so that the boss sees
// "left" at once instead of waiting for the failure detector. It is
// idempotent; standalone, it does nothing.
func (s *Server) leaveCluster() {
	if s.cluster != nil {
		s.cluster.Leave()
	}
}

// currentTable returns the bucket table requests are checked against
// (bucket.Empty() in standalone mode).
func (s *Server) currentTable() *bucket.Table { return s.table.Load() }

// movedError is a MOVED answer: the table by which this node does not own
// the queue's bucket travels in NodeReply.table_version.
type movedError struct {
	err     *imqerr.Error
	version uint64
}

func (e *movedError) Error() string { return e.err.Error() }
func (e *movedError) Unwrap() error { return e.err }

// checkOwnerLocked reports whether this node serves queue: always in
// standalone mode; in cluster mode only when the current table gives the
// queue's bucket to this node. Otherwise it answers MOVED with the node's
// table version, also before the node has a table (version 0) or when its
// table has no nodes: a gateway that routed by a newer table then resends
// after a short pause, while the request's table_version makes this node
// fetch that table at once (a node added to the table is often asked
// before it has heard of the table).
//
// The caller holds the queue's shard lock. That is what makes a table change
// safe: applyTable stores the new table first and then takes each shard lock
// in turn to close the queues it no longer owns, while a request takes the
// shard lock first and then loads the table. So a request either runs wholly
// before that shard's sweep (and a queue it creates or feeds on a moved
// bucket is closed by the sweep, after the request's reply) or sees the new
// table and is answered MOVED; no queue outlives the sweep on a bucket the
// node no longer owns.
func (s *Server) checkOwnerLocked(queue string) error {
	if s.cfg.Member == nil {
		return nil
	}
	if handled, err := s.handoffOwnerLocked(queue); handled {
		return err
	}
	t := s.table.Load()
	owner, ok := t.Lookup(queue)
	if !ok {
		msg := "queue node %s has no bucket table from the boss yet (version %d)"
		if t.Version() > 0 {
			msg = "queue node %s holds bucket table version %d, which has no queue nodes"
		}
		return &movedError{err: imqerr.New(imqpb.Code_MOVED, msg, s.cfg.NodeID, t.Version()), version: t.Version()}
	}
	if owner.ID != s.cfg.NodeID {
		return &movedError{
			err: imqerr.New(imqpb.Code_MOVED, "queue %s is in bucket %d, owned by node %s in table version %d",
				queue, t.Bucket(queue), owner.ID, t.Version()),
			version: t.Version(),
		}
	}
	return nil
}

// applyTable installs next, a newer table from the boss, and closes every
// queue whose bucket this node does not own in it and does not hold for a
// hand-off: a bucket it is handing off (docs/handoff.md) or has adopted
// keeps its queues; any other the boss gave away at once (it thought this
// node dead), and their subscribers rejoin on the new owner in a new
// epoch. Each gateway with subscribers to a closed queue is sent one
// QueueClosed for it. Then it starts the hand-offs next marks and retires
// those next completes. It is the cluster runtime's install hook: it runs
// for each newer table, one at a time; cur is the table it installed last.
func (s *Server) applyTable(cur, next *bucket.Table) {
	// Store first, sweep second: see checkOwnerLocked.
	s.table.Store(next)
	s.updateAdopted(next)
	closed := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, q := range sh.queues {
			if owner, ok := next.Lookup(name); ok && owner.ID == s.cfg.NodeID {
				continue
			}
			if handled, _ := s.handoffOwnerLocked(name); handled {
				continue // handing it off, or adopted
			}
			s.closeQueueLocked(sh, q)
			closed++
		}
		sh.mu.Unlock()
	}
	s.retireIfMoved(next)
	s.ho.kickMoves()
	s.log.Info("bucket table applied", "version", next.Version(), "from", cur.Version(),
		"buckets_owned", next.Counts()[s.cfg.NodeID], "buckets", next.Buckets(), "queues_closed", closed)
}

// closeQueueLocked drops q, which moved to another node, and tells each
// gateway with a subscriber to it. The caller holds sh's lock, so the
// QueueClosed follows every event of q on each link; sends are bounded and
// never block.
func (s *Server) closeQueueLocked(sh *shard, q *Queue) {
	var frame []byte // encoded once for every gateway
	for _, gw := range q.Gateways() {
		s.mu.RLock()
		l := s.links[gw]
		s.mu.RUnlock()
		if l == nil {
			continue
		}
		if frame == nil {
			frame = encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
				Queue: q.Name(), Reason: imqpb.Reason_REASON_MOVED, Message: movedMessage,
			}}})
		}
		l.send(frame)
	}
	s.removeQueueLocked(sh, q)
	s.m.queuesMoved.Inc()
}

// onMembersChange runs with the live members after the membership changes
// (the cluster runtime's OnPeers). It closes the links of gateways that were
// live members and no longer are (dead or left): a closed link's subscribers
// are removed by serveLink. A gateway's TCP connections usually close first;
// this covers a gateway that is partitioned away or hung while its
// connections stay open.
func (s *Server) onMembersChange(peers []member.Peer) {
	s.gwMu.Lock()
	live := make(map[string]bool)
	for _, p := range peers {
		if p.Meta.Role == member.RoleGateway {
			live[p.Meta.ID] = true
		}
	}
	var gone []string
	for id := range s.liveGateways {
		if !live[id] {
			gone = append(gone, id)
		}
	}
	s.liveGateways = live
	s.gwMu.Unlock()
	for _, id := range gone {
		s.closeGatewayLinks(id)
	}
}

// closeGatewayLinks closes every link whose hello named gateway id.
func (s *Server) closeGatewayLinks(id string) {
	var links []*link
	s.mu.RLock()
	for _, l := range s.links {
		if l.gateway == id {
			links = append(links, l)
		}
	}
	s.mu.RUnlock()
	for _, l := range links {
		l.close(errors.New("the gateway is no longer a cluster member"))
		s.m.deadGatewayLinks.Inc()
	}
	s.log.Info("gateway left the cluster", "gateway", id, "links_closed", len(links))
}

// serveTable answers GET /v1/table with the node's current table.
func (s *Server) serveTable(w http.ResponseWriter, _ *http.Request) {
	cluster.ServeTable(w, s.currentTable())
}
