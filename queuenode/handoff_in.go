package queuenode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	imqlink "github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// The new owner's side of a hand-off (docs/handoff.md, steps 4 and 6):
// a node link from the old owner stages the bucket's queues, installs
// them on HandoffEnd, and then carries the leaves without a reply the
// old owner forwards (step 5). Events of the adopted bucket, and a
// gateway's requests for its queues, are held per gateway until that gateway confirms it saw the
// old owner's mark (BucketAdopted); the node then says bucket_held, so
// the gateway knows the subscriptions it rebound are live here.
//
// Subscribers whose gateway has no link to this node when the queues are
// installed are dropped, and that gateway is told QueueClosed(MOVED) for
// their queues when it confirms (at once when it confirmed before, or was
// not named); a hold that fails removes the gateway's subscribers and
// tells it at once. The simplest honest behaviour: the session rejoins,
// same epoch and history.

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
	proxies map[string]proxy // reader only: by gateway link key
}

// proxy is the stand-in for a gateway's link that forwarded leaves run on.
type proxy struct {
	l    *link
	stop func() bool // unregisters the hook that ends l with the gateway's link
}

// serveNodeLink runs an accepted link from another queue node until it
// closes.
func (s *Server) serveNodeLink(conn *imqlink.Conn, log *slog.Logger) {
	n := &nodeIn{s: s, conn: conn, from: conn.Peer().ID, staging: make(map[bkey]*staged), proxies: make(map[string]proxy)}
	n.ctx, n.cancel = context.WithCancel(s.ctx)
	s.ho.mu.Lock()
	s.ho.peers[n.from]++
	s.ho.mu.Unlock()
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
		p.l.async.Wait()
		p.stop()
	}
	s.ho.mu.Lock()
	for _, st := range n.staging {
		s.ho.staged -= st.bytes
	}
	if s.ho.peers[n.from]--; s.ho.peers[n.from] == 0 {
		delete(s.ho.peers, n.from)
	}
	s.ho.mu.Unlock()
	s.forgetAbandoned()
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
			if err := n.forwarded(x.Request); err != nil {
				return err
			}
		default:
			return errors.New("node link frame is not a ping, hand-off or forwarded leave")
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
		// The holds are marked installing until the queues are in and k is
		// adopted: a BucketAdopted that comes meanwhile (on a gateway's
		// reader) is answered then, with the QueueClosed the install
		// decided, so none is lost between the two.
		early := s.setHolds(k, n.from, end.GetGateways())
		var unbound map[string][]Subscriber
		if unbound, err = s.importQueues(st.snaps); err != nil {
			s.dropHolds(k)
		} else {
			closed := make(map[string][]string) // gateway id → queues of its unbound subscribers
			for q, subs := range unbound {
				for _, sub := range subs {
					if !slices.Contains(closed[sub.Gateway], q) {
						closed[sub.Gateway] = append(closed[sub.Gateway], q)
					}
				}
			}
			s.ho.mu.Lock()
			for gw, queues := range closed {
				if h := s.ho.holds[holdKey{gateway: gw, k: k}]; h != nil && h.state == holdInstalling {
					h.closed = append(h.closed, queues...)
					delete(closed, gw)
				}
			}
			s.ho.adopted[k] = n.from
			s.ho.publishLocked()
			s.openHoldsLocked(k)
			s.ho.mu.Unlock()
			// The gateways that confirmed before the queues came, and those
			// never listed: told now of what they lost, and that the rest
			// is live here.
			held := &imqpb.BucketAdopted{Bucket: uint32(k.b), Bits: uint32(k.bits), FromNode: n.from}
			for _, gw := range early {
				if l := s.newestLink(gw); l != nil {
					sendClosed(l, closed[gw])
					l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketHeld{BucketHeld: held}})
				}
				delete(closed, gw)
			}
			for gw, queues := range closed {
				if l := s.newestLink(gw); l != nil {
					sendClosed(l, queues)
				}
			}
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

