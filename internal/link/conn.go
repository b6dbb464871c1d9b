package link

import (
	"fmt"
	"net"
	"sync"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// Overflow is what a Conn does with a Send that does not fit in its send
// buffer (Config.SendBuffer).
type Overflow int

const (
	// OverflowClose closes the link: a peer that lets this much pile up is
	// not keeping up, and reconnecting (its clients rejoin) costs less than
	// growing without bound. The queue node's policy toward gateways.
	OverflowClose Overflow = iota
	// OverflowRefuse refuses the frame and keeps the link: the caller fails
	// what it was sending (the gateway answers the request UNAVAILABLE).
	OverflowRefuse
)

// Peer is the other end of a link, as its handshake proved it.
type Peer struct {
	Role imqpb.LinkRole
	ID   string
}

// Conn is one link after its handshake: frames in through Next, frames out
// through a bounded send buffer that WriteLoop drains.
type Conn struct {
	nc           net.Conn
	fr           *FrameReader
	peer         Peer
	protocol     uint32
	tableVersion uint64
	timeout      time.Duration
	sendBuffer   int
	overflow     Overflow
	writeTimeout time.Duration
	wake         chan struct{}
	done         chan struct{}

	deadline time.Time // Owned by the reader (Next).

	mu       sync.Mutex
	out      [][]byte // Guarded by mu: frames waiting for the writer.
	outBytes int      // Guarded by mu.
	closed   bool     // Guarded by mu.
	cause    error    // Guarded by mu: why it closed.
}

func newConn(nc net.Conn, fr *FrameReader, cfg Config, peer Peer, protocol uint32, tableVersion uint64) *Conn {
	return &Conn{
		nc: nc, fr: fr, peer: peer, protocol: protocol, tableVersion: tableVersion,
		timeout: cfg.Timeout, sendBuffer: cfg.SendBuffer, overflow: cfg.Overflow, writeTimeout: cfg.WriteTimeout,
		wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
}

// Peer returns the other end's role and id.
func (c *Conn) Peer() Peer { return c.peer }

// Protocol returns the link protocol version the ends agreed on.
func (c *Conn) Protocol() uint32 { return c.protocol }

// TableVersion returns, on a dialer's Conn, the version of the bucket
// table the acceptor held when it answered the hello; 0 on an acceptor's.
func (c *Conn) TableVersion() uint64 { return c.tableVersion }

// RemoteAddr returns the peer's address.
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// Next returns the next frame, of at most MaxFrame bytes; the slice is
// valid until the next call. A link on which nothing arrived for
// Config.Timeout fails with a timeout: the peer is gone even if TCP has
// not noticed. One reader goroutine only.
func (c *Conn) Next() ([]byte, error) {
	if d := ReadDeadline(c.deadline, time.Now(), c.timeout); d != c.deadline {
		c.deadline = d
		c.nc.SetReadDeadline(d)
	}
	return c.fr.Next()
}

// Send queues frame for the writer. Past the send buffer the Overflow
// policy applies: ErrOverflow, and with OverflowClose the link is closed.
// ErrClosed: the link is closed. It never blocks.
func (c *Conn) Send(frame []byte) error {
	err := c.push(frame, true)
	if err == ErrOverflow && c.overflow == OverflowClose {
		c.Close(fmt.Errorf("the send buffer of %d bytes overflowed", c.sendBuffer))
	}
	return err
}

// TrySend queues frame if it fits in the send buffer, and otherwise
// returns ErrOverflow whatever the policy: the caller sends something
// smaller instead.
func (c *Conn) TrySend(frame []byte) error { return c.push(frame, true) }

// SendAlways queues frame past the send buffer's bound. Only for small
// frames bounded by something else (a ping, a pong, one reply per request
// in flight), whose loss would cost more than their bytes.
func (c *Conn) SendAlways(frame []byte) error { return c.push(frame, false) }

func (c *Conn) push(frame []byte, bounded bool) error {
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return ErrClosed
	case bounded && c.outBytes+len(frame) > c.sendBuffer:
		c.mu.Unlock()
		return ErrOverflow
	}
	c.out = append(c.out, frame)
	c.outBytes += len(frame)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

// Buffered returns the bytes waiting for the writer.
func (c *Conn) Buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.outBytes
}

// WriteLoop writes queued frames, all that are waiting in one writev, until
// the link closes; it closes the link when a write fails. It returns why
// the link closed. One writer goroutine only.
func (c *Conn) WriteLoop() error {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return c.Err()
		}
		c.mu.Lock()
		frames := c.out
		c.out, c.outBytes = nil, 0
		c.mu.Unlock()
		if len(frames) == 0 {
			continue
		}
		batch := net.Buffers(frames)
		c.nc.SetWriteDeadline(time.Now().Add(c.writeTimeout))
		if _, err := batch.WriteTo(c.nc); err != nil {
			c.Close(fmt.Errorf("write: %w", err))
			return c.Err()
		}
	}
}

// Close closes the link once, dropping what was queued; cause (nil: a
// clean close) is what Err reports. It reports whether this call closed it.
func (c *Conn) Close(cause error) bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return false
	}
	c.closed = true
	c.cause = cause
	c.out, c.outBytes = nil, 0
	c.mu.Unlock()
	close(c.done)
	c.nc.Close()
	return true
}

// Done is closed when the link closes.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err returns why the link closed: nil while open or after a clean close.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cause
}
