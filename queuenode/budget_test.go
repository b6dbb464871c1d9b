package queuenode

import (
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// fakeClock is a Config.Now that tests move by hand.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) add(d time.Duration) { c.ns.Add(int64(d)) }
func (s *Server) bytesForTest() int64    { return s.nodeBytes.Load() }
func refusedCount(t *testing.T, s *Server, reason string) float64 {
	t.Helper()
	return counterValue(t, s.m.refused.WithLabelValues(reason))
}

// hasHistory reports whether queue name is held and retains events.
func (s *Server) hasHistory(name string) bool {
	sh := s.shardFor(name)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	q := sh.queues[name]
	return q != nil && q.HistoryBytes() > 0
}

// checkAccounting fails t unless the node's totals are what its queues
// hold: bytes and history bytes. No write may be in flight.
func checkAccounting(t *testing.T, s *Server, what string) {
	t.Helper()
	var bytes, hist, events int64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			bytes += q.Bytes()
			hist += q.HistoryBytes()
			q.ForEachEvent(func(_ int64, b int) { events += int64(b) })
		}
		sh.mu.Unlock()
	}
	if got := s.nodeBytes.Load(); got != bytes {
		t.Fatalf("%s: the node counts %d bytes, its queues hold %d", what, got, bytes)
	}
	if got := s.historyBytes.Load(); got != hist || hist != events {
		t.Fatalf("%s: the node counts %d history bytes, its queues %d, their events %d", what, got, hist, events)
	}
}

// sumQueueBytes is the node's total recomputed from its queues.
func (s *Server) sumQueueBytes() int64 {
	var n int64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			n += q.Bytes()
		}
		sh.mu.Unlock()
	}
	return n
}

func userPublishBytes(user, queue string, n int) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: user, Session: "s-" + user, Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: "chat", Payload: make([]byte, n),
	}}}
}

// TestNodeBudget: the node's bytes never pass MaxNodeBytes; a write that
// does not fit evicts the oldest history across the node first (a resume
// past it reports missed), and when only state is left, new queues and
// writes are refused with LIMIT_EXCEEDED.
func TestNodeBudget(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	check := func(what string) {
		t.Helper()
		if b := s.bytesForTest(); b > cfg.MaxNodeBytes || b != s.sumQueueBytes() {
			t.Fatalf("%s: node bytes %d (queues hold %d), budget %d", what, b, s.sumQueueBytes(), cfg.MaxNodeBytes)
		}
	}

	// A subscriber keeps /keep alive through the evictions; its one event
	// is the node's oldest.
	joined := l.ok(joinReq("/keep", "s1", "chat")).GetJoined()
	l.ok(userPublishBytes("alice", "/keep", 60<<10))
	const n = 40 // 40 × 60 KiB: more than twice the budget
	for i := range n {
		clock.add(time.Second)
		l.ok(userPublishBytes("alice", fmt.Sprintf("/q/%d", i), 60<<10))
		check(fmt.Sprintf("publish %d", i))
	}
	// The oldest went first: the queues with history left are the newest
	// ones. The others stay, empty, until the idle sweep.
	first := -1
	for i := range n {
		name := fmt.Sprintf("/q/%d", i)
		if !s.hasQueue(name) {
			t.Fatalf("%s was dropped by the eviction", name)
		}
		if s.hasHistory(name) {
			if first < 0 {
				first = i
			}
		} else if first >= 0 {
			t.Fatalf("%s's history was evicted but the older /q/%d's was not", name, first)
		}
	}
	if first <= 0 || first > n-10 {
		t.Fatalf("the oldest queue with history left is /q/%d of %d", first, n)
	}
	h := l.ok(historyReq("/keep", "chat", 0, 0)).GetHistory()
	if len(h.GetEvents()) != 0 || !h.GetMissed() {
		t.Fatalf("/keep's history after the evictions: %v, want none and missed", h)
	}
	r := l.ok(&imqpb.NodeRequest{User: "u-s2", Session: "s2", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
		Queue: "/keep", Mounts: []*imqpb.MountSpec{resumeSpec("chat", joined.GetEpoch(), 0)},
	}}}).GetJoined()
	if !r.GetMounts()[0].GetMissed() {
		t.Fatal("a resume past evicted events did not report missed")
	}
	if e := counterValue(t, s.m.evictedEvents.WithLabelValues("node")); e < n/2 {
		t.Fatalf("%v events evicted for the node budget", e)
	}

	// State is never evicted: once it fills the budget, history goes and
	// then writes and new queues are refused.
	var refused *imqpb.NodeReply
	for i := 0; refused == nil; i++ {
		if i > 200 {
			t.Fatal("state writes never refused")
		}
		r := l.do(backendSetState(fmt.Sprintf("/s/%d", i/32), "st", fmt.Sprint(i), strings.Repeat("x", 16<<10), false))
		if r.GetCode() != imqpb.Code_OK {
			refused = r
		}
		check(fmt.Sprintf("state write %d", i))
	}
	if refused.GetCode() != imqpb.Code_LIMIT_EXCEEDED || !strings.Contains(refused.GetMessage(), "memory budget") {
		t.Fatalf("a state write past the budget: %v %q", refused.GetCode(), refused.GetMessage())
	}
	for i := range n {
		if s.hasHistory(fmt.Sprintf("/q/%d", i)) {
			t.Fatalf("/q/%d kept its history while state writes were refused", i)
		}
	}
	// Smaller writes to a queue that exists fill what is left.
	for i := 0; ; i++ {
		if i > 1000 {
			t.Fatal("small state writes never refused")
		}
		if r := l.do(backendSetState("/s/0", "st", fmt.Sprint("small", i), strings.Repeat("x", 64), false)); r.GetCode() != imqpb.Code_OK {
			break
		}
	}
	r2 := l.do(userPublishBytes("alice", "/new", 10))
	if r2.GetCode() != imqpb.Code_LIMIT_EXCEEDED || s.hasQueue("/new") {
		t.Fatalf("a new queue on a full node: %v %q", r2.GetCode(), r2.GetMessage())
	}
	if got := refusedCount(t, s, refusedNodeBytes); got < 2 {
		t.Fatalf("refusals counted %v", got)
	}
	check("at the end")
	// Freeing state makes room again.
	l.ok(backendSetState("/s/0", "st", "0", "", true))
	l.ok(userPublishBytes("alice", "/new", 10))
	check("after a delete")
	if v := s.varz().(Varz); v.Bytes != s.bytesForTest() || v.MaxBytes != cfg.MaxNodeBytes {
		t.Fatalf("/varz bytes %d of %d, want %d of %d", v.Bytes, v.MaxBytes, s.bytesForTest(), cfg.MaxNodeBytes)
	}
}

