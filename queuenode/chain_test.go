package queuenode

import (
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// blockingBackend is a backend whose call-outs for hook wait until release
// is called (or the node gives up on them); other call-outs are allowed at
// once.
func blockingBackend(t *testing.T, hook string) (b *fakeBackend, release func()) {
	t.Helper()
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	b = newBackend(t, func(r *http.Request, c backendCall) (int, string) {
		if c.Hook == hook {
			select {
			case <-ch:
			case <-r.Context().Done():
			}
		}
		return 200, `{"allow": true}`
	})
	return b, release
}

// sessionReq is req made by user bob in session s-bob, the session of
// userPublish("bob", ...).
func sessionReq(req *imqpb.NodeRequest) *imqpb.NodeRequest {
	req.User, req.Session = "bob", "s-bob"
	return req
}

// TestChainDeadline: a request whose turn in its chain comes after the
// deadline its gateway set is answered TIMEOUT, without asking the backend
// and without running, so that a client retrying the gateway's TIMEOUT does
// not publish twice. Leaves run whatever their deadline; requests that wait
// for no call-out are not checked.
func TestChainDeadline(t *testing.T) {
	var clock atomic.Int64 // the node's clock, Unix ms
	clock.Store(time.Now().UnixMilli())
	b, release := blockingBackend(t, "join")
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.Now = func() time.Time { return time.UnixMilli(clock.Load()) }
		c.CalloutTimeout = waitFor
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	withDeadline := func(req *imqpb.NodeRequest, ms int64) *imqpb.NodeRequest {
		req.DeadlineMs = ms
		return req
	}

	// The join's call-out starts before the deadline; the requests behind
	// it wait, and their turn comes after it.
	deadline := clock.Load() + 1000
	join := l.send(withDeadline(sessionReq(joinReq("/room/1", "", "chat")), deadline))
	testutil.WaitFor(t, waitFor, "the join call-out", func() bool { return b.cur.Load() == 1 })
	pub := l.send(withDeadline(userPublish("bob", "/room/1", "chat", `"late"`), deadline))
	st := sessionReq(setStateReq("/room/1", "state", "k"))
	set := l.send(withDeadline(st, deadline))
	leave := l.send(withDeadline(sessionReq(leaveReq("/room/1", "")), deadline))
	l.sync() // the node has taken them all
	clock.Add(2000)
	release()

	if r := l.await(join); r.GetCode() != imqpb.Code_OK {
		t.Fatalf("join whose call-out started in time: %v %q", r.GetCode(), r.GetMessage())
	}
	for _, id := range []uint64{pub, set} {
		if r := l.await(id); r.GetCode() != imqpb.Code_TIMEOUT || r.GetMessage() != errExpired.Message {
			t.Fatalf("request %d whose turn came after its deadline: %v %q, want TIMEOUT %q", id, r.GetCode(), r.GetMessage(), errExpired.Message)
		}
	}
	if r := l.await(leave); r.GetCode() != imqpb.Code_OK {
		t.Fatalf("leave past its deadline: %v %q, want it applied", r.GetCode(), r.GetMessage())
	}
	if n := len(b.callsTo("publish")); n != 0 {
		t.Fatalf("the backend was asked about %d expired publishes", n)
	}
	if p, c := counterValue(t, s.m.published), counterValue(t, s.m.stateChanges); p != 0 || c != 0 {
		t.Fatalf("expired requests ran: %v publishes, %v state changes", p, c)
	}

	// Expired on arrival, with no chain waiting: not run either.
	now := clock.Load()
	if r := l.do(withDeadline(userPublish("bob", "/room/2", "chat", `1`), now-1)); r.GetCode() != imqpb.Code_TIMEOUT {
		t.Fatalf("expired publish: %v %q, want TIMEOUT", r.GetCode(), r.GetMessage())
	}
	if got := counterValue(t, s.m.chainedRefused.WithLabelValues(refusedExpired)); got != 3 {
		t.Fatalf("expired requests counted %v, want 3", got)
	}
	// In time (the deadline's own millisecond included), with a call-out;
	// past it, without one (another queue; a backend request): all run.
	l.ok(withDeadline(userPublish("bob", "/room/2", "chat", `2`), now))
	l.ok(withDeadline(userPublish("bob", "/lobby/1", "chat", `3`), now-1))
	l.ok(withDeadline(backendPublish("/room/2", "chat", `4`), now-1))
	if n := len(b.callsTo("publish")); n != 1 {
		t.Fatalf("%d publish call-outs, want 1 (the one in time)", n)
	}
}

// TestChainBound: one session may have maxChainedPerChain requests waiting
// on one queue; more are answered LIMIT_EXCEEDED, but not its leaves, and
// not other sessions' requests nor its own on other queues.
func TestChainBound(t *testing.T) {
	b, release := blockingBackend(t, "join")
	s := startCalloutNode(t, b.srv.URL, func(c *Config) { c.CalloutTimeout = waitFor })
	l := dialLink(t, s.LinkAddr(), "gw-1")

	ids := []uint64{l.send(sessionReq(joinReq("/room/1", "", "chat")))}
	testutil.WaitFor(t, waitFor, "the join call-out", func() bool { return b.cur.Load() == 1 })
	for i := range maxChainedPerChain - 1 {
		ids = append(ids, l.send(userPublish("bob", "/room/1", "chat", `"`+string(rune('a'+i%26))+`"`)))
	}
	for _, req := range []*imqpb.NodeRequest{
		userPublish("bob", "/room/1", "chat", `"one too many"`),
		sessionReq(setStateReq("/room/1", "state", "k")),
	} {
		if r := l.do(req); r.GetCode() != imqpb.Code_LIMIT_EXCEEDED || r.GetMessage() != errChainFull.Message {
			t.Fatalf("request beyond the chain's bound: %v %q, want LIMIT_EXCEEDED %q", r.GetCode(), r.GetMessage(), errChainFull.Message)
		}
	}
	leave := l.send(sessionReq(leaveReq("/room/1", "")))
	// Other sessions on the queue, and this session on other queues, go on.
	l.ok(userPublish("alice", "/room/1", "chat", `"other session"`))
	l.ok(userPublish("bob", "/room/2", "chat", `"other queue"`))

	release()
	for _, id := range ids {
		if r := l.await(id); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("request %d within the chain's bound: %v %q", id, r.GetCode(), r.GetMessage())
		}
	}
	if r := l.await(leave); r.GetCode() != imqpb.Code_OK {
		t.Fatalf("leave beyond the chain's bound: %v %q, want it taken and applied", r.GetCode(), r.GetMessage())
	}
	if got := counterValue(t, s.m.chainedRefused.WithLabelValues(refusedChain)); got != 2 {
		t.Fatalf("requests refused by the chain's bound counted %v, want 2", got)
	}
	testutil.WaitFor(t, waitFor, "chains forgotten", func() bool {
		for _, l := range s.linksForTest() {
			l.chainMu.Lock()
			n, c := len(l.chains), l.chained
			l.chainMu.Unlock()
			if n != 0 || c != 0 {
				return false
			}
		}
		return true
	})
	// The bound is on what waits, not on what a chain ever ran.
	for range 3 {
		l.ok(userPublish("bob", "/room/1", "chat", `"again"`))
	}
}
