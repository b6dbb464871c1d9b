package queuenode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	helloTimeout = 10 * time.Second
	writeTimeout = 30 * time.Second
)

// link is one gateway's connection. Its reader goroutine executes requests;
// its writer goroutine owns every write to the socket.
type link struct {
	s       *Server
	conn    net.Conn
	gateway string // the gateway's id
	key     string // gateway id and link serial: subscriber lists use it, so a
	// reconnected link never shares subscribers with the one it replaces
	wake chan struct{}
	done chan struct{}
	// ctx is cancelled when the link closes: call-outs made for its
	// requests stop, and its chains run nothing more.
	ctx    context.Context
	cancel context.CancelFunc

	chainMu      sync.Mutex
	chains       map[chainKey]*chain // Guarded by chainMu: those with work.
	chained      int                 // Guarded by chainMu: requests in chains.
	chainedBytes int                 // Guarded by chainMu: their bytes.
	async        sync.WaitGroup      // the chains' goroutines

	mu       sync.Mutex
	out      [][]byte // Guarded by mu: frames waiting for the writer.
	outBytes int      // Guarded by mu.
	closed   bool     // Guarded by mu.
}

// serveLink runs one link until it closes.
func (s *Server) serveLink(conn net.Conn) {
	log := s.log.With("remote", conn.RemoteAddr().String())
	fr := wire.NewFrameReader(conn, wire.DefaultMaxLinkFrame)
	conn.SetReadDeadline(time.Now().Add(helloTimeout))
	var up imqpb.LinkUp
	b, err := fr.Next()
	if err == nil {
		err = proto.Unmarshal(b, &up)
	}
	hello := up.GetHello()
	if err == nil && hello == nil {
		err = errors.New("first frame is not a hello")
	}
	if err == nil && hello.GetProtocol() != LinkProtocol {
		err = fmt.Errorf("gateway speaks link protocol %d, this node %d", hello.GetProtocol(), LinkProtocol)
	}
	if err == nil && hello.GetGatewayId() == "" {
		err = errors.New("hello without a gateway id")
	}
	if err != nil {
		log.Warn("link handshake failed", "err", err)
		conn.Close()
		return
	}
	conn.SetReadDeadline(time.Time{})

	l := &link{s: s, conn: conn, gateway: hello.GetGatewayId(), wake: make(chan struct{}, 1), done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(s.ctx)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.cancel()
		conn.Close()
		return
	}
	s.linkSerial++
	l.key = linkKey(l.gateway, s.linkSerial)
	s.links[l.key] = l
	s.mu.Unlock()
	log = log.With("link", l.key)
	log.Info("gateway link up")

	l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: &imqpb.HelloAck{
		NodeId: s.cfg.NodeID, Protocol: LinkProtocol, TableVersion: s.currentTable().Version(),
	}}})
	writerDone := make(chan struct{})
	go func() { // ends when the link closes
		defer close(writerDone)
		l.writeLoop()
	}()

	err = l.readLoop(fr)
	l.close(err)
	<-writerDone
	l.async.Wait() // the chains end at once: l.ctx is done
	s.mu.Lock()
	delete(s.links, l.key)
	s.mu.Unlock()
	s.removeGateway(l.key)
	// readLoop always ends with an error: EOF or a closed socket is a clean close.
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		log.Warn("gateway link closed", "err", err)
	} else {
		log.Info("gateway link closed")
	}
}

// linkKey names a gateway's link by its serial, unique in the process.
func linkKey(gateway string, serial uint64) string { return fmt.Sprintf("%s/%d", gateway, serial) }

// gatewayOfKey returns the gateway id in a link key.
func gatewayOfKey(key string) string {
	if i := strings.LastIndexByte(key, '/'); i >= 0 {
		return key[:i]
	}
	return key
}

func (l *link) readLoop(fr *wire.FrameReader) error {
	var deadline time.Time
	for {
		// Gateways ping every few seconds: a silent one is gone.
		if d := wire.ReadDeadline(deadline, time.Now(), l.s.cfg.LinkTimeout); d != deadline {
			deadline = d
			l.conn.SetReadDeadline(deadline)
		}
		b, err := fr.Next()
		if err != nil {
			return err
		}
		var up imqpb.LinkUp
		if err := proto.Unmarshal(b, &up); err != nil {
			return fmt.Errorf("decode link frame: %w", err)
		}
		switch x := up.GetMsg().(type) {
		case *imqpb.LinkUp_Request:
			l.s.handle(l, x.Request)
		case *imqpb.LinkUp_Ping:
			l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Pong{Pong: &imqpb.Pong{TimeMs: time.Now().UnixMilli()}}})
		default:
			return errors.New("link frame is neither a request nor a ping")
		}
	}
}

// send queues one encoded frame. It never blocks: a gateway that lets
// LinkBuffer bytes pile up has its link closed, and reports false.
func (l *link) send(frame []byte) bool {
	switch l.push(frame, true) {
	case pushed:
		return true
	case overflowed:
		l.s.m.linkOverflows.Inc()
		l.close(fmt.Errorf("link send buffer exceeded %d bytes", l.s.cfg.LinkBuffer))
	}
	return false
}

type pushResult int

const (
	pushed pushResult = iota
	overflowed
	linkClosed
)

// push appends frame for the writer, within LinkBuffer if bounded.
func (l *link) push(frame []byte, bounded bool) pushResult {
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return linkClosed
	case bounded && l.outBytes+len(frame) > l.s.cfg.LinkBuffer:
		l.mu.Unlock()
		return overflowed
	}
	l.out = append(l.out, frame)
	l.outBytes += len(frame)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return pushed
}

func (l *link) sendMsg(m *imqpb.LinkDown) { l.send(encodeLink(m)) }

// reply sends a successful reply to request id; set fills in its result. A
// reply that would overflow the link buffer is replaced by a small TIMEOUT
// (outcome unknown: the gateway undoes a join by leaving), so that one large
// join cannot cost the gateway its link.
func (l *link) reply(id uint64, set func(*imqpb.NodeReply)) {
	if id == 0 {
		return
	}
	r := &imqpb.NodeReply{Id: id}
	if set != nil {
		set(r)
	}
	frame := encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: r}})
	if l.push(frame, true) != overflowed {
		return
	}
	frame = encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: &imqpb.NodeReply{
		Id: id, Code: imqpb.Code_TIMEOUT, Message: "the queue node's link to this gateway is backlogged; outcome unknown",
	}}})
	l.s.m.errors.WithLabelValues(imqpb.Code_TIMEOUT.String()).Inc()
	l.push(frame, false) // small, and one per request in flight
}

// close closes the link once; cause is logged by serveLink.
func (l *link) close(cause error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	l.out = nil
	l.outBytes = 0
	l.mu.Unlock()
	close(l.done)
	l.cancel()
	if cause != nil {
		l.s.log.Debug("closing link", "link", l.key, "cause", cause)
	}
	l.conn.Close()
}

// writeLoop writes queued frames, all that are waiting in one writev, until
// the link closes.
func (l *link) writeLoop() {
	for {
		select {
		case <-l.wake:
		case <-l.done:
			return
		}
		l.mu.Lock()
		frames := l.out
		l.out = nil
		l.outBytes = 0
		l.mu.Unlock()
		if len(frames) == 0 {
			continue
		}
		batch := net.Buffers(frames)
		l.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		if _, err := batch.WriteTo(l.conn); err != nil {
			l.close(fmt.Errorf("write: %w", err))
			return
		}
	}
}