// TestQueueCreateRate: one user's requests may create MaxQueueCreates
// queues a minute (a token bucket); other users, the backend and queues
// that exist are not limited.
func TestQueueCreateRate(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxQueueCreates, cfg.IdleTTL, cfg.Now = 5, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for i := range 5 {
		var req *imqpb.NodeRequest
		switch i % 3 {
		case 0:
			req = userPublish("alice", fmt.Sprintf("/r/%d", i), "chat", `1`)
		case 1:
			req = userSetState("alice", fmt.Sprintf("/r/%d", i), "st", "alice", `1`, false)
		default:
			req = joinReq(fmt.Sprintf("/r/%d", i), "s-alice", "chat")
			req.User = "alice"
		}
		l.ok(req)
	}
	limited := func(queue string) {
		t.Helper()
		r := l.do(userPublish("alice", queue, "chat", `1`))
		if r.GetCode() != imqpb.Code_LIMIT_EXCEEDED || !strings.Contains(r.GetMessage(), "--max-queue-creates") || s.hasQueue(queue) {
			t.Fatalf("alice creating %s over her rate: %v %q", queue, r.GetCode(), r.GetMessage())
		}
	}
	limited("/r/5")
	join := joinReq("/r/6", "s-alice", "chat")
	join.User = "alice"
	if r := l.do(join); r.GetCode() != imqpb.Code_LIMIT_EXCEEDED {
		t.Fatalf("alice's join creating a queue over her rate: %v", r.GetCode())
	}
	l.ok(userPublish("alice", "/r/0", "chat", `2`)) // exists
	l.ok(userPublish("bob", "/r/bob", "chat", `1`))
	l.ok(backendPublish("/r/backend", "chat", `1`))
	clock.add(12 * time.Second) // one more token
	l.ok(userPublish("alice", "/r/7", "chat", `1`))
	limited("/r/8")
	clock.add(time.Minute)
	for i := range 5 {
		l.ok(userPublish("alice", fmt.Sprintf("/r/more/%d", i), "chat", `1`))
	}
	limited("/r/9")
	if got := refusedCount(t, s, refusedQueueCreates); got != 4 {
		t.Fatalf("refusals counted %v, want 4", got)
	}
	// The limiter forgets users whose bucket is full again.
	clock.add(2 * time.Minute)
	s.creates.sweep(clock.now())
	for i := range s.creates.shards {
		if n := len(s.creates.shards[i].users); n != 0 {
			t.Fatalf("the limiter still holds %d users", n)
		}
	}
}

