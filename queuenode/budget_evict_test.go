package queuenode

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// fillWithState writes 4 KiB state values as the backend, the i-th in
// queue queueOf(i), until the node refuses one; it returns how many it
// wrote.
func fillWithState(t *testing.T, l *testLink, queueOf func(i int) string) int {
	t.Helper()
	for i := 0; ; i++ {
		if i > 100_000 {
			t.Fatal("state writes never refused")
		}
		r := l.do(backendSetState(queueOf(i), "st", fmt.Sprint(i), strings.Repeat("x", 4<<10), false))
		if r.GetCode() == imqpb.Code_LIMIT_EXCEEDED {
			return i
		}
		if r.GetCode() != imqpb.Code_OK {
			t.Fatalf("state write %d: %v %q", i, r.GetCode(), r.GetMessage())
		}
	}
}

// TestBudgetRefusesWithoutWalking: once state fills the budget, a write
// that does not fit is refused at once, without walking the node's queues
// (which, with tens of thousands of queues, stalled every client of the
// gateway link for tens of milliseconds per refused write). An eviction
// run that leaves the write still not fitting makes the node refuse
// writes that need eviction without walking for evictRest.
func TestBudgetRefusesWithoutWalking(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(userPublishBytes("alice", "/h", 60<<10)) // some history, evicted by the state
	fillWithState(t, l, func(i int) string { return fmt.Sprint("/s/", i) })
	if s.historyBytes.Load() != 0 {
		t.Fatalf("history left after state filled the node: %d bytes", s.historyBytes.Load())
	}
	runs, refused := counterValue(t, s.m.evictionRuns), refusedCount(t, s, refusedNodeBytes)
	for range 50 {
		if r := l.do(userPublishBytes("alice", "/s/1", 10<<10)); r.GetCode() != imqpb.Code_LIMIT_EXCEEDED {
			t.Fatalf("a publish on a node full of state: %v %q", r.GetCode(), r.GetMessage())
		}
	}
	if got := counterValue(t, s.m.evictionRuns) - runs; got != 0 {
		t.Fatalf("50 refused writes with no history to evict ran %v evictions", got)
	}
	if got := refusedCount(t, s, refusedNodeBytes) - refused; got != 50 {
		t.Fatalf("refusals counted %v, want 50", got)
	}
	checkAccounting(t, s, "after the refusals")

	// A count that says history could make room when the queues hold none
	// (what a bug or a race would do): one walk, then rest.
	s.historyBytes.Add(1 << 20)
	for range 5 {
		l.do(userPublishBytes("alice", "/s/1", 10<<10))
	}
	if got := counterValue(t, s.m.evictionRuns) - runs; got != 1 {
		t.Fatalf("5 writes after a futile eviction ran %v evictions, want 1", got)
	}
	if got := counterValue(t, s.m.evictionsFutile); got != 1 {
		t.Fatalf("futile evictions counted %v, want 1", got)
	}
	clock.add(evictRest)
	l.do(userPublishBytes("alice", "/s/1", 10<<10))
	if got := counterValue(t, s.m.evictionRuns) - runs; got != 2 {
		t.Fatalf("after the rest %v evictions ran, want 2", got)
	}
	s.historyBytes.Add(-1 << 20)
}

// TestBudgetForeignQueue: a write for a queue this node does not own is
// answered MOVED (which the gateway retries on the owner) without taking
// any of the budget: it evicts no history on a nearly full node, and it is
// not refused LIMIT_EXCEEDED on a full one.
func TestBudgetForeignQueue(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member = "a", testMemberConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL = 1<<20, time.Hour
	s := startNode(t, cfg)
	_, v2, _ := twoNodeTables(t)
	s.setTable(v2)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	mine := queuesWhere(t, 2, func(q string) bool { return owner(v2, q) == "a" })
	theirs := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "b" })[0]
	foreign := []*imqpb.NodeRequest{
		userPublishBytes("alice", theirs, 60<<10),
		userSetState("alice", theirs, "st", "alice", strings.Repeat("1", 16<<10), false),
		joinReq(theirs, "s9", "chat"),
	}
	moved := func(what string) {
		t.Helper()
		for _, req := range foreign {
			if r := l.do(req); r.GetCode() != imqpb.Code_MOVED {
				t.Fatalf("%s: %T for a queue of node b: %v %q, want MOVED", what, req.GetOp(), r.GetCode(), r.GetMessage())
			}
		}
	}

	// History fills the budget to within one write of the top.
	for s.bytesForTest() < cfg.MaxNodeBytes-40<<10 {
		l.ok(userPublishBytes("alice", mine[0], 60<<10))
	}
	runs, hist := counterValue(t, s.m.evictionRuns), s.historyBytes.Load()
	moved("history near the budget")
	if got := counterValue(t, s.m.evictionRuns); got != runs || s.historyBytes.Load() != hist {
		t.Fatalf("writes for another node's queue ran %v evictions, history %d -> %d bytes", got-runs, hist, s.historyBytes.Load())
	}

	// State fills the budget.
	fillWithState(t, l, func(int) string { return mine[1] })
	moved("a full budget")
	checkAccounting(t, s, "at the end")
}

