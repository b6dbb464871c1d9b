package queuenode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	imqlink "github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// The new owner's side of a hand-off (docs/handoff.md, steps 4 and 6):
// a node link from the old owner stages the bucket's queues, installs
// them on HandoffEnd, and then carries the requests the old owner
// forwards. Events of the adopted bucket are held per gateway until that
// gateway confirms it saw the old owner's mark (BucketAdopted).
//
// Subscribers whose gateway has no link to this node when the queues are
// installed are dropped, and that gateway is told QueueClosed(MOVED) for
// their queues when it sends BucketAdopted (or, should it never, when its
// hold times out and it links here later, never: it then has no link to
// either node to have kept them on). The simplest honest behaviour: the
// session rejoins, same epoch and history.

// staged is the snapshots of one bucket received so far on a node link.
type staged struct {
	snaps []*imqpb.QueueSnapshot
	bytes int64
	err   error // set once the staging is refused: the ack says so
}

// nodeIn is an accepted node link.
type nodeIn struct {
	s       *Server
	conn    *imqlink.Conn
	from    string
	ctx     context.Context
	cancel  context.CancelFunc
	staging map[bkey]*staged // reader only
	proxies map[string]*link // reader only: by gateway link key
}

// serveNodeLink runs an accepted link from another queue node until it
// closes.
func (s *Server) serveNodeLink(conn *imqlink.Conn, log *slog.Logger) {
	n := &nodeIn{s: s, conn: conn, from: conn.Peer().ID, staging: make(map[bkey]*staged), proxies: make(map[string]*link)}
	n.ctx, n.cancel = context.WithCancel(s.ctx)
	log = log.With("node_link", n.from)
	log.Info("node link up")
	writerDone := make(chan struct{})
	go func() { // ends when the link closes
		defer close(writerDone)
		conn.WriteLoop()
	}()
	// Shutdown ends the link: the peer's pings would keep it open, and Run
	// waits for this goroutine.
	stop := context.AfterFunc(s.ctx, func() { conn.Close(nil) })
	defer stop()
	err := n.readLoop()
	conn.Close(err)
	n.cancel()
	<-writerDone
	for _, p := range n.proxies {
		p.async.Wait()
	}
	s.ho.mu.Lock()
	for _, st := range n.staging {
		s.ho.staged -= st.bytes
	}
	s.ho.mu.Unlock()
	log.Info("node link closed", "err", err)
}

func (n *nodeIn) readLoop() error {
	for {
		b, err := n.conn.Next()
		if err != nil {
			return err
		}
		var up imqpb.LinkUp
		if err := proto.Unmarshal(b, &up); err != nil {
			return fmt.Errorf("decode link frame: %w", err)
		}
		switch x := up.GetMsg().(type) {
		case *imqpb.LinkUp_Ping:
			n.conn.SendAlways(encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Pong{Pong: &imqpb.Pong{TimeMs: time.Now().UnixMilli()}}}))
		case *imqpb.LinkUp_HandoffQueues:
			n.stage(x.HandoffQueues, int64(len(b)))
		case *imqpb.LinkUp_HandoffEnd:
			n.adopt(x.HandoffEnd)
		case *imqpb.LinkUp_Request:
			n.forwarded(x.Request)
		default:
			return errors.New("node link frame is not a ping, hand-off or request")
		}
	}
}

// stage keeps a frame's snapshots, within the node's memory budget (what
// its queues hold plus every staging in progress).
func (n *nodeIn) stage(hq *imqpb.HandoffQueues, size int64) {
	s := n.s
	k := bkey{bits: int(hq.GetBits()), b: int(hq.GetBucket())}
	st := n.staging[k]
	if st == nil {
		st = &staged{err: n.mayTake(k, hq.GetTableVersion())}
		n.staging[k] = st
	}
	if st.err != nil {
		return
	}
	s.ho.mu.Lock()
	fits := s.nodeBytes.Load()+s.ho.staged+size <= s.cfg.MaxNodeBytes
	if fits {
		s.ho.staged += size
		st.bytes += size
	} else {
		s.ho.staged -= st.bytes
		st.bytes = 0
	}
	s.ho.mu.Unlock()
	if !fits {
		st.snaps = nil
		st.err = imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s has no room in its memory budget for bucket %d", s.cfg.NodeID, k.b)
		return
	}
	st.snaps = append(st.snaps, hq.GetQueues()...)
}

