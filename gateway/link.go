package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// LinkProtocol is the link protocol version this gateway speaks.
const LinkProtocol = 1

const (
	linkDialTimeout = 5 * time.Second
	linkWriteTime   = 30 * time.Second
	// linkBuffer bounds the bytes of requests queued for one node; past it
	// requests fail UNAVAILABLE rather than grow the gateway.
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
	wake   chan struct{}
	everUp chan struct{} // closed the first time the link comes up
	upOnce sync.Once

	// Guarded by s.routeMu: the link's goroutine was started; it was
	// stopped (it never starts again); cancel stops it.
	started, stopped bool
	cancel           context.CancelFunc

	mu       sync.Mutex
	conn     net.Conn               // Guarded by mu; nil while down.
	out      [][]byte               // Guarded by mu: frames for the writer.
	outBytes int                    // Guarded by mu.
	pending  map[uint64]*pendingReq // Guarded by mu.
}

func newNodeLink(s *Server, node bucket.Node) *nodeLink {
	return &nodeLink{s: s, node: node, wake: make(chan struct{}, 1), everUp: make(chan struct{}), pending: make(map[uint64]*pendingReq)}
}

func (l *nodeLink) isUp() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conn != nil
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
			failures++
			if failures == 1 || failures%20 == 0 {
				log.Warn("queue node link down; retrying", "err", err, "attempts", failures)
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff/2 + rand.N(backoff/2+1)):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		failures, backoff = 0, 50*time.Millisecond
		log.Info("queue node link up")
		err = l.serve(ctx, conn)
		if ctx.Err() != nil { // stopped (the node left the table) or Shutdown: no loss
			log.Info("queue node link closed")
		} else {
			log.Warn("queue node link lost", "err", err)
		}
		l.down()
	}
}

func (l *nodeLink) dial(ctx context.Context) (net.Conn, error) {
	d := net.Dialer{Timeout: linkDialTimeout, KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", l.node.LinkAddr)
	if err != nil {
		return nil, err
	}
	hello, _ := wire.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: &imqpb.Hello{GatewayId: l.s.cfg.GatewayID, Protocol: LinkProtocol}}})
	conn.SetDeadline(time.Now().Add(linkDialTimeout))
	if _, err := conn.Write(hello); err != nil {
		conn.Close()
		return nil, err
	}
	fr := wire.NewFrameReader(conn, wire.DefaultMaxLinkFrame)
	b, err := fr.Next()
	var down imqpb.LinkDown
	if err == nil {
		err = proto.Unmarshal(b, &down)
	}
	if err == nil && down.GetHelloAck() == nil {
		err = errors.New("node did not answer the hello")
	}
	if err == nil && down.GetHelloAck().GetProtocol() != LinkProtocol {
		err = fmt.Errorf("node speaks link protocol %d, this gateway %d", down.GetHelloAck().GetProtocol(), LinkProtocol)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	if v := down.GetHelloAck().GetTableVersion(); v > l.s.table().Version() {
		l.s.kickTable() // the node knows a newer table: fetch it
	}
	conn.SetDeadline(time.Time{})
	// The hello exchange is one frame each way, so fr has buffered nothing
	// more; serve makes its own reader.
	return conn, nil
}

// serve runs the link's reader on this goroutine and a writer beside it,
// until the connection fails or ctx is done.
func (l *nodeLink) serve(ctx context.Context, conn net.Conn) error {
	l.mu.Lock()
	l.conn = conn
	l.mu.Unlock()
	l.upOnce.Do(func() { close(l.everUp) })
	done := make(chan struct{})
	writerDone := make(chan struct{})
	go func() { // ends when done closes
		defer close(writerDone)
		l.writeLoop(conn, done)
	}()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	fr := wire.NewFrameReader(conn, wire.DefaultMaxLinkFrame)
	var err error
	var deadline time.Time
	for {
		// The node answers pings: a link silent for LinkTimeout is dead,
		// even when TCP has not noticed.
		if d := wire.ReadDeadline(deadline, time.Now(), l.s.cfg.LinkTimeout); d != deadline {
			deadline = d
			conn.SetReadDeadline(deadline)
		}
		var b []byte
		if b, err = fr.Next(); err != nil {
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
	conn.Close()
	close(done)
	<-writerDone
	return err
}

// down marks the link down, fails every pending request and tells the local
// subscribers whose subscriptions were made through this link that they lost
// them.
func (l *nodeLink) down() {
	l.mu.Lock()
	l.conn = nil
	l.out, l.outBytes = nil, 0
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
	frame, err := wire.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	if err != nil {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "encode request: %v", err)
	}
	l.mu.Lock()
	switch {
	case l.conn == nil:
		l.mu.Unlock()
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s is unreachable", l.node.ID)
	case onReply != nil && (l.outBytes+len(frame) > linkBuffer || len(l.pending) >= maxPending):
		// Requests without a reply (leaves of closed connections) always go:
		// they are small, bounded by the connections, and dropping one would
		// leave a subscriber on the node.
		l.mu.Unlock()
		return imqerr.New(imqpb.Code_UNAVAILABLE, "queue node %s is not keeping up", l.node.ID)
	}
	if onReply != nil {
		l.pending[req.Id] = &pendingReq{onReply: onReply, deadline: deadline}
	}
	l.out = append(l.out, frame)
	l.outBytes += len(frame)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return nil
}

// writeLoop writes queued frames in batches (one writev each) and expires
// requests past their deadline, until done closes.
func (l *nodeLink) writeLoop(conn net.Conn, done <-chan struct{}) {
	tick := time.NewTicker(min(250*time.Millisecond, l.s.cfg.LinkPingInterval/2))
	defer tick.Stop()
	ping, _ := wire.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Ping{Ping: &imqpb.Ping{}}})
	lastPing := time.Now()
	for {
		select {
		case <-done:
			return
		case now := <-tick.C:
			l.expire()
			if now.Sub(lastPing) < l.s.cfg.LinkPingInterval {
				continue
			}
			lastPing = now
			l.mu.Lock()
			l.out = append(l.out, ping)
			l.outBytes += len(ping)
			l.mu.Unlock()
		case <-l.wake:
		}
		l.mu.Lock()
		frames := l.out
		l.out, l.outBytes = nil, 0
		l.mu.Unlock()
		if len(frames) == 0 {
			continue
		}
		bufs := net.Buffers(frames)
		conn.SetWriteDeadline(time.Now().Add(linkWriteTime))
		if _, err := bufs.WriteTo(conn); err != nil {
			conn.Close() // the reader sees it and takes the link down
			<-done
			return
		}
	}
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