// TestBudgetEvictsWhatTheWriteNeeds: when state holds more than 7/8 of
// the budget, a write that does not fit evicts the oldest history it needs
// (plus 1/64 of the budget), not all of the node's history.
func TestBudgetEvictsWhatTheWriteNeeds(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for i := 0; s.bytesForTest() < cfg.MaxNodeBytes*9/10; i++ {
		l.ok(backendSetState(fmt.Sprintf("/s/%d", i/32), "st", fmt.Sprint(i), strings.Repeat("x", 4<<10), false))
	}
	const event int64 = 2000 + int64(len("alice")) + entryOverhead
	for i := 0; counterValue(t, s.m.evictionRuns) == 0; i++ {
		if i > 1000 {
			t.Fatal("no eviction")
		}
		clock.add(time.Second)
		hist := s.historyBytes.Load()
		l.ok(userPublishBytes("alice", fmt.Sprintf("/h/%d", i%20), 2000))
		if counterValue(t, s.m.evictionRuns) > 0 {
			evicted := hist + event - s.historyBytes.Load()
			if most := cfg.MaxNodeBytes/evictSlackDiv + 2*event; evicted > most || evicted < event {
				t.Fatalf("one write of %d bytes evicted %d of %d history bytes; want at least %d, at most %d", event, evicted, hist, event, most)
			}
		}
	}
	checkAccounting(t, s, "after the eviction")
}

// TestBudgetEvictionKeepsQueues: a queue whose history the budget evicted
// stays (empty) until the idle sweep, so that a subscriber that had seen
// up to its head and rejoins resumes without missed; the sweep drops it.
func TestBudgetEvictionKeepsQueues(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	j := l.ok(joinReq("/keep", "s1", "chat")).GetJoined()
	head := l.ok(userPublishBytes("alice", "/keep", 1000)).GetPublished().GetOffset()
	l.ok(leaveReq("/keep", "s1"))
	for i := 0; s.hasHistory("/keep"); i++ {
		if i > 100 {
			t.Fatal("/keep's history never evicted")
		}
		clock.add(time.Second)
		l.ok(userPublishBytes("bob", fmt.Sprintf("/q/%d", i), 60<<10))
	}
	if !s.hasQueue("/keep") {
		t.Fatal("the eviction dropped /keep")
	}
	r := l.ok(&imqpb.NodeRequest{User: "u-s1", Session: "s1", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
		Queue: "/keep", Mounts: []*imqpb.MountSpec{resumeSpec("chat", j.GetEpoch(), head)},
	}}}).GetJoined()
	if r.GetEpoch() != j.GetEpoch() || r.GetMounts()[0].GetMissed() {
		t.Fatalf("resume from the head %d: epoch %d -> %d, missed %v; nothing after it was evicted", head, j.GetEpoch(), r.GetEpoch(), r.GetMounts()[0].GetMissed())
	}
	// A resume from before the evicted event still reports missed.
	r = l.ok(&imqpb.NodeRequest{User: "u-s2", Session: "s2", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
		Queue: "/keep", Mounts: []*imqpb.MountSpec{resumeSpec("chat", j.GetEpoch(), head-1)},
	}}}).GetJoined()
	if !r.GetMounts()[0].GetMissed() {
		t.Fatal("a resume from before an evicted event did not report missed")
	}
	clock.add(2 * time.Hour)
	s.sweep()
	if s.hasQueue("/q/0") {
		t.Fatal("the idle sweep kept an emptied queue")
	}
	checkAccounting(t, s, "after the sweep")
}

