package gateway

import (
	"bufio"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/sysx"
)

// httpSlack is how many connections beyond the WebSocket capacity the
// listener admits, so /metrics and /healthz answer while clients are refused.
const httpSlack = 64

// limitListener caps the open connections so the process never runs out of
// file descriptors. Past the cap it accepts and closes at once with a 503, so
// clients get an answer rather than a hung connect; when accept itself fails
// for lack of descriptors it backs off instead of spinning. Each accepted
// connection starts pending (admission.go): past the pending caps it is
// refused likewise, with a 429 when its own source holds too many.
type limitListener struct {
	net.Listener
	s       *Server
	max     int64
	active  atomic.Int64
	pending *pendingPool
}

// newLimitListener admits maxConns authenticated and maxPending pending
// connections, and httpSlack more for /metrics and /healthz.
func newLimitListener(ln net.Listener, maxConns, maxPending, maxPendingPerIP int, s *Server) *limitListener {
	return &limitListener{Listener: ln, s: s, max: int64(maxConns + maxPending + httpSlack), pending: newPendingPool(maxPending, maxPendingPerIP)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	backoff := 5 * time.Millisecond
	var lastLog time.Time
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if !sysx.IsResourceExhausted(err) {
				return nil, err
			}
			if time.Since(lastLog) > time.Second {
				l.s.log.Warn("out of file descriptors; refusing connections until some close", "err", err)
				lastLog = time.Now()
			}
			l.s.m.accepted.WithLabelValues("fd_exhausted").Inc()
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		if l.active.Add(1) > l.max {
			l.active.Add(-1)
			l.s.m.accepted.WithLabelValues("full").Inc()
			l.s.m.refused.WithLabelValues(refusedFull).Inc()
			refuseRaw(c, fullResponse)
			c.Close()
			continue
		}
		cc := &countedConn{Conn: c, l: l, src: sourceKey(c.RemoteAddr())}
		if reason := cc.pend(); reason != "" {
			l.s.m.accepted.WithLabelValues("refused").Inc()
			l.s.m.refused.WithLabelValues(reason).Inc()
			resp := pendingResponse
			if reason == refusedPendingIP {
				resp = pendingIPResponse
			}
			refuseRaw(c, resp)
			cc.Close()
			continue
		}
		return cc, nil
	}
}

// refuseRaw writes resp to a connection refused at accept. The answer is
// small enough for the socket's buffer: the write does not wait for the
// client, and the deadline covers a full buffer.
func refuseRaw(c net.Conn, resp []byte) {
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	c.Write(resp)
}

// countedConn releases its slot in the listener once, on Close, and its
// pending slot when it authenticates or closes.
type countedConn struct {
	net.Conn
	l    *limitListener
	src  netip.Prefix
	once sync.Once

	mu      sync.Mutex
	pending bool // Guarded by mu: holds a slot of l.pending.
	closed  bool // Guarded by mu.
}

// pend makes c pending, unless it is already, or returns why it may not
// be. A nil c (a connection not from the listener) is never refused.
func (c *countedConn) pend() string {
	if c == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.pending {
		return ""
	}
	if reason := c.l.pending.acquire(c.src); reason != "" {
		return reason
	}
	c.pending = true
	return ""
}

// unpend gives back c's pending slot: it authenticated, is serving an HTTP
// request, or closed.
func (c *countedConn) unpend() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending {
		c.pending = false
		c.l.pending.release(c.src)
	}
}

// source returns the address c's limits are counted by.
func (c *countedConn) source() netip.Prefix {
	if c == nil {
		return netip.Prefix{}
	}
	return c.src
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.unpend()
	c.once.Do(func() { c.l.active.Add(-1) })
	return err
}

// CloseWrite half-closes the TCP connection after a goodbye.
func (c *countedConn) CloseWrite() error {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		return tc.CloseWrite()
	}
	return nil
}

// hijackWrapper hands gorilla/websocket a bufConn instead of the raw socket,
// so that a connection's writer can coalesce several frames into one write.
type hijackWrapper struct{ http.ResponseWriter }

func (h hijackWrapper) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	return &bufConn{Conn: c}, brw, nil
}

var writeBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

// bufConn collects the frames gorilla writes during a batch (between begin
// and flush) and writes them with one syscall. Outside a batch (the upgrade
// response, a close frame gorilla sends from the reader on a protocol error)
// writes go straight through. Its buffer comes from a pool and returns to it
// after each flush, so an idle connection holds none.
type bufConn struct {
	net.Conn
	mu       sync.Mutex
	buf      *[]byte   // Guarded by mu.
	batching bool      // Guarded by mu.
	deadline time.Time // Guarded by mu: the write deadline last set by flush.
}

func (b *bufConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.batching {
		return b.Conn.Write(p)
	}
	if b.buf == nil {
		b.buf = writeBufPool.Get().(*[]byte)
	}
	*b.buf = append(*b.buf, p...)
	return len(p), nil
}

// SetWriteDeadline is ignored during a batch: flush sets its own deadline.
func (b *bufConn) SetWriteDeadline(t time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.batching {
		return nil
	}
	b.deadline = time.Time{} // flush sets its own again
	return b.Conn.SetWriteDeadline(t)
}

func (b *bufConn) begin() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// flush ends the batch and writes it, within timeout.
func (b *bufConn) flush(timeout time.Duration) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	if b.buf == nil {
		return nil
	}
	buf := b.buf
	b.buf = nil
	var err error
	if len(*buf) > 0 {
		// Moving the deadline costs a runtime timer update; doing it only
		// when half the timeout has passed lets a stuck write fail after
		// between half and all of the timeout.
		if now := time.Now(); b.deadline.Sub(now) < timeout/2 {
			b.deadline = now.Add(timeout)
			b.Conn.SetWriteDeadline(b.deadline)
		}
		_, err = b.Conn.Write(*buf)
	}
	if cap(*buf) <= 64<<10 {
		*buf = (*buf)[:0]
		writeBufPool.Put(buf)
	}
	return err
}

func (b *bufConn) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
