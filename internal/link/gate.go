package link

import (
	"container/list"
	"net"
	"net/netip"
	"sync"
)

// Default bounds of an acceptor's Gate.
const (
	// DefaultMaxHandshakes bounds the inbound handshakes in flight: far more
	// than the gateways and nodes of a cluster reconnecting at once, each
	// done within a round trip or two.
	DefaultMaxHandshakes = 256
	// DefaultMaxHandshakesPerAddr bounds those from one IP address: a
	// gateway or node dials an acceptor once at a time.
	DefaultMaxHandshakesPerAddr = 16
)

// Shed names which bound of a Gate closed a connection: a metric label and
// a log attribute.
type Shed string

const (
	// ShedAddr: the peer's IP address already had the most handshakes in
	// flight that one address may have; the new connection was closed.
	ShedAddr Shed = "address"
	// ShedOldest: every handshake slot was taken; the oldest handshake's
	// connection was closed to make room for the new one.
	ShedOldest Shed = "oldest"
)

// Gate bounds the handshakes an acceptor runs at once, before any peer
// has proved it holds the cluster key, so that connections which send
// nothing (or too little) cannot make it hold a goroutine, a socket and a
// frame each without end, nor lock out the peers that do hold the key.
//
// A connection from an address that has perAddr handshakes in flight is
// closed at once: one host cannot take the slots of others. When all max
// slots are taken, the oldest handshake's connection is closed to admit
// the new one rather than the new one being refused: a peer that holds
// the key finishes within a round trip or two, so a flood of idle sockets,
// however many addresses it comes from, is what gets closed, never the
// late gateway. Safe for concurrent use.
type Gate struct {
	max, perAddr int

	mu     sync.Mutex
	order  list.List          // Guarded by mu: *gateSlot, oldest first.
	byAddr map[netip.Addr]int // Guarded by mu: at most max entries.
}

type gateSlot struct {
	nc   net.Conn
	addr netip.Addr
	elem *list.Element // nil once released or evicted
}

// NewGate returns a Gate of max handshakes in all and perAddr from one IP
// address; a bound of zero or less is its default.
func NewGate(max, perAddr int) *Gate {
	if max <= 0 {
		max = DefaultMaxHandshakes
	}
	if perAddr <= 0 {
		perAddr = DefaultMaxHandshakesPerAddr
	}
	return &Gate{max: max, perAddr: perAddr, byAddr: make(map[netip.Addr]int)}
}

// Admit takes a slot for the handshake on nc, just accepted. When nc's
// address is over its bound, Admit closes nc and returns ok false and
// ShedAddr. Otherwise the handshake may run; shed is ShedOldest if another
// handshake's connection was closed to make room. The caller calls release
// once the handshake is over, whether it succeeded or not.
func (g *Gate) Admit(nc net.Conn) (release func(), shed Shed, ok bool) {
	addr := addrOf(nc.RemoteAddr())
	var evicted net.Conn
	g.mu.Lock()
	if g.byAddr[addr] >= g.perAddr {
		g.mu.Unlock()
		nc.Close()
		return nil, ShedAddr, false
	}
	if g.order.Len() >= g.max {
		oldest := g.order.Front().Value.(*gateSlot)
		g.removeLocked(oldest)
		evicted, shed = oldest.nc, ShedOldest
	}
	sl := &gateSlot{nc: nc, addr: addr}
	sl.elem = g.order.PushBack(sl)
	g.byAddr[addr]++
	g.mu.Unlock()
	if evicted != nil {
		evicted.Close() // its handshake fails; its release finds it gone
	}
	return func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		g.removeLocked(sl)
	}, shed, true
}

// InFlight returns the handshakes holding a slot.
func (g *Gate) InFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.order.Len()
}

func (g *Gate) removeLocked(sl *gateSlot) {
	if sl.elem == nil {
		return
	}
	g.order.Remove(sl.elem)
	sl.elem = nil
	if g.byAddr[sl.addr]--; g.byAddr[sl.addr] <= 0 {
		delete(g.byAddr, sl.addr)
	}
}

// addrOf returns a connection's IP address; the zero Addr (one bucket for
// all) for an address that is not TCP, such as a test's pipe.
func addrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}
