package cluster

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
)

// waitFor bounds every wait for a condition.
const waitFor = 5 * time.Second

// eventually fails the test unless cond holds within waitFor.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(waitFor); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// testMemberConfig gossips on a free local port, with short timings.
func testMemberConfig() member.Config {
	return member.Config{
		BindAddr: "127.0.0.1:0", Cluster: "imq-cluster-test",
		ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond,
		SuspicionMult: 3, RejoinInterval: 200 * time.Millisecond,
	}
}

// startCluster starts a gateway's Cluster with cfg (the member config and
// meta filled in when zero; install recording nothing when nil), running
// its watcher until the test ends.
func startCluster(t *testing.T, cfg Config) *Cluster {
	t.Helper()
	if cfg.Member.BindAddr == "" {
		cfg.Member = testMemberConfig()
	}
	if cfg.Meta.Role == "" {
		cfg.Meta = member.Meta{Role: member.RoleGateway, ID: "gw-test"}
	}
	if cfg.Install == nil {
		cfg.Install = func(_, _ *bucket.Table) {}
	}
	c, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; c.Leave() })
	return c
}

// startMember starts a member with meta that joins c, until the test ends.
func startMember(t *testing.T, c *Cluster, meta member.Meta) *member.Member {
	t.Helper()
	m, err := member.Start(testMemberConfig(), meta)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(time.Second) })
	if _, err := m.Join([]string{c.Member().Addr()}); err != nil {
		t.Fatal(err)
	}
	return m
}

// fakeBoss serves tables the way the boss does: 200 when it has a newer
// one than ?after, else 304 after the wait (or when the poll ends).
type fakeBoss struct {
	mu      sync.Mutex
	table   *bucket.Table  // guarded by mu
	changed chan struct{}  // closed at each new table; guarded by mu
	polls   map[uint64]int // requests by ?after; guarded by mu
	broken  bool           // guarded by mu
}

func startFakeBoss(t *testing.T, tb *bucket.Table) (*fakeBoss, string) {
	t.Helper()
	b := &fakeBoss{table: tb, changed: make(chan struct{}), polls: map[uint64]int{}}
	srv := httptest.NewServer(b)
	t.Cleanup(srv.Close)
	return b, srv.URL
}

func (b *fakeBoss) publish(t *bucket.Table) {
	b.mu.Lock()
	b.table = t
	close(b.changed)
	b.changed = make(chan struct{})
	b.mu.Unlock()
}

func (b *fakeBoss) setBroken(broken bool) {
	b.mu.Lock()
	b.broken = broken
	b.mu.Unlock()
}

func (b *fakeBoss) pollsAfter(v uint64) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.polls[v]
}

func (b *fakeBoss) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	after, _ := strconv.ParseUint(r.URL.Query().Get("after"), 10, 64)
	wait, _ := time.ParseDuration(r.URL.Query().Get("wait"))
	b.mu.Lock()
	b.polls[after]++
	broken := b.broken
	t, ch := b.table, b.changed
	b.mu.Unlock()
	if broken {
		http.Error(w, "broken", http.StatusInternalServerError)
		return
	}
	if t.Version() <= after {
		select {
		case <-ch:
		case <-time.After(wait):
		case <-r.Context().Done():
			return
		}
		b.mu.Lock()
		t = b.table
		b.mu.Unlock()
		if t.Version() <= after {
			w.WriteHeader(http.StatusNotModified)
			return
		}
	}
	ServeTable(w, t)
}

// table returns the table with nodes ids, joined in order: version
// len(ids).
func table(ids ...string) *bucket.Table {
	t := bucket.Empty()
	for _, id := range ids {
		t, _, _ = t.Join(bucket.Node{ID: id, LinkAddr: id + ":1"})
	}
	return t
}

