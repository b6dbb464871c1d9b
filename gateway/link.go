package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	// linkHandshakeTimeout bounds dialling a node and the link handshake.
	linkHandshakeTimeout = 5 * time.Second
	// linkWriteTime bounds one batched write to a node.
	linkWriteTime = 30 * time.Second
	// linkBuffer bounds the bytes of requests queued for one node; past it
	// requests fail UNAVAILABLE rather than grow the gateway
	// (link.OverflowRefuse).
	linkBuffer = 64 << 20
	// maxPending bounds requests awaiting one node's reply.
	maxPending = 1 << 20
)

type pendingReq struct {
	onReply  func(*imqpb.NodeReply)
	deadline time.Time
}

// nodeLink is the gateway's one multiplexed connection to a queue node. run
// keeps it dialled; requests fail fast with UNAVAILABLE while it is down.
// A link serves one node at one address: a node that leaves the table or
// changes address gets a new link, and its old one is stopped for good.
type nodeLink struct {
	s      *Server
	node   bucket.Node
	nextID atomic.Uint64
	everUp chan struct{} // closed the first time the link comes up
	upOnce sync.Once

	// Guarded by s.routeMu: the link's goroutine was started; it was
	// stopped (it never starts again); cancel stops it.
	started, stopped bool
	cancel           context.CancelFunc

	mu      sync.Mutex
	conn    *link.Conn             // Guarded by mu; nil while down.
	pending map[uint64]*pendingReq // Guarded by mu.
}

func newNodeLink(s *Server, node bucket.Node) *nodeLink {
	return &nodeLink{s: s, node: node, everUp: make(chan struct{}), pending: make(map[uint64]*pendingReq)}
}

func (l *nodeLink) isUp() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conn != nil
}

// linkConfig is the gateway's end of every link it dials.
func (s *Server) linkConfig() link.Config {
	return link.Config{
		Role: link.RoleGateway, ID: s.cfg.GatewayID, PeerRoles: []imqpb.LinkRole{link.RoleNode},
		Keys: s.cfg.ClusterKeys, HandshakeTimeout: linkHandshakeTimeout, Timeout: s.cfg.LinkTimeout,
		SendBuffer: linkBuffer, Overflow: link.OverflowRefuse, WriteTimeout: linkWriteTime,
	}
}

// run dials the node and serves the link, redialling with capped exponential
// backoff and jitter, until ctx is done (the link was stopped, or Shutdown).
func (l *nodeLink) run(ctx context.Context) {
	log := l.s.log.With("node", l.node.ID, "addr", l.node.LinkAddr)
	backoff := 50 * time.Millisecond
	failures := 0
	for ctx.Err() == nil {
		conn, err := l.dial(ctx)
		if err != nil {
			if r := link.ReasonOf(err); r != "" && ctx.Err() == nil {
				l.s.m.linkHandshakeFailures.WithLabelValues(string(r)).Inc()
			}
			failures++
			// Logged on the first failure and every 20th: a node down for
			// long, or one refusing this gateway's key, does not flood.
			if failures == 1 || failures%20 == 0 {
				log.Warn("queue node link down; retrying", "err", err, "reason", link.ReasonOf(err), "attempts", failures)
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff/2 + rand.N(backoff/2+1)):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		failures, backoff = 0, 50*time.Millisecond
		log.Info("queue node link up", "peer", conn.Peer().ID, "protocol", conn.Protocol())
		err = l.serve(ctx, conn)
		if ctx.Err() != nil { // stopped (the node left the table) or Shutdown: no loss
			log.Info("queue node link closed")
		} else {
			log.Warn("queue node link lost", "err", err)
		}
		l.down()
	}
}

// dial connects and runs the handshake; a node that knows a newer table
// than the gateway's makes it fetch that one. In cluster mode the node
// must answer with the id the table names at that address: requests for
// its buckets go to no other (standalone, the gateway does not know the
// node's id).
func (l *nodeLink) dial(ctx context.Context) (*link.Conn, error) {
	cfg := l.s.linkConfig()
	if l.s.cfg.Member != nil {
		cfg.PeerID = l.node.ID
	}
	conn, err := link.Dial(ctx, l.node.LinkAddr, cfg)
	if err != nil {
		return nil, err
	}
	if conn.TableVersion() > l.s.table().Version() {
		l.s.kickTable()
	}
	return conn, nil
}

// serve runs the link's reader on this goroutine, and beside it the writer
// and a ticker that pings the node and expires requests, until the
// connection fails or ctx is done.
func (l *nodeLink) serve(ctx context.Context, conn *link.Conn) error {
	l.mu.Lock()
	l.conn = conn
	l.mu.Unlock()
	l.upOnce.Do(func() { close(l.everUp) })
	var wg sync.WaitGroup
	wg.Go(func() { conn.WriteLoop() }) // ends when conn closes
	wg.Go(func() { l.tick(conn) })     // ends when conn closes
	stop := context.AfterFunc(ctx, func() { conn.Close(nil) })
	defer stop()

	var err error
	for {
		// The node answers pings: a link silent for LinkTimeout is dead,
		// even when TCP has not noticed (Next's deadline).
		var b []byte
		if b, err = conn.Next(); err != nil {
			break
		}
		var m imqpb.LinkDown
		if err = proto.Unmarshal(b, &m); err != nil {
			err = fmt.Errorf("decode link frame: %w", err)
			break
		}
		switch x := m.GetMsg().(type) {
		case *imqpb.LinkDown_Deliver:
			l.s.fanout(l, x.Deliver)
		case *imqpb.LinkDown_QueueClosed:
			l.s.queueClosed(l, x.QueueClosed)
		case *imqpb.LinkDown_BucketMoving:
			l.s.bucketMoving(l, x.BucketMoving)
		case *imqpb.LinkDown_BucketHeld:
			l.s.bucketHeld(l, x.BucketHeld)
		case *imqpb.LinkDown_BucketDropped:
			l.s.bucketDropped(l, x.BucketDropped)
		case *imqpb.LinkDown_Reply:
			l.mu.Lock()
			p := l.pending[x.Reply.GetId()]
			delete(l.pending, x.Reply.GetId())
			l.mu.Unlock()
			if p != nil {
				p.onReply(x.Reply)
			}
		}
	}
	conn.Close(err)
	wg.Wait()
	return err
}

// tick pings the node every LinkPingInterval and expires requests past
// their deadline, until conn closes.
func (l *nodeLink) tick(conn *link.Conn) {
	t := time.NewTicker(min(250*time.Millisecond, l.s.cfg.LinkPingInterval/2))
	defer t.Stop()
	ping, _ := link.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Ping{Ping: &imqpb.Ping{}}})
	lastPing := time.Now()
	for {
		select {
		case <-conn.Done():
			return
		case now := <-t.C:
			l.expire()
			if now.Sub(lastPing) >= l.s.cfg.LinkPingInterval {
				lastPing = now
				conn.SendAlways(ping)
			}
		}
	}
}