// TestBudgetEvictsPartOfASlice: events of one slice of time count as
// equally old; an eviction that ends within a slice evicts only the bytes
// it needs from it, not the whole slice.
func TestBudgetEvictsPartOfASlice(t *testing.T) {
	clock := newFakeClock() // never moves: every event is in one slice
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, time.Hour, clock.now
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for i := 0; counterValue(t, s.m.evictionRuns) == 0; i++ {
		if i > 1000 {
			t.Fatal("no eviction")
		}
		l.ok(userPublishBytes("alice", fmt.Sprintf("/h/%d", i%50), 10<<10))
	}
	// Down to 7/8 of the budget: an eighth, less the queues' overhead,
	// was evicted, give or take one event.
	low := cfg.MaxNodeBytes - cfg.MaxNodeBytes/8
	if b := s.bytesForTest(); b < low-(10<<10+100) || b > low+(10<<10+100) {
		t.Fatalf("after the eviction the node holds %d bytes, want about %d", b, low)
	}
	checkAccounting(t, s, "after the eviction")
}

// TestBudgetAgeSlicesBounded: with events spread over a long time (a long
// --history-age, or none), the walk that sorts them by age holds at most
// maxAgeBuckets slices, coarser ones, and still evicts the oldest first.
func TestBudgetAgeSlicesBounded(t *testing.T) {
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 1<<20, 100*time.Hour, clock.now
	cfg.Limits.HistoryAge = 0
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	const queues, perQueue = 20, 256 // 5,120 events, one per second
	for i := range queues * perQueue {
		clock.add(time.Second)
		l.ok(userPublishBytes("alice", fmt.Sprintf("/a/%d", i/perQueue), 160))
	}
	if counterValue(t, s.m.evictionRuns) != 0 {
		t.Fatal("evicted while filling")
	}
	ages, shift := s.retainedByAge()
	var sum int64
	for _, b := range ages {
		sum += b
	}
	if len(ages) > maxAgeBuckets || shift == 0 || sum != s.historyBytes.Load() {
		t.Fatalf("%d slices (shift %d) holding %d bytes; want at most %d, coarser, holding %d", len(ages), shift, sum, maxAgeBuckets, s.historyBytes.Load())
	}
	l.ok(userPublishBytes("alice", "/big", 60<<10))
	if counterValue(t, s.m.evictionRuns) != 1 {
		t.Fatal("the big write did not evict")
	}
	if s.hasHistory("/a/0") || !s.hasHistory(fmt.Sprintf("/a/%d", queues-1)) {
		t.Fatalf("not the oldest first: /a/0 has history %v, /a/%d %v", s.hasHistory("/a/0"), queues-1, s.hasHistory(fmt.Sprintf("/a/%d", queues-1)))
	}
	checkAccounting(t, s, "after the eviction")
}

// TestLockWithRoomRechecks: a write whose reservation needed an eviction
// (the shard unlocked meanwhile) reserves again what it needs once it
// holds the lock again, when that grew (its queue went away meanwhile).
func TestLockWithRoomRechecks(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL = 1<<20, time.Hour
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for i := 0; s.bytesForTest() < cfg.MaxNodeBytes-30<<10; i++ {
		l.ok(userPublishBytes("alice", fmt.Sprintf("/h/%d", i), 60<<10))
	}
	sh := s.shardFor("/x")
	calls := 0
	reserved, err := s.lockWithRoom(sh, "/x", func() int64 {
		calls++
		if calls == 1 {
			return 40 << 10
		}
		return 50 << 10
	})
	sh.mu.Unlock()
	inFlight := s.bytesForTest() - s.sumQueueBytes()
	s.settleLocked(nil, reserved)
	if err != nil || calls != 2 || reserved != 50<<10 || inFlight != 50<<10 {
		t.Fatalf("lockWithRoom: %v, need asked %d times, reserved %d, counted %d; want 2 times, %d", err, calls, reserved, inFlight, 50<<10)
	}
	checkAccounting(t, s, "after settling")
}

