package gateway

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestSourceKey(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1:5000", "127.0.0.1/32"},
		{"[::ffff:10.0.0.7]:80", "10.0.0.7/32"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::1]:443", "2001:db8:1:2::/64"}, // the same /64
	} {
		a, err := net.ResolveTCPAddr("tcp", tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := sourceKey(a); got != netip.MustParsePrefix(tc.want) {
			t.Errorf("sourceKey(%s) = %s, want %s", tc.addr, got, tc.want)
		}
	}
}

func TestPendingPool(t *testing.T) {
	a, b := netip.MustParsePrefix("10.0.0.1/32"), netip.MustParsePrefix("10.0.0.2/32")
	conn := func(src netip.Prefix) *countedConn { return &countedConn{src: src} }
	acquire := func(p *pendingPool, c *countedConn, idle bool) (string, *countedConn) {
		t.Helper()
		return p.acquire(c, idle)
	}
	p := newPendingPool(3, 2)
	a1, a2, a3 := conn(a), conn(a), conn(a)
	for i, c := range []*countedConn{a1, a2} {
		if got, v := acquire(p, c, false); got != "" || v != nil {
			t.Fatalf("acquire %d from a: %q, %v", i+1, got, v)
		}
	}
	if got, _ := acquire(p, a3, false); got != refusedPendingIP {
		t.Fatalf("past the per-source cap: %q, want %q", got, refusedPendingIP)
	}
	if got, _ := acquire(p, a1, false); got != "" || p.count() != 2 {
		t.Fatalf("acquiring a pending connection again: %q, count %d", got, p.count())
	}
	b1, b2, b3 := conn(b), conn(b), conn(b)
	if got, v := acquire(p, b1, false); got != "" || v != nil {
		t.Fatalf("b refused: %q, %v", got, v)
	}
	// Full: a newcomer evicts the oldest, a1...
	if got, v := acquire(p, b2, false); got != "" || v != a1 {
		t.Fatalf("past the total: %q, victim %v; want the oldest evicted", got, v)
	}
	// ...but an idle connection goes before any older fresh one.
	p.release(b1, false)
	if got, v := acquire(p, b1, true); got != "" || v != nil {
		t.Fatalf("b1 idle: %q, %v", got, v)
	}
	if got, v := acquire(p, b3, false); got != refusedPendingIP || v != nil {
		t.Fatalf("b3: %q, %v; want the per-source cap first", got, v)
	}
	c1 := conn(netip.MustParsePrefix("10.0.0.3/32"))
	if got, v := acquire(p, c1, false); got != "" || v != b1 {
		t.Fatalf("with an idle one pending: %q, victim %v; want the idle one", got, v)
	}
	// A newly idle connection evicts only an idle one.
	p.release(c1, false)
	p.acquire(c1, false) // pending: a2, b2, c1, all fresh
	if got, v := acquire(p, conn(netip.MustParsePrefix("10.0.0.4/32")), true); got != refusedPending || v != nil {
		t.Fatalf("idle newcomer with no idle one to evict: %q, %v", got, v)
	}
	// A pending connection going idle moves among the first to go.
	p.acquire(b2, true)
	if got, v := acquire(p, conn(netip.MustParsePrefix("10.0.0.5/32")), false); got != "" || v != b2 {
		t.Fatalf("victim %v, want b2 (idle)", v)
	}
	// An idle one that starts another request (an upgrade, an RPC call on
	// a reused connection) is fresh again, not the first to go.
	p.acquire(c1, true) // pending: a2, c1 (idle), and the 10.0.0.5 newcomer
	p.activate(c1)
	if got, v := acquire(p, conn(netip.MustParsePrefix("10.0.0.6/32")), false); got != "" || v != a2 {
		t.Fatalf("victim %v, want a2 (the oldest; c1 is active again)", v)
	}
	if c1.elem == nil || c1.idle {
		t.Fatal("c1 is no longer pending, or still idle")
	}
	// A closed connection is never pending again.
	p.release(a2, true)
	if got, v := acquire(p, a2, false); got != "" || v != nil || a2.elem != nil {
		t.Fatalf("closed connection pended: %q %v", got, v)
	}
	p.release(c1, true)
	for e := p.fresh.Front(); e != nil; e = p.fresh.Front() {
		p.release(e.Value.(*countedConn), true)
	}
	if p.count() != 0 || len(p.bySrc) != 0 || p.idle.Len() != 0 {
		t.Fatalf("count %d, %d sources after releasing all", p.count(), len(p.bySrc))
	}
	off := newPendingPool(2, -1)
	for i := range 3 {
		if got, _ := acquire(off, conn(a), false); got != "" {
			t.Fatalf("no per-source cap, acquire %d: %q", i+1, got)
		}
	}
}