// forwarded runs a leave the old owner forwarded (docs/handoff.md, step
// 5: a connection gone, so no reply), as if it came on this node's newest
// link with the request's origin gateway, so that the subscriber of that
// session goes. The old owner answers every request with a reply MOVED
// itself; anything else on a node link is a peer's error, and ends it.
func (n *nodeIn) forwarded(req *imqpb.NodeRequest) error {
	if _, leave := req.GetOp().(*imqpb.NodeRequest_Leave); !leave || req.GetId() != 0 {
		return fmt.Errorf("node %s forwarded a request other than a leave without a reply (id %d, %T); a node link carries only those", n.from, req.GetId(), req.GetOp())
	}
	s := n.s
	key := s.newestLinks()[req.GetOriginGateway()]
	s.mu.RLock()
	gl := s.links[key]
	s.mu.RUnlock()
	if gl == nil {
		return nil // no link with that gateway: none of its subscribers is here
	}
	p, ok := n.proxies[gl.key]
	if !ok || p.l.ctx.Err() != nil {
		// Subscribers are the gateway link's; a leave has no reply.
		l := &link{s: s, conn: n.conn, gateway: gl.gateway, key: gl.key}
		l.ctx, l.cancel = context.WithCancel(n.ctx)
		if ok {
			p.stop()
		}
		p = proxy{l: l, stop: context.AfterFunc(gl.ctx, l.cancel)}
		n.proxies[gl.key] = p
	}
	s.handle(p.l, req)
	return nil
}

// holdKey is one gateway's hold on one adopted bucket.
type holdKey struct {
	gateway string
	k       bkey
}

// holdState is where a hold is in its life.
type holdState int

const (
	// holdInstalling: the bucket's queues are being installed. A
	// BucketAdopted that comes meanwhile is recorded (confirmedOn) and
	// answered once they are, with every QueueClosed the install decided.
	holdInstalling holdState = iota
	// holdOpen: the bucket is adopted; events for the gateway, and the
	// gateway's requests for the bucket's queues, are held.
	holdOpen
	// holdFailing: past its bound; events for the gateway are dropped
	// while its subscribers to the bucket are removed, requests wait.
	holdFailing
	// holdFailed: its subscribers are removed and the gateway told
	// (QueueClosed); events and requests pass once the held requests have
	// run. Kept for the gateway's BucketAdopted (answered bucket_dropped)
	// until the hold's time has passed again.
	holdFailed
	// holdReleased: confirmed; events pass, the held requests run in
	// order, then the hold goes.
	holdReleased
)

// hold is what waits for one gateway's BucketAdopted on an adopted bucket:
// the bucket's events for the gateway, and the gateway's requests for the
// bucket's queues (a join answered before the events held for the gateway
// went out would see them after its own). Guarded by handoffs.mu.
type hold struct {
	from        string // the node the bucket was adopted from
	state       holdState
	frames      []heldFrame
	frameBytes  int
	reqs        []heldReq // in arrival order
	reqBytes    int
	draining    bool     // a goroutine runs reqs
	closed      []string // queues to tell the gateway QueueClosed(MOVED) of
	confirmedOn *link    // installing or failing: the link a BucketAdopted came on
	timer       *time.Timer
}

type heldFrame struct {
	l     *link
	frame []byte
}

// setHolds starts a hold, in state installing, for each gateway on bucket
// k, adopted from node from, and returns the gateways that confirmed
// already (early): nothing is held for those.
func (s *Server) setHolds(k bkey, from string, gateways []string) (early []string) {
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
			early = append(early, gw)
			continue
		}
		if old := s.ho.holds[hk]; old != nil && old.timer != nil {
			old.timer.Stop()
		}
		s.ho.holds[hk] = &hold{from: from}
	}
	s.ho.holding.Store(int32(len(s.ho.holds)))
	return early
}

// dropHolds forgets the holds of bucket k, whose install failed (they are
// all installing: nothing was held).
func (s *Server) dropHolds(k bkey) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	for hk, h := range s.ho.holds {
		if hk.k == k && h.state == holdInstalling {
			delete(s.ho.holds, hk)
		}
	}
	s.ho.holding.Store(int32(len(s.ho.holds)))
}

// openHoldsLocked ends the install of bucket k: each of its holds opens,
// with its time bound from now, or is released at once when its gateway
// confirmed meanwhile. The caller holds handoffs.mu and has marked k
// adopted.
func (s *Server) openHoldsLocked(k bkey) {
	for hk, h := range s.ho.holds {
		if hk.k != k || h.state != holdInstalling {
			continue
		}
		h.state = holdOpen
		if h.confirmedOn != nil {
			s.releaseLocked(hk, h, h.confirmedOn)
			continue
		}
		h.timer = time.AfterFunc(s.cfg.AdoptHoldTime, func() { s.holdExpired(hk, h) })
	}
}

