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

	imqlink "github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// writeTimeout bounds one batched write to a gateway.
const writeTimeout = 30 * time.Second

// link is one gateway's connection. Its reader goroutine executes requests;
// its writer goroutine (imqlink.Conn.WriteLoop) owns every write to the
// socket.
type link struct {
	s       *Server
	conn    *imqlink.Conn
	gateway string // the gateway's id
	key     string // gateway id and link serial: subscriber lists use it, so a
	// reconnected link never shares subscribers with the one it replaces
	// ctx is cancelled when the link closes: call-outs made for its
	// requests stop, and its chains run nothing more.
	ctx    context.Context
	cancel context.CancelFunc

	chainMu      sync.Mutex
	chains       map[chainKey]*chain // Guarded by chainMu: those with work.
	chained      int                 // Guarded by chainMu: requests in chains.
	chainedBytes int                 // Guarded by chainMu: their bytes.
	async        sync.WaitGroup      // the chains' goroutines
}

// linkConfig is the node's end of every link it accepts. A gateway that
// lets LinkBuffer bytes pile up has its link closed (imqlink.OverflowClose).
func (s *Server) linkConfig() imqlink.Config {
	return imqlink.Config{
		Role: imqlink.RoleNode, ID: s.cfg.NodeID, PeerRoles: []imqpb.LinkRole{imqlink.RoleGateway, imqlink.RoleNode},
		Keys: s.cfg.ClusterKeys, HandshakeTimeout: s.cfg.LinkHandshakeTimeout, Timeout: s.cfg.LinkTimeout,
		SendBuffer: s.cfg.LinkBuffer, Overflow: imqlink.OverflowClose, WriteTimeout: writeTimeout,
		TableVersion: func() uint64 { return s.currentTable().Version() },
	}
}

// serveLink runs one link until it closes. release frees the link's
// handshake slot (Server.gate) once the handshake is over.
func (s *Server) serveLink(nc net.Conn, release func()) {
	log := s.log.With("remote", nc.RemoteAddr().String())
	conn, err := imqlink.Server(nc, s.linkConfig())
	release()
	if err != nil {
		reason := imqlink.ReasonOf(err)
		s.m.linkHandshakeFailures.WithLabelValues(string(reason)).Inc()
		if ok, skipped := s.handshakeLog.Allow(string(reason), time.Now()); ok {
			log.Warn("link handshake failed", "reason", reason, "err", err, "skipped", skipped)
		}
		return
	}

	if conn.Peer().Role == imqlink.RoleNode {
		s.serveNodeLink(conn, log) // a hand-off: handoff_in.go
		return
	}
	l := &link{s: s, conn: conn, gateway: conn.Peer().ID}
	l.ctx, l.cancel = context.WithCancel(s.ctx)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.cancel()
		conn.Close(nil)
		return
	}
	s.linkSerial++
	l.key = linkKey(l.gateway, s.linkSerial)
	s.links[l.key] = l
	s.mu.Unlock()
	log = log.With("link", l.key)
	log.Info("gateway link up", "protocol", conn.Protocol())

	writerDone := make(chan struct{})
	go func() { // ends when the link closes
		defer close(writerDone)
		conn.WriteLoop()
	}()

	err = l.readLoop()
	l.close(err)
	<-writerDone
	l.async.Wait() // the chains end at once: l.ctx is done
	s.mu.Lock()
	delete(s.links, l.key)
	s.mu.Unlock()
	s.removeGateway(l.key)
	// readLoop always ends with an error: EOF or a closed socket is a clean
	// close, unless the link was closed for a reason (an overflow).
	if cause := conn.Err(); cause != nil {
		err = cause
	}
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

func (l *link) readLoop() error {
	for {
		// Gateways ping every few seconds: a silent one is gone (Next's
		// deadline).
		b, err := l.conn.Next()
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
			l.conn.SendAlways(encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Pong{Pong: &imqpb.Pong{TimeMs: time.Now().UnixMilli()}}}))
		case *imqpb.LinkUp_BucketAdopted:
			l.s.releaseHold(l, x.BucketAdopted)
		default:
			return errors.New("link frame is not a request, a ping or a bucket adopted")
		}
	}
}

// send queues one encoded frame. It never blocks: a gateway that lets
// LinkBuffer bytes pile up has its link closed (imqlink.OverflowClose), and
// reports false.
func (l *link) send(frame []byte) bool {
	switch err := l.conn.Send(frame); {
	case err == nil:
		return true
	case errors.Is(err, imqlink.ErrOverflow):
		l.s.m.linkOverflows.Inc()
		l.close(err)
	}
	return false
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
	if !errors.Is(l.conn.TrySend(frame), imqlink.ErrOverflow) {
		return
	}
	frame = encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: &imqpb.NodeReply{
		Id: id, Code: imqpb.Code_TIMEOUT, Message: "the queue node's link to this gateway is backlogged; outcome unknown",
	}}})
	l.s.m.errors.WithLabelValues(imqpb.Code_TIMEOUT.String()).Inc()
	l.conn.SendAlways(frame) // small, and one per request in flight
}

// close closes the link once and cancels its work; cause is logged by
// serveLink.
func (l *link) close(cause error) {
	if l.conn.Close(cause) && cause != nil {
		l.s.log.Debug("closing link", "link", l.key, "cause", cause)
	}
	l.cancel()
}