func TestAuthLimiter(t *testing.T) {
	src := netip.MustParsePrefix("10.0.0.1/32")
	now := time.Unix(1000, 0)
	a := newAuthLimiter(6) // one failure back every 10 s
	for i := range 6 {
		if ok, _ := a.allowed(src, now); !ok {
			t.Fatalf("refused after %d failures of 6", i)
		}
		a.charge(src, now)
	}
	ok, wait := a.allowed(src, now)
	if ok || wait != 10*time.Second {
		t.Fatalf("after 6 failures: allowed %v, wait %s; want refused for 10s", ok, wait)
	}
	if ok, _ := a.allowed(netip.MustParsePrefix("10.0.0.2/32"), now); !ok {
		t.Fatal("another source refused")
	}
	if ok, _ := a.allowed(src, now.Add(10*time.Second)); !ok {
		t.Fatal("still refused after the refill time")
	}
	now = now.Add(10 * time.Second)
	a.charge(src, now)
	// Checks that started together on the last token and failed push the
	// wait out: three more, 40 s...
	for range 3 {
		a.charge(src, now)
	}
	if ok, wait := a.allowed(src, now); ok || wait != 40*time.Second {
		t.Fatalf("after 3 failures past the budget: allowed %v, wait %s; want 40s", ok, wait)
	}
	// ...but no further than the floor, -perMinute.
	for range 100 {
		a.charge(src, now)
	}
	if _, wait := a.allowed(src, now); wait != 70*time.Second {
		t.Fatalf("wait %s at the floor, want 70s (1 - (-6) tokens at 6/min)", wait)
	}
	// Only failures are remembered: a check that passes costs nothing.
	other := netip.MustParsePrefix("10.0.0.3/32")
	if ok, _ := a.allowed(other, now); !ok || a.sources() != 1 {
		t.Fatalf("allowed %v, %d sources remembered; want 1 (allowed spends nothing)", ok, a.sources())
	}
	neg := newAuthLimiter(-1)
	for range 10 {
		neg.charge(src, now)
	}
	if ok, _ := neg.allowed(src, now); !ok {
		t.Fatal("a negative limit refused")
	}
	// A source not seen for authForget is forgotten (it would be full).
	a.charge(other, now.Add(authForget))
	a.charge(other, now.Add(2*authForget))
	if a.sources() != 1 {
		t.Fatalf("%d sources remembered after two generations, want 1", a.sources())
	}
}

func authSource(i uint32) netip.Prefix {
	var b [16]byte
	b[0], b[1] = 0x20, 0x01
	binary.BigEndian.PutUint32(b[4:], i)
	p, _ := netip.AddrFrom16(b).Prefix(64)
	return p
}

// TestAuthLimiterBoundedAndCheap: however many sources fail, the limiter
// remembers at most two generations, and forgetting one costs no scan: a
// failure from a new source with the limiter full takes about what one
// with it empty does (a full scan of 65,536 entries took about 2.6 ms).
func TestAuthLimiterBoundedAndCheap(t *testing.T) {
	a := newAuthLimiter(60)
	now := time.Now()
	for i := range uint32(maxAuthSources) {
		a.charge(authSource(i), now)
	}
	const n = 2000
	start := time.Now()
	for i := range uint32(n) {
		a.charge(authSource(maxAuthSources+i), now.Add(time.Millisecond))
	}
	per := time.Since(start) / n
	if per > 100*time.Microsecond {
		t.Fatalf("a failure from a new source with the limiter full costs %s", per)
	}
	if got := a.sources(); got > 2*maxAuthSources {
		t.Fatalf("%d sources remembered, bound %d", got, 2*maxAuthSources)
	}
	// A source from the older generation keeps its spent budget.
	src := authSource(0)
	for range 59 {
		a.charge(src, now.Add(time.Millisecond))
	}
	if ok, _ := a.allowed(src, now.Add(time.Millisecond)); ok {
		t.Fatal("a source that spent its budget is allowed")
	}
}
