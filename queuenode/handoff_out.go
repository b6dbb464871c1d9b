package queuenode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	imqlink "github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// The old owner's side of a hand-off (docs/handoff.md, steps 1-5): one
// bucket at a time, by handoffLoop.

// Reasons a hand-off fails, the reason label of
// imq_queuenode_handoffs_failed_total.
const (
	failDial    = "dial"    // the new owner could not be reached
	failStream  = "stream"  // the link broke while streaming or waiting
	failTimeout = "timeout" // no ack within Config.HandoffTimeout
	failRefused = "refused" // the new owner refused (budget, a bad snapshot)
)

// handoffLoop starts the hand-offs the table marks from this node, one at
// a time, until the server stops.
func (s *Server) handoffLoop() {
	t := time.NewTicker(s.cfg.HandoffRetry)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.ho.kick:
		case <-t.C:
		}
		for {
			k, to, v, ok := s.nextMove()
			if !ok || s.ctx.Err() != nil {
				break
			}
			s.handOff(k, to, v)
		}
	}
}

// overlaps reports whether buckets a and b share queues.
func overlaps(a, b bkey) bool {
	m := min(a.bits, b.bits)
	return a.b>>(a.bits-m) == b.b>>(b.bits-m)
}

// nextMove returns a move from this node the current table marks and no
// hand-off covers yet (nor waits to retry).
func (s *Server) nextMove() (k bkey, to bucket.Node, version uint64, ok bool) {
	t := s.currentTable()
	now := time.Now()
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	s.pruneRetriesLocked(t)
next:
	for _, m := range t.Moving() {
		if m.From != s.cfg.NodeID {
			continue
		}
		k = bkey{bits: t.Bits(), b: m.Bucket}
		if now.Before(s.ho.retryAt[k]) {
			continue
		}
		for o := range s.ho.out {
			if overlaps(o, k) {
				continue next
			}
		}
		to, _ = t.Target(m.Bucket)
		return k, to, t.Version(), true
	}
	return bkey{}, bucket.Node{}, 0, false
}

// pruneRetriesLocked forgets the retry times of moves t no longer marks
// from this node, so retryAt holds at most the buckets t moves away. The
// caller holds s.ho.mu.
func (s *Server) pruneRetriesLocked(t *bucket.Table) {
	for k := range s.ho.retryAt {
		if k.bits != t.Bits() {
			delete(s.ho.retryAt, k)
		} else if _, ok := t.Target(k.b); !ok || t.Owner(k.b).ID != s.cfg.NodeID {
			delete(s.ho.retryAt, k)
		}
	}
}

// handOff hands bucket k off to node to, as table version marks it.
func (s *Server) handOff(k bkey, to bucket.Node, version uint64) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandoffTimeout)
	defer cancel()
	log := s.log.With("bucket", k.b, "bits", k.bits, "to", to.ID, "table_version", version)
	peer, err := s.dialPeer(ctx, to)
	if err != nil {
		s.handoffFailed(k, failDial, log, err)
		return
	}
	// Freeze: from here on requests for k are held (intercept, and
	// checkOwnerLocked for those already past it).
	o := &outgoing{key: k, to: to, version: version, wake: make(chan struct{}, 1), peer: peer}
	s.ho.mu.Lock()
	s.ho.out[k] = o
	s.ho.publishLocked()
	s.ho.mu.Unlock()
	// Export takes every shard lock: every operation on k that passed the
	// owner check before the freeze has ended, its events queued on the
	// links, and none can recreate a queue afterwards.
	snaps, err := s.exportBucket(k.bits, k.b)
	if err != nil { // a bug: k came from a table
		panic(err)
	}
	gws := s.markMoving(k, to.ID, version)
	ack, err := peer.handOff(ctx, k, version, snaps, gws)
	if err == nil && ack.GetCode() != imqpb.Code_OK {
		err = fmt.Errorf("%w: %v %s", errRefused, ack.GetCode(), ack.GetMessage())
	}
	if err != nil {
		peer.conn.Close(nil)
		reason := failStream
		switch {
		case errors.Is(err, errRefused):
			reason = failRefused
		case errors.Is(err, context.DeadlineExceeded):
			reason = failTimeout
		}
		s.restoreBucket(o, snaps, log)
		s.handoffFailed(k, reason, log, err)
		return
	}
	var sent int
	for _, q := range snaps {
		sent += proto.Size(q)
	}
	s.m.handoffQueues.WithLabelValues("out").Add(float64(len(snaps)))
	s.m.handoffBytes.WithLabelValues("out").Add(float64(sent))
	s.m.handoffSeconds.Observe(time.Since(start).Seconds())
	log.Info("bucket handed off; answering its requests MOVED and forwarding leaves", "queues", len(snaps), "bytes", sent, "gateways", len(gws), "took", time.Since(start))
	s.ho.mu.Lock()
	o.mode = outForwarding
	delete(s.ho.retryAt, k)
	s.ho.publishLocked()
	s.ho.mu.Unlock()
	// Both end with the server at the latest; once Shutdown has begun they
	// do not start (the links they would use are closing).
	s.goTracked(func() { s.forward(o) })                            // until o is retired and its held requests are answered
	s.goTracked(func() { s.reportHandoff(k, to.ID, version, log) }) // until the boss answers
	s.retireIfMoved(s.currentTable())
}