// adopt installs the staged queues of a bucket and answers HandoffAck.
func (n *nodeIn) adopt(end *imqpb.HandoffEnd) {
	s := n.s
	k := bkey{bits: int(end.GetBits()), b: int(end.GetBucket())}
	st := n.staging[k]
	delete(n.staging, k)
	if st == nil {
		st = &staged{}
	}
	s.ho.mu.Lock()
	s.ho.staged -= st.bytes
	s.ho.mu.Unlock()
	err := st.err
	if err == nil && (k.bits > maxBucketBits || k.b >= 1<<k.bits) {
		err = imqerr.New(imqpb.Code_BAD_REQUEST, "bucket %d of %d bits: no such bucket", k.b, k.bits)
	}
	if err == nil {
		// Again at the end: the move may have been given up meanwhile,
		// and a bucket without queues sends no HandoffQueues.
		err = n.mayTake(k, end.GetTableVersion())
	}
	if err == nil && int(end.GetQueues()) != len(st.snaps) {
		err = imqerr.New(imqpb.Code_BAD_REQUEST, "hand-off end counts %d queues; %d arrived", end.GetQueues(), len(st.snaps))
	}
	for _, q := range st.snaps {
		if err == nil && !k.has(q.GetName()) {
			err = imqerr.New(imqpb.Code_BAD_REQUEST, "queue %s is not in bucket %d", q.GetName(), k.b)
		}
	}
	if err == nil {
		s.setHolds(k, end.GetGateways())
		var unbound map[string][]Subscriber
		if unbound, err = s.importQueues(st.snaps); err != nil {
			s.dropHolds(k)
		} else {
			s.ho.mu.Lock()
			for q, subs := range unbound {
				for _, sub := range subs {
					if h := s.ho.holds[holdKey{gateway: sub.Gateway, k: k}]; h != nil && !contains(h.closed, q) {
						h.closed = append(h.closed, q)
					}
				}
			}
			s.ho.adopted[k] = n.from
			s.ho.publishLocked()
			s.ho.mu.Unlock()
			var size int
			for _, q := range st.snaps {
				size += proto.Size(q)
			}
			s.m.handoffQueues.WithLabelValues("in").Add(float64(len(st.snaps)))
			s.m.handoffBytes.WithLabelValues("in").Add(float64(size))
			s.log.Info("bucket adopted", "bucket", k.b, "bits", k.bits, "from", n.from, "queues", len(st.snaps), "gateways", len(end.GetGateways()))
		}
	}
	ack := &imqpb.HandoffAck{Bucket: end.GetBucket(), Bits: end.GetBits()}
	if err != nil {
		e := imqerr.From(err)
		ack.Code, ack.Message = e.Code, e.Message
		s.log.Warn("bucket hand-off refused", "bucket", k.b, "bits", k.bits, "from", n.from, "err", err)
	}
	n.conn.SendAlways(encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_HandoffAck{HandoffAck: ack}}))
}

// mayTake checks that this node may adopt bucket k from the link's peer:
// its table, once it holds version v (the one the hand-off was planned
// by; it waits for it at most fenceWait), marks k moving from the peer to
// this node. Holding the cluster key is not enough to hand a bucket over:
// a peer the table does not name as k's owner, or a bucket the table does
// not move to this node, is refused (the sender keeps the bucket).
//
// So a snapshot never replaces a queue this node serves by its table: k
// moving from the peer means the peer owns it. It may replace what this
// node holds of k otherwise: a stale copy, from before it lost k, or what
// it adopted in an earlier attempt of this same move, which the owner
// took back and served on when that attempt failed, so its snapshot is
// the newer.
func (n *nodeIn) mayTake(k bkey, v uint64) error {
	s := n.s
	if s.cluster == nil {
		return imqerr.New(imqpb.Code_FORBIDDEN, "queue node %s runs standalone: it has no bucket table and takes no hand-offs", s.cfg.NodeID)
	}
	ctx, cancel := context.WithTimeout(n.ctx, fenceWait)
	t, err := s.cluster.WaitVersion(ctx, v)
	cancel()
	if err != nil {
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s holds bucket table version %d and the hand-off was planned by version %d, which it could not fetch within %s; retry",
			s.cfg.NodeID, t.Version(), v, fenceWait)
	}
	if t.Bits() != k.bits || k.b >= t.Buckets() || !t.IsMoving(k.b, n.from, s.cfg.NodeID) {
		return imqerr.New(imqpb.Code_FORBIDDEN, "bucket table version %d does not mark bucket %d of %d bits moving from %s to %s",
			t.Version(), k.b, k.bits, n.from, s.cfg.NodeID)
	}
	return nil
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// forwarded runs a request the old owner forwarded, as if it came on
// this node's newest link with the request's origin gateway; the reply
// goes back on the node link.
func (n *nodeIn) forwarded(req *imqpb.NodeRequest) {
	s := n.s
	key := s.newestLinks()[req.GetOriginGateway()]
	s.mu.RLock()
	gl := s.links[key]
	s.mu.RUnlock()
	if gl == nil {
		if req.GetId() != 0 {
			n.conn.SendAlways(encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: &imqpb.NodeReply{
				Id: req.GetId(), Code: imqpb.Code_UNAVAILABLE,
				Message: fmt.Sprintf("queue node %s, the queue's new owner, has no link with gateway %q yet; retry", s.cfg.NodeID, req.GetOriginGateway()),
			}}}))
		}
		return
	}
	p := n.proxies[gl.key]
	if p == nil || p.ctx.Err() != nil {
		// Replies go on the node link; subscribers are the gateway link's.
		p = &link{s: s, conn: n.conn, gateway: gl.gateway, key: gl.key}
		p.ctx, p.cancel = context.WithCancel(n.ctx)
		context.AfterFunc(gl.ctx, p.cancel)
		n.proxies[gl.key] = p
	}
	s.handle(p, req)
}