// TestBudgetAccounting: the node's counts of bytes and history bytes stay
// what its queues hold along every path that changes them.
func TestBudgetAccounting(t *testing.T) {
	b := newBackend(t, func(_ *http.Request, c backendCall) (int, string) {
		if c.Hook == "join" {
			return 200, `{"allow": true, "state": {"seeded": {"a": 1, "b": "two"}}}`
		}
		return 200, `{"allow": true}`
	})
	clock := newFakeClock()
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member = "a", testMemberConfig()
	cfg.MaxNodeBytes, cfg.IdleTTL, cfg.Now = 4<<20, time.Minute, clock.now
	cfg.Limits.HistoryAge = 10 * time.Second
	cfg.Callouts = []Callout{{Prefix: "/room/", URL: b.srv.URL + "/imq"}}
	s := startNode(t, cfg)
	v1, v2, _ := twoNodeTables(t)
	s.setTable(v1)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	check := func(what string) { t.Helper(); checkAccounting(t, s, what) }
	moving := queuesWhere(t, 2, func(q string) bool { return owner(v2, q) == "b" })

	l.ok(joinReq("/a", "s1", "chat"))
	l.ok(userPublishBytes("alice", "/a", 500))
	l.ok(leaveReq("/a", "s1"))
	check("join, publish, leave")
	for _, v := range []string{"123456", "1", "1234567890", ""} {
		l.ok(backendSetState("/b", "st", "k", v, false))
		check("overwrite with " + v)
	}
	l.ok(backendSetState("/b", "st", "k", "", true))
	check("delete")
	bad := joinReq("/c", "s2", "chat")
	bad.GetJoin().Mounts = append(bad.GetJoin().Mounts, bad.GetJoin().Mounts[0])
	if r := l.do(bad); r.GetCode() == imqpb.Code_OK || !s.hasQueue("/c") {
		t.Fatalf("a join naming a mount twice: %v, queue kept %v", r.GetCode(), s.hasQueue("/c"))
	}
	check("failed join after creating its queue")
	badPub := userPublishBytes("alice", "/d", 1)
	badPub.GetPublish().Mount = ""
	if r := l.do(badPub); r.GetCode() == imqpb.Code_OK || !s.hasQueue("/d") {
		t.Fatalf("a publish to mount \"\": %v, queue kept %v", r.GetCode(), s.hasQueue("/d"))
	}
	check("failed publish after creating its queue")
	l.ok(backendSetState("/e", "st", "k", "1", false))
	l.do(userPublish("alice", "/e", "st", "1"))
	check("publish to a state mount")

	// Join seeds from the call-out, into a queue that then moves away.
	join := joinReq(moving[0], "s3", "chat")
	join.GetJoin().Mounts = append(join.GetJoin().Mounts, stateSpec("seeded"))
	if st := l.ok(join).GetJoined().GetMounts()[1].GetState(); len(st) != 2 {
		t.Fatalf("seeded state %v", st)
	}
	l.ok(userPublishBytes("alice", moving[0], 700))
	l.ok(userPublishBytes("alice", moving[1], 700))
	check("join seeds")

	// Age expiry by a read, and by the sweep of a queue that stays.
	l.ok(joinReq("/f", "s4", "chat"))
	l.ok(userPublishBytes("alice", "/f", 500))
	l.ok(userPublishBytes("alice", "/g", 500))
	clock.add(20 * time.Second)
	if h := l.ok(historyReq("/g", "chat", 0, 0)).GetHistory(); len(h.GetEvents()) != 0 {
		t.Fatalf("aged history read: %v", h)
	}
	check("age expiry by a read")
	s.sweep()
	if !s.hasQueue("/f") || s.hasHistory("/f") {
		t.Fatal("the sweep did not age out /f's history, or dropped it")
	}
	check("age expiry by the sweep")

	l.ok(userPublishBytes("alice", moving[1], 700)) // history that leaves with its queue
	s.setTable(v2)
	if s.hasQueue(moving[0]) || s.hasQueue(moving[1]) {
		t.Fatal("queues whose bucket moved are still held")
	}
	check("bucket moved away")

	clock.add(2 * time.Minute)
	s.sweep()
	if s.hasQueue("/a") || s.hasQueue("/b") {
		t.Fatal("idle queues not dropped")
	}
	check("idle sweep")
}

// TestJoinSeedSkipped: a join call-out's seed that the budget has no room
// for is skipped (seeds never evict), counted, and warned of at most once
// per seedWarnEvery; the join succeeds.
func TestJoinSeedSkipped(t *testing.T) {
	big := strings.Repeat("x", 12<<10)
	b := newBackend(t, func(_ *http.Request, c backendCall) (int, string) {
		return 200, `{"allow": true, "state": {"seeded": {"big": "` + big + `"}}}`
	})
	logger, logs := testutil.CaptureLogs(slog.LevelWarn)
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.MaxNodeBytes, c.IdleTTL = 1<<20, time.Hour
		c.Logger = logger
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	fillWithState(t, l, func(i int) string { return fmt.Sprint("/s/", i) })
	for i := range 3 {
		join := joinReq("/s/0", fmt.Sprint("s", i), "chat")
		join.GetJoin().Queue = "/room/s/0" // under the call-out's prefix, as /s/0's room
		r := l.do(join)
		if r.GetCode() == imqpb.Code_OK && len(r.GetJoined().GetMounts()) != 1 {
			t.Fatalf("join %d: %v", i, r.GetJoined())
		}
	}
	got := counterValue(t, s.m.seedsSkipped.WithLabelValues(seedSkippedBytes))
	warned := strings.Count(logs.String(), "join call-out state seed skipped")
	if got < 1 || warned != 1 {
		t.Fatalf("seeds skipped counted %v, warned %d times; want at least 1, warned once:\n%s", got, warned, logs.String())
	}
	checkAccounting(t, s, "after the joins")
}