// drainPoll is how often a hand-off stream held back by a full link
// looks at its buffer again: a 1 MiB frame takes about that long to
// write at 100 MB/s.
const drainPoll = 10 * time.Millisecond

var errRefused = errors.New("the new owner refused the hand-off")

func (s *Server) handoffFailed(k bkey, reason string, log interface{ Warn(string, ...any) }, err error) {
	s.m.handoffsFailed.WithLabelValues(reason).Inc()
	s.ho.mu.Lock()
	s.ho.retryAt[k] = time.Now().Add(s.cfg.HandoffRetry)
	s.ho.mu.Unlock()
	log.Warn("bucket hand-off failed; keeping the bucket and retrying later", "reason", reason, "err", err)
}

// markMoving sends BucketMoving for k on every gateway link and returns the
// gateways it went to.
func (s *Server) markMoving(k bkey, to string, version uint64) []string {
	frame := encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketMoving{BucketMoving: &imqpb.BucketMoving{
		Bucket: uint32(k.b), Bits: uint32(k.bits), ToNode: to, TableVersion: version,
	}}})
	seen := make(map[string]bool)
	var gws []string
	s.mu.RLock()
	links := make([]*link, 0, len(s.links))
	for _, l := range s.links {
		links = append(links, l)
	}
	s.mu.RUnlock()
	for _, l := range links {
		if l.send(frame) && !seen[l.gateway] {
			seen[l.gateway] = true
			gws = append(gws, l.gateway)
		}
	}
	return gws
}

// restoreBucket puts o's exported queues back after a failed hand-off and
// runs the held requests here, in order. The gateways were sent the mark
// and may have rebound the subscriptions to the failed target: each is
// told QueueClosed(MOVED) for each queue it had subscribers to, which
// rejoin here, same epoch and history (an honest rejoin, never a silent
// gap), and the subscribers are not restored.
func (s *Server) restoreBucket(o *outgoing, snaps []*imqpb.QueueSnapshot, log interface{ Warn(string, ...any) }) {
	closed := make(map[string][]string) // gateway id → queues
	for _, q := range snaps {
		seen := make(map[string]bool)
		for _, sub := range q.Subscribers {
			if !seen[sub.GetGateway()] {
				seen[sub.GetGateway()] = true
				closed[sub.GetGateway()] = append(closed[sub.GetGateway()], q.GetName())
			}
		}
		q.Subscribers = nil
	}
	if _, err := s.importQueues(snaps); err != nil {
		// The budget filled while the bucket was out: the queues are lost,
		// and their subscribers told so.
		log.Warn("could not take the bucket's queues back after a failed hand-off; they are lost", "queues", len(snaps), "err", err)
	}
	links := s.newestLinks()
	s.mu.RLock()
	for gw, queues := range closed {
		if l := s.links[links[gw]]; l != nil {
			for _, q := range queues {
				l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
					Queue: q, Reason: imqpb.Reason_REASON_MOVED, Message: movedMessage,
				}}})
			}
		}
	}
	s.mu.RUnlock()
	s.ho.mu.Lock()
	o.mode = outLocal
	s.ho.publishLocked()
	s.ho.mu.Unlock()
	// Ends when the held requests have run; once Shutdown has begun it
	// does not start (the links that would carry the answers are closing).
	s.goTracked(func() { s.runHeldHere(o) })
}

// runHeldHere runs o's held requests on this node, in order, then forgets
// o: requests that arrive meanwhile queue behind them (intercept).
func (s *Server) runHeldHere(o *outgoing) {
	for {
		h, ok := s.takeHeld(o)
		if !ok {
			s.ho.mu.Lock()
			if len(o.held) > 0 {
				s.ho.mu.Unlock()
				continue
			}
			delete(s.ho.out, o.key)
			s.ho.publishLocked()
			s.ho.mu.Unlock()
			return
		}
		if h.l.ctx.Err() != nil {
			continue // its link closed: no one to answer
		}
		s.replay(h)
	}
}