// holdKey is one gateway's hold on one adopted bucket.
type holdKey struct {
	gateway string
	k       bkey
}

// hold is the events of an adopted bucket waiting for one gateway's
// BucketAdopted. Guarded by handoffs.mu.
type hold struct {
	frames []heldFrame
	bytes  int
	failed bool     // over its bound: frames dropped, subscriptions ended
	closed []string // queues to tell the gateway QueueClosed(MOVED) of on release
	timer  *time.Timer
}

type heldFrame struct {
	l     *link
	frame []byte
}

// setHolds starts a hold for each gateway on bucket k.
func (s *Server) setHolds(k bkey, gateways []string) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	now := time.Now()
	for hk, at := range s.ho.confirmed {
		if now.Sub(at) > s.cfg.AdoptHoldTime {
			delete(s.ho.confirmed, hk)
		}
	}
	for _, gw := range gateways {
		hk := holdKey{gateway: gw, k: k}
		if _, ok := s.ho.confirmed[hk]; ok {
			delete(s.ho.confirmed, hk) // it confirmed already: nothing to hold
			continue
		}
		if old := s.ho.holds[hk]; old != nil {
			old.timer.Stop()
		}
		h := &hold{}
		h.timer = time.AfterFunc(s.cfg.AdoptHoldTime, func() { s.holdExpired(hk, h) })
		s.ho.holds[hk] = h
	}
	s.ho.holding.Store(int32(len(s.ho.holds)))
}

func (s *Server) dropHolds(k bkey) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	for hk, h := range s.ho.holds {
		if hk.k == k {
			h.timer.Stop()
			delete(s.ho.holds, hk)
		}
	}
	s.ho.holding.Store(int32(len(s.ho.holds)))
}

// deliver sends one delivery frame of queue to l, or holds it when l's
// gateway has not confirmed the mark of queue's adopted bucket. The
// caller holds queue's shard lock.
func (s *Server) deliver(l *link, queue string, frame []byte) bool {
	if s.ho.holding.Load() == 0 {
		return l.send(frame)
	}
	s.ho.mu.Lock()
	for hk, h := range s.ho.holds {
		if hk.gateway != l.gateway || !hk.k.has(queue) {
			continue
		}
		if h.failed {
			s.ho.mu.Unlock()
			return false
		}
		if h.bytes+len(frame) > s.cfg.AdoptHoldBytes {
			s.failHoldLocked(hk, h, "bytes")
			s.ho.mu.Unlock()
			return false
		}
		h.frames = append(h.frames, heldFrame{l: l, frame: frame})
		h.bytes += len(frame)
		s.m.holdBytes.Add(float64(len(frame)))
		s.ho.mu.Unlock()
		return true
	}
	s.ho.mu.Unlock()
	return l.send(frame)
}