// holdForLocked returns the hold of gateway gw on queue's bucket, if any. The
// caller holds handoffs.mu.
func (s *Server) holdForLocked(gw, queue string) (holdKey, *hold) {
	for hk, h := range s.ho.holds {
		if hk.gateway == gw && hk.k.has(queue) {
			return hk, h
		}
	}
	return holdKey{}, nil
}

// deliver sends one delivery frame of queue to l, or holds it when l's
// gateway has not confirmed the mark of queue's adopted bucket. The
// caller holds queue's shard lock (so it never takes one under
// handoffs.mu).
func (s *Server) deliver(l *link, queue string, frame []byte) bool {
	if s.ho.holding.Load() == 0 {
		return l.send(frame)
	}
	s.ho.mu.Lock()
	hk, h := s.holdForLocked(l.gateway, queue)
	if h != nil {
		switch h.state {
		case holdInstalling, holdOpen:
			if h.frameBytes+h.reqBytes+len(frame) > s.cfg.AdoptHoldBytes {
				s.failHoldLocked(hk, h, "bytes")
				s.ho.mu.Unlock()
				return false
			}
			h.frames = append(h.frames, heldFrame{l: l, frame: frame})
			h.frameBytes += len(frame)
			s.m.holdBytes.Add(float64(len(frame)))
			s.ho.mu.Unlock()
			return true
		case holdFailing: // for a subscriber being removed
			s.ho.mu.Unlock()
			return false
		}
	}
	s.ho.mu.Unlock()
	return l.send(frame)
}

// holdRequest holds req, from l's gateway, when that gateway's hold on
// the queue's bucket is open, or still has requests to run: they run once
// it confirms (after the events held for it) or once the hold failed
// (after the QueueClosed of its subscriptions), in arrival order. A
// request that would take an open hold past Config.AdoptHoldBytes fails
// the hold; one that finds the held requests past it afterwards is
// answered UNAVAILABLE (retryable). Leaves are always held. It reports
// whether it took req.
func (s *Server) holdRequest(l *link, req *imqpb.NodeRequest, res *calloutResult) bool {
	if s.ho.holding.Load() == 0 {
		return false
	}
	size := chainedBytes(req)
	_, leave := req.GetOp().(*imqpb.NodeRequest_Leave)
	s.ho.mu.Lock()
	hk, h := s.holdForLocked(l.gateway, opQueue(req))
	if h == nil || h.state == holdInstalling ||
		(h.state == holdFailed || h.state == holdReleased) && len(h.reqs) == 0 && !h.draining {
		s.ho.mu.Unlock()
		return false
	}
	if h.state == holdOpen && h.frameBytes+h.reqBytes+size > s.cfg.AdoptHoldBytes {
		s.failHoldLocked(hk, h, "bytes") // its frames go: the requests fit again
	}
	if h.state != holdOpen && !leave && h.reqBytes+size > s.cfg.AdoptHoldBytes {
		s.ho.mu.Unlock()
		s.m.heldRefused.Inc()
		s.finish(l, req, opName(req), imqerr.New(imqpb.Code_UNAVAILABLE,
			"queue node %s holds %d bytes of requests of this gateway for a bucket it adopted, its limit; retry shortly", s.cfg.NodeID, h.reqBytes))
		return true
	}
	h.reqs = append(h.reqs, heldReq{l: l, req: req, res: res, size: size})
	h.reqBytes += size
	if h.state == holdFailed || h.state == holdReleased {
		s.drainLocked(hk, h)
	}
	s.ho.mu.Unlock()
	return true
}

// drainLocked runs h's held requests on a goroutine, unless one does
// already; a released hold without any is forgotten. The caller holds
// handoffs.mu.
func (s *Server) drainLocked(hk holdKey, h *hold) {
	if h.draining {
		return
	}
	if len(h.reqs) == 0 {
		if h.state == holdReleased && s.ho.holds[hk] == h {
			delete(s.ho.holds, hk)
			s.ho.holding.Store(int32(len(s.ho.holds)))
		}
		return
	}
	h.draining = true
	if !s.goTracked(func() { s.runHeld(hk, h) }) { // ends when h has no request left
		h.draining = false // stopping: nobody is left to answer
	}
}