// replay runs a held request here as its link's reader would have: its
// call-outs first when it had not been through them.
func (s *Server) replay(h heldReq) {
	res := h.res
	var rt *route
	if s.co != nil && !h.req.GetBackend() {
		rt = s.co.match(requestQueue(h.req))
	}
	if res == nil && rt != nil && needsCallout(rt, h.req) {
		var done bool
		if res, done = s.runCallouts(h.l, rt, h.req); done {
			return
		}
	}
	s.dispatch(h.l, h.req, rt, res)
}

// forward answers o's requests MOVED, and forwards its reply-less leaves
// to the new owner, in order, until o is retired and none is left.
func (s *Server) forward(o *outgoing) {
	defer func() {
		s.ho.mu.Lock()
		peer := o.peer
		s.ho.mu.Unlock()
		peer.conn.Close(nil)
	}()
	for {
		h, ok := s.takeHeld(o)
		if ok {
			s.forwardOne(o, h)
			continue
		}
		s.ho.mu.Lock()
		gone := s.ho.out[o.key] != o && len(o.held) == 0
		s.ho.mu.Unlock()
		if gone {
			return
		}
		select {
		case <-o.wake:
		case <-s.ctx.Done():
			return
		}
	}
}

// forwardOne passes one request of a handed-off bucket on. A request with
// a reply is answered MOVED, with this node's table version: the gateway
// sends it again once its table routes the bucket to the new owner, and
// its lane (gateway/lane.go) sends a connection's later operations on the
// queue after it, so a client's operations keep their order. Forwarding
// them instead would not: a join answered MOVED beside a publish forwarded
// lands after it, and a forwarded join's reply travels back through this
// node while the new owner's events for the subscriber go straight to the
// gateway, which drops those that arrive first. A leave without a reply
// (a connection gone) is forwarded, under origin_gateway, so that the new
// owner removes the subscriber; nothing of that connection comes after it,
// and nobody waits for its outcome: a leave that cannot be forwarded is
// only logged.
func (s *Server) forwardOne(o *outgoing, h heldReq) {
	if h.l.ctx.Err() != nil {
		return
	}
	if h.req.GetId() != 0 {
		t := s.currentTable()
		s.finish(h.l, h.req, opName(h.req), &movedError{
			err: imqerr.New(imqpb.Code_MOVED, "queue %s was handed to node %s; send it there once the table says so (table version %d)",
				opQueue(h.req), o.to.ID, t.Version()),
			version: t.Version(),
		})
		return
	}
	s.ho.mu.Lock()
	peer := o.peer
	s.ho.mu.Unlock()
	if peer.closed() {
		ctx, cancel := context.WithTimeout(s.ctx, 2*time.Second)
		p, err := s.dialPeer(ctx, o.to)
		cancel()
		if err != nil {
			s.log.Debug("could not forward a leave to the bucket's new owner", "queue", opQueue(h.req), "to", o.to.ID, "err", err)
			return
		}
		s.ho.mu.Lock()
		o.peer, peer = p, p
		s.ho.mu.Unlock()
	}
	req := proto.Clone(h.req).(*imqpb.NodeRequest)
	req.OriginGateway = h.l.gateway
	frame, err := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	if err == nil {
		err = peer.conn.Send(frame)
	}
	if err != nil {
		s.log.Debug("could not forward a leave to the bucket's new owner", "queue", opQueue(h.req), "to", o.to.ID, "err", err)
		return
	}
	s.m.forwarded.Inc()
}

// retireIfMoved starts the grace period of each forwarding bucket that t
// no longer gives to this node: after it the entry goes, its leaves are no
// longer forwarded, and the bucket's requests are answered MOVED by the
// table.
func (s *Server) retireIfMoved(t *bucket.Table) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	for _, o := range s.ho.out {
		if o.mode != outForwarding || o.retire != nil || tableOwnsAny(t, o.key, s.cfg.NodeID) || t.Buckets() == 0 {
			continue
		}
		o.retire = time.AfterFunc(s.cfg.HandoffGrace, func() {
			s.ho.mu.Lock()
			if s.ho.out[o.key] == o {
				delete(s.ho.out, o.key)
				s.ho.publishLocked()
			}
			s.ho.mu.Unlock()
			o.signal()
		})
	}
}