func TestFollowsTheBossInOrder(t *testing.T) {
	boss, url := startFakeBoss(t, table("a"))
	var mu sync.Mutex
	var seen []uint64
	c := startCluster(t, Config{BossURL: url + "/", PollWait: 200 * time.Millisecond, Install: func(old, next *bucket.Table) {
		mu.Lock()
		seen = append(seen, next.Version())
		mu.Unlock()
		if next.Version() <= old.Version() {
			t.Errorf("install went from v%d to v%d", old.Version(), next.Version())
		}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if got, err := c.WaitVersion(ctx, 1); err != nil || len(got.Nodes()) != 1 {
		t.Fatalf("first table: %v %v", got, err)
	}
	eventually(t, "a poll after v1", func() bool { return boss.pollsAfter(1) > 0 })
	boss.publish(table("a", "b"))
	if got, err := c.WaitVersion(ctx, 2); err != nil || len(got.Nodes()) != 2 {
		t.Fatalf("second table: %v %v", got, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != 1 || seen[1] != 2 {
		t.Fatalf("install saw versions %v, want [1 2]", seen)
	}
	if m := c.Member().Meta(); m.TableVersion != 2 || m.TableSum != table("a", "b").Sum() {
		t.Fatalf("membership advertises table v%d sum %q, want v2 and its sum", m.TableVersion, m.TableSum)
	}
}

func TestNeverGoesBack(t *testing.T) {
	boss, url := startFakeBoss(t, table("a", "b", "c"))
	c := startCluster(t, Config{BossURL: url, PollWait: 200 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := c.WaitVersion(ctx, 3); err != nil {
		t.Fatal(err)
	}
	boss.publish(table("x")) // version 1: a boss that lost its state
	eventually(t, "polls after the boss went back", func() bool { return boss.pollsAfter(3) >= 2 })
	if v := c.Table().Version(); v != 3 {
		t.Fatalf("the cluster went back to v%d", v)
	}
	if c.Install(table("a", "b")) || c.Table().Version() != 3 {
		t.Fatal("Install took an older table")
	}
}

func TestKeepsItsTableWhileTheBossIsDown(t *testing.T) {
	boss, url := startFakeBoss(t, table("a"))
	c := startCluster(t, Config{BossURL: url, PollWait: 200 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := c.WaitVersion(ctx, 1); err != nil {
		t.Fatal(err)
	}
	boss.setBroken(true)
	eventually(t, "failed polls", func() bool { return boss.pollsAfter(1) >= 3 })
	if c.Table().Version() != 1 {
		t.Fatal("the table was dropped while the boss failed")
	}
	boss.setBroken(false)
	boss.publish(table("a", "b"))
	if _, err := c.WaitVersion(ctx, 2); err != nil {
		t.Fatalf("no table after the boss came back: %v", err)
	}
}

func TestDecodeTableRefusesGarbage(t *testing.T) {
	for _, body := range []string{
		`{"version":9,"bits":1,"nodes":[{"id":"a"}],"owners":[0,5]}`, // owner out of range
		`{"version":`,
		`[]`,
	} {
		if tb, err := DecodeTable(strings.NewReader(body)); err == nil {
			t.Errorf("DecodeTable(%s) = %v, want an error", body, tb)
		}
	}
	tb := table("a", "b")
	rec := httptest.NewRecorder()
	ServeTable(rec, tb)
	if rec.Header().Get("X-IMQ-Table-Version") != "2" {
		t.Fatalf("version header %q, want 2", rec.Header().Get("X-IMQ-Table-Version"))
	}
	if got, err := DecodeTable(rec.Body); err != nil || got.Sum() != tb.Sum() {
		t.Fatalf("round trip: %v %v, want %v", got, err, tb)
	}
}

// TestDoesNotSpinOnANonBoss: a URL that answers at once with a table no
// newer than ours (a gateway's or queue node's /v1/table given as the boss)
// is polled with backoff, not in a tight loop.
func TestDoesNotSpinOnANonBoss(t *testing.T) {
	var polls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		polls.Add(1)
		ServeTable(w, table("a"))
	}))
	defer srv.Close()
	c := startCluster(t, Config{BossURL: srv.URL})
	eventually(t, "table v1", func() bool { return c.Table().Version() == 1 })
	eventually(t, "a few polls", func() bool { return polls.Load() >= 4 })
	// Backoff doubles from 100 ms: four polls take at least 50+100+200 ms
	// of pauses; a spin makes thousands meanwhile.
	time.Sleep(300 * time.Millisecond)
	if n := polls.Load(); n > 20 {
		t.Fatalf("%d polls, want a backoff", n)
	}
}

// TestWaitVersionHeld: a held version returns at once, even with ctx ended.
func TestWaitVersionHeld(t *testing.T) {
	c := startCluster(t, Config{})
	c.Install(table("a", "b"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, v := range []uint64{0, 1, 2} {
		if got, err := c.WaitVersion(ctx, v); err != nil || got.Version() != 2 {
			t.Fatalf("WaitVersion(%d) = v%d, %v; want v2 at once", v, got.Version(), err)
		}
	}
}

// TestWaitVersionWaitsForInstall: a waiter of version v is released only
// when the install hook has finished with v, and the membership advertises
// v by then.
func TestWaitVersionWaitsForInstall(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var finished atomic.Bool
	c := startCluster(t, Config{Install: func(_, next *bucket.Table) {
		close(entered)
		<-release
		finished.Store(true)
	}})
	type result struct {
		t        *bucket.Table
		err      error
		finished bool
		adv      uint64
	}
	got := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		tb, err := c.WaitVersion(ctx, 1)
		got <- result{tb, err, finished.Load(), c.Member().Meta().TableVersion}
	}()
	installed := make(chan bool, 1)
	go func() { installed <- c.Install(table("a")) }()
	<-entered
	select {
	case r := <-got:
		t.Fatalf("WaitVersion returned v%d (%v) while the install hook ran", r.t.Version(), r.err)
	case <-time.After(50 * time.Millisecond): // time for a premature release to show
	}
	if v := c.Table().Version(); v != 0 {
		t.Fatalf("Table is v%d while its install runs, want v0", v)
	}
	close(release)
	r := <-got
	if r.err != nil || r.t.Version() != 1 || !r.finished || r.adv != 1 {
		t.Fatalf("WaitVersion = v%d, %v, hook finished %v, advertised v%d; want v1, nil, true, v1", r.t.Version(), r.err, r.finished, r.adv)
	}
	if !<-installed {
		t.Fatal("Install reported the table not installed")
	}
}

// TestWaitVersionRespectsContext: with no boss, a wait ends with ctx,
// returning the table held; and it asked for the table (kicked).
func TestWaitVersionRespectsContext(t *testing.T) {
	c, err := Start(Config{Member: testMemberConfig(), Meta: member.Meta{Role: member.RoleGateway, ID: "gw"}, Install: func(_, _ *bucket.Table) {}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Leave()
	c.Install(table("a"))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	got, err := c.WaitVersion(ctx, 2)
	if !errors.Is(err, context.DeadlineExceeded) || got.Version() != 1 {
		t.Fatalf("WaitVersion = v%d, %v; want v1, deadline exceeded", got.Version(), err)
	}
	select {
	case <-c.kick:
	default:
		t.Fatal("WaitVersion did not ask for the table")
	}
}

// TestKicks: a peer gossiping a newer table, and KickIfBehind with a newer
// version, end the poll under way and ask again at once; KickIfBehind with
// an older one does not.
func TestKicks(t *testing.T) {
	boss, url := startFakeBoss(t, table("a"))
	c := startCluster(t, Config{BossURL: url, PollWait: time.Minute})
	eventually(t, "a poll after v1", func() bool { return c.Table().Version() == 1 && boss.pollsAfter(1) == 1 })

	c.KickIfBehind(1)
	c.KickIfBehind(0)
	select {
	case <-c.kick:
		t.Fatal("KickIfBehind kicked for a version held")
	default:
	}

	c.KickIfBehind(2)
	eventually(t, "the kicked cluster to poll again", func() bool { return boss.pollsAfter(1) == 2 })

	peer := startMember(t, c, member.Meta{Role: member.RoleQueueNode, ID: "n"})
	peer.SetTable(7, "sum")
	eventually(t, "a peer's newer table to make the cluster poll again", func() bool { return boss.pollsAfter(1) >= 3 })
}

func TestOnPeers(t *testing.T) {
	var mu sync.Mutex
	var last []member.Peer
	c := startCluster(t, Config{OnPeers: func(peers []member.Peer) {
		mu.Lock()
		last = peers
		mu.Unlock()
	}})
	startMember(t, c, member.Meta{Role: member.RoleQueueNode, ID: "n"})
	eventually(t, "OnPeers to see the node", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, p := range last {
			if p.Meta.ID == "n" {
				return true
			}
		}
		return false
	})
}

func TestBossURLChoice(t *testing.T) {
	boss := func(id, http string, started int64) member.Peer {
		return member.Peer{Name: "boss/" + id, Meta: member.Meta{Role: member.RoleBoss, ID: id, HTTPAddr: http, Started: started}}
	}
	gw := member.Peer{Name: "gateway/g", Meta: member.Meta{Role: member.RoleGateway, ID: "g", HTTPAddr: "10.0.0.9:8081", Started: 99}}
	for _, tc := range []struct {
		name     string
		override string
		peers    []member.Peer
		want     string
	}{
		{"no boss", "", []member.Peer{gw}, ""},
		{"one boss", "", []member.Peer{gw, boss("b", "10.0.0.1:7900", 1)}, "http://10.0.0.1:7900"},
		{"the newest boss", "", []member.Peer{boss("old", "10.0.0.1:7900", 1), boss("new", "10.0.0.2:7900", 2), gw}, "http://10.0.0.2:7900"},
		{"the newest boss without an address", "", []member.Peer{boss("old", "10.0.0.1:7900", 1), boss("new", "", 2)}, ""},
		{"the override", "http://lb:7900", []member.Peer{boss("b", "10.0.0.1:7900", 1)}, "http://lb:7900"},
	} {
		got, ok := bossURL(tc.override, tc.peers)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%s: %q %v, want %q", tc.name, got, ok, tc.want)
		}
	}
}

// TestBossDiscovery: over real membership, the cluster follows the newest
// live boss, and the older one again when the newest leaves.
func TestBossDiscovery(t *testing.T) {
	c := startCluster(t, Config{})
	if u, ok := c.BossURL(); ok {
		t.Fatalf("boss %q before any joined", u)
	}
	old := startMember(t, c, member.Meta{Role: member.RoleBoss, ID: "old", HTTPAddr: "127.0.0.1:7901"})
	eventually(t, "the old boss", func() bool { u, _ := c.BossURL(); return u == "http://127.0.0.1:7901" })
	eventually(t, "a newer start time", func() bool { return time.Now().UnixMilli() > old.Meta().Started })
	newer := startMember(t, c, member.Meta{Role: member.RoleBoss, ID: "new", HTTPAddr: "127.0.0.1:7902"})
	eventually(t, "the new boss", func() bool { u, _ := c.BossURL(); return u == "http://127.0.0.1:7902" })
	if err := newer.Close(time.Second); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the old boss again", func() bool { u, _ := c.BossURL(); return u == "http://127.0.0.1:7901" })
}

// TestLeave: Leave tells the others at once, and is idempotent.
func TestLeave(t *testing.T) {
	c, err := Start(Config{Member: testMemberConfig(), Meta: member.Meta{Role: member.RoleQueueNode, ID: "n"}, Install: func(_, _ *bucket.Table) {}})
	if err != nil {
		t.Fatal(err)
	}
	obs := startMember(t, c, member.Meta{Role: member.RoleBoss, ID: "boss"})
	sees := func() bool {
		for _, p := range obs.Peers() {
			if p.Meta.ID == "n" {
				return true
			}
		}
		return false
	}
	eventually(t, "the observer to see the node", sees)
	for i := range 2 {
		if err := c.Leave(); err != nil {
			t.Fatalf("Leave #%d: %v", i+1, err)
		}
	}
	eventually(t, "the observer to see the node leave", func() bool { return !sees() })
}

func TestStartNeedsAnInstallHook(t *testing.T) {
	if _, err := Start(Config{Member: testMemberConfig(), Meta: member.Meta{Role: member.RoleGateway, ID: "g"}}); err == nil {
		t.Fatal("Start accepted a config without an install hook")
	}
}
