package gateway

import (
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
	p := newPendingPool(3, 2)
	for i, want := range []string{"", "", refusedPendingIP} {
		if got := p.acquire(a); got != want {
			t.Fatalf("acquire %d from a: %q, want %q", i+1, got, want)
		}
	}
	if got := p.acquire(b); got != "" {
		t.Fatalf("b refused: %q", got)
	}
	if got := p.acquire(b); got != refusedPending {
		t.Fatalf("past the total: %q, want %q", got, refusedPending)
	}
	p.release(a)
	if got := p.acquire(b); got != "" {
		t.Fatalf("after a release: %q", got)
	}
	p.release(a)
	p.release(b)
	p.release(b)
	if p.count() != 0 || len(p.bySrc) != 0 {
		t.Fatalf("count %d, %d sources after releasing all", p.count(), len(p.bySrc))
	}
	off := newPendingPool(2, -1)
	for i, want := range []string{"", "", refusedPending} {
		if got := off.acquire(a); got != want {
			t.Fatalf("no per-source cap, acquire %d: %q, want %q", i+1, got, want)
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
		a.failed(src, now)
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
	if ok, _ := newAuthLimiter(-1).allowed(src, now); !ok {
		t.Fatal("a negative limit refused")
	}

	// The map stays bounded whatever the number of sources.
	a = newAuthLimiter(1)
	for i := range maxAuthSources + 100 {
		var b [16]byte
		b[0], b[1], b[2], b[3] = 0x20, 0x01, byte(i>>8), byte(i)
		b[4] = byte(i >> 16)
		a.failed(netip.PrefixFrom(netip.AddrFrom16(b), 64), now)
	}
	if n := len(a.buckets); n > maxAuthSources {
		t.Fatalf("%d sources remembered, bound %d", n, maxAuthSources)
	}
}