// forgetWait bounds how long forgetTarget waits for a newer table before
// it decides by the one it holds.
const forgetWait = 2 * time.Second

// forgetTarget stops forwarding bucket k to node to when the boss refused
// its hand-off report while this node's table still gives it the bucket:
// the boss applies a report whenever the reporter owns the bucket and the
// new owner is live (bucket.Table.HandedOff), so the new owner is gone, and
// the queues with it. This node then serves the bucket afresh, as the owner
// of a bucket whose queues were lost (the gateways end the subscriptions
// bound to the dead node when its link goes down), rather than forward to
// it for good. When the table gives the bucket elsewhere, retireIfMoved
// decides.
func (s *Server) forgetTarget(k bkey, to string, log interface{ Warn(string, ...any) }) {
	// Decide by the boss's newest table, not this node's: a refusal may
	// come from a table that already gives the bucket away (this node has
	// not fetched it yet), and then the new owner is alive and holds it.
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(s.ctx, forgetWait)
		s.cluster.WaitVersion(ctx, s.currentTable().Version()+1) // a table that moved on, if there is one
		cancel()
	}
	t := s.currentTable()
	s.ho.mu.Lock()
	o := s.ho.out[k]
	forget := o != nil && o.mode == outForwarding && o.to.ID == to && tableOwnsAny(t, k, s.cfg.NodeID)
	if forget {
		if o.retire != nil {
			o.retire.Stop()
		}
		delete(s.ho.out, k)
		s.ho.publishLocked()
	}
	s.ho.mu.Unlock()
	if forget {
		log.Warn("the boss does not count the node the bucket was handed to as live; serving the bucket afresh", "table_version", t.Version())
		o.signal()
	}
}

// tableOwnsAny reports whether t gives some queue of k to node id.
func tableOwnsAny(t *bucket.Table, k bkey, id string) bool {
	if t.Buckets() == 0 {
		return false
	}
	tb := t.Bits()
	if tb <= k.bits {
		return t.Owner(k.b>>(k.bits-tb)).ID == id
	}
	shift := tb - k.bits
	for i := range 1 << shift {
		if t.Owner(k.b<<shift+i).ID == id {
			return true
		}
	}
	return false
}

// handoffReport is the body of the boss's POST /v1/handoff.
type handoffReport struct {
	Version uint64 `json:"version"`
	Bucket  int    `json:"bucket"`
	From    string `json:"from"`
	To      string `json:"to"`
	Bits    int    `json:"bits"`
}