// TestQueueCreateLimiterBounded: the per-user creation limiter holds at
// most maxUsers per shard; when a shard is full it forgets the users whose
// bucket refilled, and otherwise refuses a user it does not hold.
func TestQueueCreateLimiterBounded(t *testing.T) {
	c := newCreateLimiter(5, 2)
	now := newFakeClock().now()
	full := 0
	for i := range 1000 {
		ok, f := c.allow(fmt.Sprint("u", i), now)
		if f {
			full++
		} else if !ok {
			t.Fatalf("user %d refused without a full shard", i)
		}
	}
	held := 0
	for i := range c.shards {
		held += len(c.shards[i].users)
	}
	if held > 2*len(c.shards) || full != 1000-held {
		t.Fatalf("the limiter holds %d users and refused %d as full; want at most %d, the rest refused", held, full, 2*len(c.shards))
	}
	// Buckets refill: a new user finds room in a full shard.
	if ok, f := c.allow("u-later", now.Add(time.Minute)); !ok || f {
		t.Fatalf("a new user after the buckets refilled: allowed %v, full %v", ok, f)
	}
}

// TestQueueCreateLimitOff: a negative MaxQueueCreates turns the limit off;
// a full limiter's refusals are counted as "creators".
func TestQueueCreateLimitOff(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MaxQueueCreates = -1
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for i := range 700 {
		l.ok(userPublish("alice", fmt.Sprintf("/r/%d", i), "chat", `1`))
	}
	if s.creates != nil {
		t.Fatal("a limiter exists")
	}
	s.sweep() // the periodic sweep, with no limiter to sweep

	cfg = DefaultConfig()
	s = startNodeThen(t, cfg, func(s *Server) { s.creates = newCreateLimiter(cfg.MaxQueueCreates, 1) })
	l = dialLink(t, s.LinkAddr(), "gw-1")
	// Two users in one shard of the limiter.
	shardOf := func(u string) uint64 { return xxhash.Sum64String(u) % uint64(len(s.creates.shards)) }
	other := ""
	for i := 0; other == ""; i++ {
		if u := fmt.Sprint("u", i); shardOf(u) == shardOf("alice") && u != "alice" {
			other = u
		}
	}
	l.ok(userPublish("alice", "/r/1", "chat", `1`))
	l.ok(userPublish("alice", "/r/2", "chat", `1`))
	r := l.do(userPublish(other, "/r/3", "chat", `1`))
	if r.GetCode() != imqpb.Code_LIMIT_EXCEEDED || refusedCount(t, s, refusedCreators) != 1 {
		t.Fatalf("a user the full limiter does not hold: %v %q, counted %v", r.GetCode(), r.GetMessage(), refusedCount(t, s, refusedCreators))
	}
	l.ok(userPublish(other, "/r/1", "chat", `1`)) // exists: no creation
}

// TestBudgetConfig: the budget's and the limiter's zero values are the
// defaults; a negative limiter is off; a budget below 1 MiB is refused.
func TestBudgetConfig(t *testing.T) {
	cfg := Config{}
	cfg.setDefaults()
	if err := cfg.validate(); err != nil || cfg.MaxNodeBytes != 1<<30 || cfg.MaxQueueCreates != 600 {
		t.Fatalf("zero values: %v, %d bytes, %d creates", err, cfg.MaxNodeBytes, cfg.MaxQueueCreates)
	}
	cfg.MaxQueueCreates = -1
	if err := cfg.validate(); err != nil {
		t.Fatalf("no creation limit: %v", err)
	}
	for _, n := range []int64{-1, 1 << 19} {
		cfg.MaxNodeBytes = n
		if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), "max node bytes") {
			t.Fatalf("max node bytes %d: %v", n, err)
		}
	}
}
