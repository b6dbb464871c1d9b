package gateway

import (
	"bufio"
	"bytes"
	"container/list"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/sysx"
)

// httpSlack is how many connections beyond the authenticated and pending
// pools the listener admits: the admin RPC calls of API key holders (out of
// the pending pool once their key is checked, and in no other), and
// connections between authenticating and their reader taking their place.
const httpSlack = 64

// limitListener caps the open connections so the process never runs out of
// file descriptors. Past the cap it accepts and closes at once with a 503, so
// clients get an answer rather than a hung connect; when accept itself fails
// for lack of descriptors it backs off instead of spinning. Each accepted
// connection starts pending (admission.go): past the per-source cap it is
// refused likewise with a 429; past the total cap it takes the place of the
// oldest pending connection.
type limitListener struct {
	net.Listener
	s       *Server
	max     int64
	active  atomic.Int64
	pending *pendingPool
	drains  chan struct{} // one per refused connection being drained (refuseRaw)

	drainMu     sync.Mutex
	drainWG     sync.WaitGroup // the drain goroutines; waitDrains waits for them
	drainClosed bool           // Guarded by drainMu: waitDrains was called; no drain starts
}

// maxDrains bounds the refused connections drained at once; past it a
// refused connection is closed without draining.
const maxDrains = 32

// newLimitListener admits maxConns authenticated and maxPending pending
// connections, and httpSlack more.
func newLimitListener(ln net.Listener, maxConns, maxPending, maxPendingPerIP int, s *Server) *limitListener {
	return &limitListener{
		Listener: ln, s: s, max: int64(maxConns) + int64(maxPending) + httpSlack,
		pending: newPendingPool(maxPending, maxPendingPerIP), drains: make(chan struct{}, maxDrains),
	}
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
		src := sourceKey(c.RemoteAddr())
		if l.active.Add(1) > l.max {
			l.active.Add(-1)
			l.s.noteRefused(refusedListenerFull, src)
			l.refuseRaw(c, refusals[refusedListenerFull].raw)
			continue
		}
		cc := &countedConn{Conn: c, l: l, src: src}
		if reason := cc.pend(false); reason != "" {
			l.s.noteRefused(reason, src)
			l.refuseRaw(cc, refusals[reason].raw)
			continue
		}
		return cc, nil
	}
}

// refuseDrain bounds the reading of a refused connection's request.
const refuseDrain = 500 * time.Millisecond

// refuseRaw writes resp to a connection refused at accept and closes it.
// The answer is small enough for the socket's buffer: the write does not
// wait for the client, and the deadline covers a full buffer. Closing with
// the client's request unread would reset the connection, and the reset
// can discard the answer before the client reads it: so the connection is
// half-closed and what the client sends is read and dropped, for
// refuseDrain at most, on a goroutine of its own (at most maxDrains at
// once; past that it is closed at once).
func (l *limitListener) refuseRaw(c net.Conn, resp []byte) {
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := c.Write(resp); err != nil {
		c.Close()
		return
	}
	select {
	case l.drains <- struct{}{}:
	default:
		c.Close()
		return
	}
	l.drainMu.Lock()
	if l.drainClosed {
		l.drainMu.Unlock()
		<-l.drains
		c.Close()
		return
	}
	l.drainWG.Add(1)
	l.drainMu.Unlock()
	go func() { // ends within refuseDrain; Shutdown waits for it (waitDrains)
		defer l.drainWG.Done()
		defer func() { <-l.drains }()
		defer c.Close()
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		c.SetReadDeadline(time.Now().Add(refuseDrain))
		io.Copy(io.Discard, io.LimitReader(c, 64<<10))
	}()
}

// waitDrains waits for the refused connections being drained, within
// refuseDrain, or until ctx is done; no drain starts after it.
func (l *limitListener) waitDrains(ctx context.Context) {
	l.drainMu.Lock()
	l.drainClosed = true
	l.drainMu.Unlock()
	done := make(chan struct{})
	go func() { // ends within refuseDrain
		l.drainWG.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// countedConn releases its slot in the listener once, on Close, and its
// pending slot when it authenticates or closes.
type countedConn struct {
	net.Conn
	l    *limitListener
	src  netip.Prefix
	once sync.Once

	// Guarded by l.pending.mu (pendingPool):
	elem   *list.Element // c's place in the pending pool; nil: not pending
	idle   bool          // elem is in the pool's idle list
	closed bool
	keyed  bool // an API key was accepted on c: not counted against its source (pendingPool.keyed)
}

// pend makes c pending, unless it is already, or returns why it may not
// be; idle says c idles between HTTP requests. When it evicts another
// pending connection to make room, it closes that one. A nil c (a
// connection not from the listener) is never refused.
func (c *countedConn) pend(idle bool) string {
	if c == nil {
		return ""
	}
	reason, victim := c.l.pending.acquire(c, idle)
	if victim != nil {
		c.l.s.noteRefused(refusedEvicted, victim.src)
		victim.Conn.Close() // its server (net/http or the WebSocket reader) then closes it
	}
	return reason
}

// unpend gives back c's pending slot: it authenticated, or closed.
func (c *countedConn) unpend() {
	if c != nil {
		c.l.pending.release(c, false)
	}
}

// unpendKeyed gives back c's pending slot after an API key was accepted on
// it; idle between calls, it no longer counts against its source.
func (c *countedConn) unpendKeyed() {
	if c != nil {
		c.l.pending.keyed(c)
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
	c.l.pending.release(c, true)
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
	bc := &bufConn{Conn: c}
	if n := brw.Reader.Buffered(); n > 0 {
		// A client that sent its first frame right behind the handshake:
		// gorilla/websocket refuses read-ahead data (and, the connection
		// hijacked, cannot answer), so the frame is kept for the reader.
		pre, _ := brw.Reader.Peek(n)
		bc.pre = bytes.Clone(pre)
		brw.Reader.Reset(bc)
	}
	return bc, brw, nil
}

var writeBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

// bufConn collects the frames gorilla writes during a batch (between begin
// and flush) and writes them with one syscall. Outside a batch (the upgrade
// response, a close frame gorilla sends from the reader on a protocol error)
// writes go straight through. Its buffer comes from a pool and returns to it
// after each flush, so an idle connection holds none.
type bufConn struct {
	net.Conn
	pre      []byte // read ahead with the handshake; Read returns it first (the reader's only)
	mu       sync.Mutex
	buf      *[]byte   // Guarded by mu.
	batching bool      // Guarded by mu.
	deadline time.Time // Guarded by mu: the write deadline last set by flush.
}

func (b *bufConn) Read(p []byte) (int, error) {
	if len(b.pre) > 0 {
		n := copy(p, b.pre)
		b.pre = b.pre[n:]
		return n, nil
	}
	return b.Conn.Read(p)
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