// failHoldLocked gives up a hold past its bound: its frames are dropped,
// and the gateway's subscriptions to the bucket's queues are ended
// (removed here; QueueClosed(MOVED) when the gateway confirms the mark).
// The caller holds handoffs.mu (and maybe a shard lock: the subscriptions
// are removed on another goroutine).
func (s *Server) failHoldLocked(hk holdKey, h *hold, reason string) {
	h.failed = true
	s.m.holdBytes.Sub(float64(h.bytes))
	h.frames, h.bytes = nil, 0
	s.m.holdOverflows.WithLabelValues(reason).Inc()
	s.log.Warn("gateway did not confirm a hand-off in time; ending its subscriptions to the bucket", "gateway", hk.gateway, "bucket", hk.k.b, "reason", reason)
	s.goTracked(func() { // ends when the shards are walked
		closed := s.removeGatewaySubs(hk)
		s.ho.mu.Lock()
		for _, q := range closed {
			if !contains(h.closed, q) {
				h.closed = append(h.closed, q)
			}
		}
		s.ho.mu.Unlock()
	})
}

// removeGatewaySubs removes every subscriber of gateway hk.gateway to the
// queues of bucket hk.k and returns those queues.
func (s *Server) removeGatewaySubs(hk holdKey) []string {
	var closed []string
	now := s.cfg.Now()
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, q := range sh.queues {
			if !hk.k.has(name) {
				continue
			}
			n := 0
			for _, key := range q.Gateways() {
				if gatewayOfKey(key) == hk.gateway {
					n += q.RemoveGateway(key, now, nil)
				}
			}
			if n > 0 {
				closed = append(closed, name)
				s.dropIfDisposableLocked(sh, q)
			}
		}
		sh.mu.Unlock()
	}
	return closed
}

// holdExpired fails a hold the gateway did not release within
// Config.AdoptHoldTime, and forgets it after as long again.
func (s *Server) holdExpired(hk holdKey, h *hold) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	if s.ho.holds[hk] != h {
		return
	}
	if !h.failed {
		s.failHoldLocked(hk, h, "time")
		h.timer = time.AfterFunc(s.cfg.AdoptHoldTime, func() { s.holdExpired(hk, h) })
		return
	}
	delete(s.ho.holds, hk)
	s.ho.holding.Store(int32(len(s.ho.holds)))
}

// releaseHold answers a gateway's BucketAdopted on link l: the events held
// for it go out in order, and the QueueClosed of subscriptions ended.
func (s *Server) releaseHold(l *link, ba *imqpb.BucketAdopted) {
	k := bkey{bits: int(ba.GetBits()), b: int(ba.GetBucket())}
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	released := false
	defer func() {
		if !released && len(s.ho.confirmed) < maxEarlyConfirms {
			s.ho.confirmed[holdKey{gateway: l.gateway, k: k}] = time.Now()
		}
	}()
	for hk, h := range s.ho.holds {
		if hk.gateway != l.gateway || !overlaps(hk.k, k) {
			continue
		}
		h.timer.Stop()
		for _, f := range h.frames {
			f.l.send(f.frame)
		}
		s.m.holdBytes.Sub(float64(h.bytes))
		for _, q := range h.closed {
			l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
				Queue: q, Reason: imqpb.Reason_REASON_MOVED, Message: movedMessage,
			}}})
		}
		delete(s.ho.holds, hk)
		released = true
	}
	s.ho.holding.Store(int32(len(s.ho.holds)))
}

// updateAdopted clears the adopted entries next settles: those it gives
// to this node (no longer needed) and those it gives to a third node
// (their queues are then closed as any other's).
func (s *Server) updateAdopted(next *bucket.Table) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	for k, from := range s.ho.adopted {
		if next.Buckets() == 0 {
			continue
		}
		if tableCovers(next, k, s.cfg.NodeID) || !tableCovers(next, k, from) {
			delete(s.ho.adopted, k)
		}
	}
	s.ho.publishLocked()
}

// fence waits, on the link's reader, for the table a request was routed
// by when it is newer than this node's, so that the node neither answers
// MOVED by a stale table nor serves a queue it no longer owns (a node that
// was paused and woke up behind). It fails when the table does not come
// within fenceWait.
func (s *Server) fence(v uint64) error {
	if s.cluster == nil || v <= s.currentTable().Version() {
		return nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, fenceWait)
	defer cancel()
	t, err := s.cluster.WaitVersion(ctx, v)
	if err != nil {
		s.m.fenced.Inc()
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s holds bucket table version %d and the request was routed by version %d, which it could not fetch within %s; retry",
			s.cfg.NodeID, t.Version(), v, fenceWait)
	}
	return nil
}
