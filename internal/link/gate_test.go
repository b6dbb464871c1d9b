package link_test

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/imq-dev/imq/internal/link"
)

// gateConn is an accepted connection from addr that records its Close.
type gateConn struct {
	net.Conn
	addr   *net.TCPAddr
	closed atomic.Bool
}

func (c *gateConn) RemoteAddr() net.Addr { return c.addr }
func (c *gateConn) Close() error         { c.closed.Store(true); return nil }

func connFrom(ip string, port uint16) *gateConn {
	return &gateConn{addr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), port))}
}

// TestGate: one address holds at most perAddr slots (more are closed at
// once, whoever else is waiting); when every slot is taken the oldest
// handshake is closed to admit the new one; a released or evicted slot is
// free again, once.
func TestGate(t *testing.T) {
	g := link.NewGate(4, 2)
	var releases []func()
	var conns []*gateConn
	admit := func(c *gateConn, wantShed link.Shed, wantOK bool) {
		t.Helper()
		release, shed, ok := g.Admit(c)
		if shed != wantShed || ok != wantOK {
			t.Fatalf("Admit(%v) = %q, %v; want %q, %v", c.addr, shed, ok, wantShed, wantOK)
		}
		if ok {
			releases, conns = append(releases, release), append(conns, c)
		}
	}
	admit(connFrom("10.0.0.1", 1), "", true)
	admit(connFrom("10.0.0.1", 2), "", true)
	third := connFrom("10.0.0.1", 3)
	admit(third, link.ShedAddr, false)
	if !third.closed.Load() {
		t.Fatal("a connection over its address's bound was not closed")
	}
	// The IPv4-mapped form is the same address.
	admit(connFrom("::ffff:10.0.0.1", 4), link.ShedAddr, false)
	admit(connFrom("10.0.0.2", 1), "", true)
	admit(connFrom("10.0.0.3", 1), "", true)
	if g.InFlight() != 4 {
		t.Fatalf("in flight %d, want 4", g.InFlight())
	}
	// Full: a fifth address evicts the oldest (10.0.0.1:1).
	admit(connFrom("10.0.0.4", 1), link.ShedOldest, true)
	if !conns[0].closed.Load() || conns[1].closed.Load() {
		t.Fatal("the oldest handshake was not the one closed")
	}
	if g.InFlight() != 4 {
		t.Fatalf("in flight %d after an eviction, want 4", g.InFlight())
	}
	// The evicted handshake's release frees nothing more; 10.0.0.1 has one
	// slot again.
	releases[0]()
	if g.InFlight() != 4 {
		t.Fatalf("in flight %d after releasing an evicted slot, want 4", g.InFlight())
	}
	releases[1]()
	releases[1]()
	if g.InFlight() != 3 {
		t.Fatalf("in flight %d after a release (twice), want 3", g.InFlight())
	}
	admit(connFrom("10.0.0.1", 5), "", true)
	admit(connFrom("10.0.0.1", 6), link.ShedOldest, true)
	admit(connFrom("10.0.0.1", 7), link.ShedAddr, false)
}