// reportHandoff tells the boss the hand-off of k is done (postBoss),
// retrying with backoff until the boss accepts it or refuses it for good
// (409: this node no longer owns the bucket, or the new owner is not live;
// forgetTarget decides what that means here).
func (s *Server) reportHandoff(k bkey, to string, version uint64, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}) {
	body, _ := json.Marshal(handoffReport{Version: version, Bucket: k.b, From: s.cfg.NodeID, To: to, Bits: k.bits})
	backoff := 100 * time.Millisecond
	for attempt := 1; s.ctx.Err() == nil; attempt++ {
		status, msg, err := s.postBoss(s.ctx, "/v1/handoff", body)
		switch {
		case err == nil && status == http.StatusOK:
			log.Info("boss accepted the hand-off report")
			return
		case err == nil && status == http.StatusConflict:
			log.Warn("boss refused the hand-off report", "answer", string(msg))
			s.forgetTarget(k, to, log)
			return
		case attempt == 1 || attempt%10 == 0:
			log.Warn("hand-off report not accepted yet; retrying", "status", status, "answer", string(msg), "err", err)
		}
		select {
		case <-time.After(backoff):
		case <-s.ctx.Done():
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// peerLink is this node's link to the node it hands a bucket to: LinkUp
// out (snapshots, forwarded leaves, pings), LinkDown in (the ack).
type peerLink struct {
	s    *Server
	to   string
	conn *imqlink.Conn
	acks chan *imqpb.HandoffAck // cap 1
	// stop unregisters the Shutdown hook that closes conn; readLoop calls
	// it when the link closes, so that hand-off attempts do not pile up
	// hooks on the server's context.
	stop func() bool
}

// dialPeer opens a node link to node n.
func (s *Server) dialPeer(ctx context.Context, n bucket.Node) (*peerLink, error) {
	conn, err := imqlink.Dial(ctx, n.LinkAddr, imqlink.Config{
		Role: imqlink.RoleNode, ID: s.cfg.NodeID, PeerRoles: []imqpb.LinkRole{imqlink.RoleNode}, PeerID: n.ID,
		Keys: s.cfg.ClusterKeys, HandshakeTimeout: s.cfg.LinkHandshakeTimeout, Timeout: s.cfg.LinkTimeout,
		SendBuffer: s.cfg.LinkBuffer, Overflow: imqlink.OverflowRefuse, WriteTimeout: writeTimeout,
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s at %s: %w", n.ID, n.LinkAddr, err)
	}
	p := &peerLink{s: s, to: n.ID, conn: conn, acks: make(chan *imqpb.HandoffAck, 1)}
	// The three end when the link closes; once Shutdown has begun they do
	// not start, and the link is closed at once.
	s.startMu.Lock()
	defer s.startMu.Unlock()
	if s.stopping {
		conn.Close(nil)
		return nil, fmt.Errorf("dial %s: the node is shutting down", n.ID)
	}
	p.stop = context.AfterFunc(s.ctx, func() { conn.Close(nil) }) // Shutdown ends the link
	s.goLocked(func() { conn.WriteLoop() })
	s.goLocked(p.readLoop)
	s.goLocked(p.pingLoop)
	return p, nil
}

func (p *peerLink) closed() bool {
	select {
	case <-p.conn.Done():
		return true
	default:
		return false
	}
}

func (p *peerLink) pingLoop() {
	t := time.NewTicker(imqlink.DefaultPingInterval)
	defer t.Stop()
	ping, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Ping{Ping: &imqpb.Ping{}}})
	for {
		select {
		case <-p.conn.Done():
			return
		case <-p.s.ctx.Done():
			p.conn.Close(nil)
			return
		case <-t.C:
			p.conn.SendAlways(ping)
		}
	}
}

func (p *peerLink) readLoop() {
	defer p.stop()
	for {
		b, err := p.conn.Next()
		if err != nil {
			p.conn.Close(err)
			return
		}
		var down imqpb.LinkDown
		if err := proto.Unmarshal(b, &down); err != nil {
			p.conn.Close(fmt.Errorf("decode link frame: %w", err))
			return
		}
		if ack := down.GetHandoffAck(); ack != nil {
			select {
			case p.acks <- ack:
			default:
			}
		}
	}
}

// handOff streams snaps to the peer in frames of at most maxHandoffFrame
// bytes (one larger queue alone), keeping at most two frames' worth in
// flight, then HandoffEnd, and waits for the ack.
func (p *peerLink) handOff(ctx context.Context, k bkey, version uint64, snaps []*imqpb.QueueSnapshot, gws []string) (*imqpb.HandoffAck, error) {
	// The link's writer has no signal for a drained buffer: while more
	// than two frames' worth wait, look again every drainPoll.
	var tick *time.Ticker
	defer func() {
		if tick != nil {
			tick.Stop()
		}
	}()
	send := func(m *imqpb.LinkUp) error {
		frame, err := imqlink.MarshalFrame(m)
		if err != nil {
			return err
		}
		for p.conn.Buffered() > 2*maxHandoffFrame {
			if tick == nil {
				tick = time.NewTicker(drainPoll)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-p.conn.Done():
				return fmt.Errorf("link to %s closed: %v", p.to, p.conn.Err())
			case <-tick.C:
			}
		}
		return p.conn.SendAlways(frame)
	}
	batch := &imqpb.HandoffQueues{Bucket: uint32(k.b), Bits: uint32(k.bits), TableVersion: version}
	size := 0
	flush := func() error {
		if len(batch.Queues) == 0 {
			return nil
		}
		err := send(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffQueues{HandoffQueues: batch}})
		batch = &imqpb.HandoffQueues{Bucket: uint32(k.b), Bits: uint32(k.bits), TableVersion: version}
		size = 0
		return err
	}
	for _, q := range snaps {
		n := proto.Size(q)
		if size > 0 && size+n > maxHandoffFrame {
			if err := flush(); err != nil {
				return nil, err
			}
		}
		batch.Queues = append(batch.Queues, q)
		size += n
	}
	if err := flush(); err != nil {
		return nil, err
	}
	if err := send(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffEnd{HandoffEnd: &imqpb.HandoffEnd{
		Bucket: uint32(k.b), Bits: uint32(k.bits), TableVersion: version, Queues: uint32(len(snaps)), Gateways: gws,
	}}}); err != nil {
		return nil, err
	}
	select {
	case ack := <-p.acks:
		return ack, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-p.conn.Done():
		return nil, fmt.Errorf("link to %s closed: %v", p.to, p.conn.Err())
	}
}