// runHeld runs h's held requests in order, then forgets h if released:
// requests that come meanwhile queue behind them (holdRequest).
func (s *Server) runHeld(hk holdKey, h *hold) {
	for {
		s.ho.mu.Lock()
		if len(h.reqs) == 0 {
			h.draining = false
			s.drainLocked(hk, h)
			s.ho.mu.Unlock()
			return
		}
		r := h.reqs[0]
		h.reqs[0] = heldReq{}
		h.reqs = h.reqs[1:]
		h.reqBytes -= r.size
		s.ho.mu.Unlock()
		if r.l.ctx.Err() != nil {
			continue // its link closed: no one to answer
		}
		if !s.interceptOut(r.l, r.req, r.res) {
			s.replay(r)
		}
	}
}

// failHoldLocked gives up a hold past its bound: its frames are dropped,
// and the gateway's subscriptions to the bucket's queues are ended:
// removed here, then QueueClosed(MOVED) on the gateway's newest link at
// once, then its held requests run. The caller holds handoffs.mu (and
// maybe a shard lock: the subscriptions are removed on another goroutine).
func (s *Server) failHoldLocked(hk holdKey, h *hold, reason string) {
	h.state = holdFailing
	s.m.holdBytes.Sub(float64(h.frameBytes))
	h.frames, h.frameBytes = nil, 0
	s.m.holdOverflows.WithLabelValues(reason).Inc()
	s.log.Warn("gateway did not confirm a hand-off in time; ending its subscriptions to the bucket", "gateway", hk.gateway, "bucket", hk.k.b, "reason", reason)
	failed := func() { // ends when the shards are walked
		closed := s.removeGatewaySubs(hk)
		l := s.newestLink(hk.gateway)
		s.ho.mu.Lock()
		defer s.ho.mu.Unlock()
		for _, q := range closed {
			if !slices.Contains(h.closed, q) {
				h.closed = append(h.closed, q)
			}
		}
		if l != nil {
			sendClosed(l, h.closed)
		}
		h.closed = nil
		h.state = holdFailed
		if h.confirmedOn != nil {
			s.releaseLocked(hk, h, h.confirmedOn)
		}
		s.drainLocked(hk, h)
	}
	if !s.goTracked(failed) {
		h.state = holdFailed // stopping: the links are closing
	}
}

// newestLink returns this node's newest link with gateway gw, or nil.
func (s *Server) newestLink(gw string) *link {
	key, ok := s.newestLinks()[gw]
	if !ok {
		return nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.links[key]
}

func sendClosed(l *link, queues []string) {
	for _, q := range queues {
		l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
			Queue: q, Reason: imqpb.Reason_REASON_MOVED, Message: movedMessage,
		}}})
	}
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
// Config.AdoptHoldTime, and forgets a failed one after as long again
// (once its held requests have run).
func (s *Server) holdExpired(hk holdKey, h *hold) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	if s.ho.holds[hk] != h {
		return
	}
	switch {
	case h.state == holdOpen:
		s.failHoldLocked(hk, h, "time")
	case h.state == holdFailed && len(h.reqs) == 0 && !h.draining:
		delete(s.ho.holds, hk)
		s.ho.holding.Store(int32(len(s.ho.holds)))
		return
	case h.state == holdReleased:
		return // drainLocked forgets it
	}
	h.timer = time.AfterFunc(s.cfg.AdoptHoldTime, func() { s.holdExpired(hk, h) })
}