// TestFloodBounded is the flood of issue 10: one user publishing 1,600
// messages of 60 KB, each into a fresh queue (96 MB), used to make the
// node hold all of it for the history TTL. With a budget of 8 MiB the
// node's count stays within it and so does its heap.
func TestFloodBounded(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.MaxQueueCreates = 8<<20, 10_000
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	before := heap()
	var peak int64
	for i := range 1600 {
		l.ok(userPublishBytes("flooder", fmt.Sprintf("/flood/%d", i), 60_000))
		peak = max(peak, s.bytesForTest())
	}
	after := heap()
	if peak > cfg.MaxNodeBytes {
		t.Fatalf("node bytes peaked at %d, over the budget %d", peak, cfg.MaxNodeBytes)
	}
	// 96 MB without the budget; the budget's 8 MiB plus slack for the
	// test's own garbage with it.
	if grew := int64(after) - int64(before); grew > 32<<20 {
		t.Fatalf("the heap grew by %d MiB during the flood", grew>>20)
	}
	t.Logf("heap in use %d MiB before, %d MiB after; node bytes %d (peak %d), %d queues",
		before>>20, after>>20, s.bytesForTest(), peak, s.queueCount.Load())

	// With the default limits the same user is stopped after 600 queues
	// (the clock stands still: no token refills, however slow the run).
	cfg2 := DefaultConfig()
	cfg2.Now = newFakeClock().now
	s2 := startNode(t, cfg2)
	l2 := dialLink(t, s2.LinkAddr(), "gw-1")
	for i := range 601 {
		r := l2.do(userPublishBytes("flooder", fmt.Sprintf("/flood/%d", i), 1000))
		if want := imqpb.Code_OK; i == 600 {
			if r.GetCode() != imqpb.Code_LIMIT_EXCEEDED {
				t.Fatalf("queue 601 of one user in a second: %v", r.GetCode())
			}
		} else if r.GetCode() != want {
			t.Fatalf("queue %d: %v %q", i, r.GetCode(), r.GetMessage())
		}
	}
}

// TestNodeBudgetConcurrent: links writing at once, into fresh and shared
// queues, while evictions run: the count never passes the budget, and
// when all is done it is exactly what the queues hold.
func TestNodeBudgetConcurrent(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MaxNodeBytes = 1 << 20
	s := startNode(t, cfg)
	var over atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 4 * 150 {
			if b := s.bytesForTest(); b > cfg.MaxNodeBytes {
				over.Store(b)
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	errs := make(chan string, 4)
	for g := range 4 {
		l := dialLink(t, s.LinkAddr(), fmt.Sprint("gw-", g))
		go func() {
			var bad string
			for i := range 150 {
				var r *imqpb.NodeReply
				switch i % 3 {
				case 0:
					r = l.do(userPublishBytes(fmt.Sprint("u", g), fmt.Sprintf("/c/%d/%d", g, i), 20<<10))
				case 1:
					r = l.do(userPublishBytes(fmt.Sprint("u", g), "/shared", 20<<10))
				default:
					r = l.do(backendSetState(fmt.Sprintf("/st/%d", i%5), "st", fmt.Sprint(g), "v", false))
				}
				if r.GetCode() != imqpb.Code_OK && bad == "" {
					bad = fmt.Sprintf("gw-%d request %d: %v %q", g, i, r.GetCode(), r.GetMessage())
				}
			}
			errs <- bad
		}()
	}
	for range 4 {
		if e := <-errs; e != "" {
			t.Error(e)
		}
	}
	<-done
	if b := over.Load(); b != 0 {
		t.Fatalf("node bytes reached %d, over the budget %d", b, cfg.MaxNodeBytes)
	}
	if b, sum := s.bytesForTest(), s.sumQueueBytes(); b != sum || b > cfg.MaxNodeBytes {
		t.Fatalf("node bytes %d, queues hold %d, budget %d", b, sum, cfg.MaxNodeBytes)
	}
}