// down marks the link down, fails every pending request and tells the local
// subscribers whose subscriptions were made through this link that they lost
// them.
func (l *nodeLink) down() {
	l.mu.Lock()
	l.conn = nil
	pending := l.pending
	l.pending = make(map[uint64]*pendingReq)
	l.mu.Unlock()
	lost := &imqpb.NodeReply{Code: imqpb.Code_UNAVAILABLE, Message: "link to queue node " + l.node.ID + " lost; the outcome is unknown"}
	for _, p := range pending {
		p.onReply(lost)
	}
	l.s.linkLost(l)
}

// request sends req to the node. onReply, if not nil, is called exactly once:
// with the node's reply, or with TIMEOUT (past deadline; zero: the
// configured RequestTimeout from now) or UNAVAILABLE. Without onReply the
// node sends no reply. The error says the request was not sent.
//
// The deadline goes in the frame too (deadline_ms), so that a node whose
// call-outs kept the request waiting past it drops it rather than run what
// the client was told timed out. A request without a reply has none: it
// must run whenever it arrives.
func (l *nodeLink) request(req *imqpb.NodeRequest, deadline time.Time, onReply func(*imqpb.NodeReply)) error {
	req.DeadlineMs = 0
	if onReply != nil {
		if deadline.IsZero() {
			deadline = time.Now().Add(l.s.cfg.RequestTimeout)
		}
		req.Id = l.nextID.Add(1)
		req.DeadlineMs = deadline.UnixMilli()
	}
	frame, err := link.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	if err != nil {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "encode request: %v", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	unreachable := imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s is unreachable", l.node.ID)
	if l.conn == nil {
		return unreachable
	}
	if onReply == nil {
		// Requests without a reply (leaves of closed connections) always go:
		// they are small, bounded by the connections, and dropping one would
		// leave a subscriber on the node.
		if l.conn.SendAlways(frame) != nil {
			return unreachable
		}
		return nil
	}
	if len(l.pending) >= maxPending {
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s is not keeping up", l.node.ID)
	}
	switch err := l.conn.Send(frame); {
	case errors.Is(err, link.ErrOverflow):
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s is not keeping up", l.node.ID)
	case err != nil:
		return unreachable
	}
	// Registered under l.mu, before the reader can take the reply: it
	// takes l.mu too.
	l.pending[req.Id] = &pendingReq{onReply: onReply, deadline: deadline}
	return nil
}

func (l *nodeLink) expire() {
	now := time.Now()
	var expired []*pendingReq
	l.mu.Lock()
	for id, p := range l.pending {
		if now.After(p.deadline) {
			expired = append(expired, p)
			delete(l.pending, id)
		}
	}
	l.mu.Unlock()
	timeout := &imqpb.NodeReply{Code: imqpb.Code_TIMEOUT, Message: "queue node " + l.node.ID + " did not answer in time; the outcome is unknown"}
	for _, p := range expired {
		p.onReply(timeout)
	}
}