// releaseHold answers a gateway's BucketAdopted on link l (releaseLocked).
// One that comes while the bucket installs, or while a failed hold's
// subscribers are being removed, is answered when that is done; one for a
// bucket adopted without a hold for the gateway is answered bucket_held at
// once; one for a bucket not adopted (yet) is kept for setHolds.
func (s *Server) releaseHold(l *link, ba *imqpb.BucketAdopted) {
	k := bkey{bits: int(ba.GetBits()), b: int(ba.GetBucket())}
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	found := false
	for hk, h := range s.ho.holds {
		if hk.gateway != l.gateway || !overlaps(hk.k, k) {
			continue
		}
		found = true
		switch h.state {
		case holdInstalling, holdFailing:
			h.confirmedOn = l
		case holdOpen, holdFailed:
			s.releaseLocked(hk, h, l)
		}
	}
	if found {
		return
	}
	for ak, from := range s.ho.adopted {
		if overlaps(ak, k) {
			l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketHeld{BucketHeld: &imqpb.BucketAdopted{
				Bucket: uint32(ak.b), Bits: uint32(ak.bits), FromNode: from,
			}}})
			found = true
		}
	}
	if !found && len(s.ho.confirmed) < maxEarlyConfirms {
		s.ho.confirmed[holdKey{gateway: l.gateway, k: k}] = time.Now()
	}
}

// releaseLocked answers the confirmation of hold h on link l. An open
// hold's events go out in order, then the QueueClosed of the gateway's
// subscribers the install dropped, then bucket_held: the gateway's
// subscriptions it rebound here are live. A failed hold's QueueClosed
// went out when it failed: bucket_dropped tells the gateway to end those
// it rebound since. Either way the held requests then run, and the hold
// goes. The caller holds handoffs.mu.
func (s *Server) releaseLocked(hk holdKey, h *hold, l *link) {
	if h.timer != nil {
		h.timer.Stop()
	}
	h.confirmedOn = nil
	ba := &imqpb.BucketAdopted{Bucket: uint32(hk.k.b), Bits: uint32(hk.k.bits), FromNode: h.from}
	if h.state == holdFailed {
		l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketDropped{BucketDropped: ba}})
	} else {
		for _, f := range h.frames {
			f.l.send(f.frame)
		}
		s.m.holdBytes.Sub(float64(h.frameBytes))
		h.frames, h.frameBytes = nil, 0
		sendClosed(l, h.closed)
		h.closed = nil
		l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketHeld{BucketHeld: ba}})
	}
	h.state = holdReleased
	s.drainLocked(hk, h)
}

// updateAdopted clears the adopted entries next settles: those it gives
// to this node (no longer needed), those it gives to a third node (their
// queues are then closed as any other's), and those whose hand-off the old
// owner abandoned: next gives the bucket back to it without marking the
// move, and no node link from it is open (an old owner that got the ack
// keeps its link open while it forwards, until the table gives the
// bucket away; one whose ack wait timed out closes it, and serves the
// bucket again). It reports whether it cleared any.
func (s *Server) updateAdopted(next *bucket.Table) bool {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	cleared := false
	for k, from := range s.ho.adopted {
		if next.Buckets() == 0 {
			continue
		}
		if tableCovers(next, k, s.cfg.NodeID) || !tableCovers(next, k, from) ||
			s.ho.peers[from] == 0 && !tableMarks(next, k, from, s.cfg.NodeID) {
			delete(s.ho.adopted, k)
			cleared = true
		}
	}
	s.ho.publishLocked()
	return cleared
}

// tableMarks reports whether t marks some queue of k moving from node from
// to node to.
func tableMarks(t *bucket.Table, k bkey, from, to string) bool {
	tb := t.Bits()
	if tb <= k.bits {
		return t.IsMoving(k.b>>(k.bits-tb), from, to)
	}
	shift := tb - k.bits
	for i := range 1 << shift {
		if t.IsMoving(k.b<<shift+i, from, to) {
			return true
		}
	}
	return false
}

// forgetAbandoned runs when a node link from another node closes: an
// adopted bucket the current table gives back to that node, unmarked, was
// abandoned by it (updateAdopted), and its queues here are closed as a
// moved queue's are (the gateways are told QueueClosed).
func (s *Server) forgetAbandoned() {
	t := s.currentTable()
	if !s.updateAdopted(t) {
		return
	}
	closed := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, q := range sh.queues {
			if owner, ok := t.Lookup(name); ok && owner.ID == s.cfg.NodeID {
				continue
			}
			if handled, _ := s.handoffOwnerLocked(name); handled {
				continue
			}
			s.closeQueueLocked(sh, q)
			closed++
		}
		sh.mu.Unlock()
	}
	s.log.Info("forgot adopted buckets whose hand-off was abandoned", "table_version", t.Version(), "queues_closed", closed)
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
