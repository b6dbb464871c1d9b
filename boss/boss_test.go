package boss

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
)

// fastMembership detects a crash in about a second on localhost.
func fastMembership() member.Config {
	return member.Config{
		BindAddr: "127.0.0.1:0", ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond,
		SuspicionMult: 2, RejoinInterval: 200 * time.Millisecond,
	}
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("IMQ_TEST_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
}

func testConfig(t *testing.T, dir string) Config {
	return Config{
		HTTPAddr: "127.0.0.1:0", DataDir: dir, Member: fastMembership(),
		ReconcileGrace: 5 * time.Second, Logger: testLogger(t),
	}
}

// startBoss runs a boss until the test ends; stop shuts it down earlier.
func startBoss(t *testing.T, cfg Config) (b *Boss, stop func()) {
	t.Helper()
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- b.Run(context.Background()) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := b.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after Shutdown")
		}
	}
	t.Cleanup(stop)
	return b, stop
}

// TestNodesViewOldBossSuperseded: while a killed boss's old incarnation is
// still a live member, /v1/nodes shows it superseded and only the newest
// boss, the one members follow, as owning the table.
func TestNodesViewOldBossSuperseded(t *testing.T) {
	old, err := member.Start(fastMembership(), member.Meta{Role: member.RoleBoss, ID: "boss", HTTPAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Shutdown() })
	testutil.WaitFor(t, time.Second, "a new millisecond", func() bool { return time.Now().UnixMilli() > old.Meta().Started })
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	if _, err := old.Join([]string{b.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	var nv NodesView
	testutil.WaitFor(t, 10*time.Second, "both bosses in /v1/nodes", func() bool {
		_, body := get(t, "http://"+b.Addr()+"/v1/nodes")
		nv = NodesView{}
		if err := json.Unmarshal(body, &nv); err != nil {
			t.Fatal(err)
		}
		return len(nv.Members) == 2
	})
	for _, m := range nv.Members {
		want := StatusBossSuperseded
		if m.Name == b.member.Name() {
			want = StatusBoss
		}
		if m.Role != member.RoleBoss || m.Status != want {
			t.Errorf("%s (started %v): role %s, status %q; want %q", m.Name, m.Started, m.Role, m.Status, want)
		}
	}
}

// startMember starts a cluster member joined through the boss.
func startMember(t *testing.T, join string, meta member.Meta) *member.Member {
	t.Helper()
	cfg := fastMembership()
	cfg.Join = []string{join}
	m, err := member.Start(cfg, meta)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Shutdown() })
	return m
}

func startNode(t *testing.T, b *Boss, id string) *member.Member {
	t.Helper()
	return startMember(t, b.GossipAddr(), member.Meta{Role: member.RoleQueueNode, ID: id, LinkAddr: "127.0.0.1:1" + strings.TrimPrefix(id, "qn-")})
}

func get(t *testing.T, url string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

// httpTable fetches the boss's table over HTTP.
func httpTable(t *testing.T, b *Boss) *bucket.Table {
	t.Helper()
	resp, body := get(t, "http://"+b.Addr()+"/v1/table")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/table: %s %s", resp.Status, body)
	}
	tb, err := cluster.DecodeTable(strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	if h := resp.Header.Get("X-IMQ-Table-Version"); h != strconv.FormatUint(tb.Version(), 10) {
		t.Fatalf("X-IMQ-Table-Version %q for version %d", h, tb.Version())
	}
	return tb
}

func ids(tb *bucket.Table) []string {
	var out []string
	for _, n := range tb.Nodes() {
		out = append(out, n.ID)
	}
	return out
}

func waitNodes(t *testing.T, b *Boss, want ...string) *bucket.Table {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, fmt.Sprintf("table nodes %v", want), func() bool { return slices.Equal(ids(b.Table()), want) })
	return b.Table()
}

// threeNodes starts a boss with qn-1..3 in its table.
func threeNodes(t *testing.T, dir string) (*Boss, func(), []*member.Member) {
	b, stop := startBoss(t, testConfig(t, dir))
	var ms []*member.Member
	for _, id := range []string{"qn-1", "qn-2", "qn-3"} {
		ms = append(ms, startNode(t, b, id))
	}
	waitNodes(t, b, "qn-1", "qn-2", "qn-3")
	return b, stop, ms
}

func TestJoinBalances(t *testing.T) {
	b, _, _ := threeNodes(t, t.TempDir())
	tb := httpTable(t, b)
	if !slices.Equal(ids(tb), []string{"qn-1", "qn-2", "qn-3"}) {
		t.Fatalf("table nodes %v", ids(tb))
	}
	lo, hi := tb.Buckets(), 0
	for id, c := range tb.Counts() {
		if c < bucket.MinBuckets {
			t.Errorf("%s owns %d buckets, fewer than %d", id, c, bucket.MinBuckets)
		}
		lo, hi = min(lo, c), max(hi, c)
	}
	if hi-lo > 1 {
		t.Errorf("counts %v are not balanced", tb.Counts())
	}
	for _, n := range tb.Nodes() {
		if want := "127.0.0.1:1" + strings.TrimPrefix(n.ID, "qn-"); n.LinkAddr != want {
			t.Errorf("%s link address %q, want %q", n.ID, n.LinkAddr, want)
		}
	}
	if resp, _ := get(t, "http://"+b.Addr()+"/healthz"); resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %s", resp.Status)
	}
}

func TestLongPoll(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	base := "http://" + b.Addr() + "/v1/table"
	v := b.Table().Version()

	t.Run("behind answers at once", func(t *testing.T) {
		start := time.Now()
		resp, body := get(t, fmt.Sprintf("%s?after=%d&wait=30s", base, v-1))
		if resp.StatusCode != http.StatusOK || time.Since(start) > 2*time.Second {
			t.Fatalf("%s after %s: %s", resp.Status, time.Since(start), body)
		}
		if tb, err := cluster.DecodeTable(strings.NewReader(string(body))); err != nil || tb.Version() != v {
			t.Fatalf("table %v, %v; want version %d", tb, err, v)
		}
	})
	t.Run("current waits, then 304", func(t *testing.T) {
		start := time.Now()
		resp, body := get(t, fmt.Sprintf("%s?after=%d&wait=300ms", base, v))
		if resp.StatusCode != http.StatusNotModified || len(body) != 0 {
			t.Fatalf("%s: %s", resp.Status, body)
		}
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Fatalf("answered after %s, before the wait", d)
		}
		if h := resp.Header.Get("X-IMQ-Table-Version"); h != strconv.FormatUint(v, 10) {
			t.Fatalf("X-IMQ-Table-Version %q", h)
		}
	})
	t.Run("returns on publish", func(t *testing.T) {
		type result struct {
			status int
			tb     *bucket.Table
			err    error
		}
		done := make(chan result, 1)
		go func() {
			resp, err := http.Get(fmt.Sprintf("%s?after=%d&wait=30s", base, v))
			if err != nil {
				done <- result{err: err}
				return
			}
			defer resp.Body.Close()
			tb, err := cluster.DecodeTable(resp.Body)
			done <- result{resp.StatusCode, tb, err}
		}()
		testutil.WaitFor(t, 5*time.Second, "the poll to wait", func() bool { return b.waiters.Load() == 1 })
		startNode(t, b, "qn-2")
		select {
		case r := <-done:
			if r.err != nil || r.status != http.StatusOK || r.tb.Version() <= v || !slices.Contains(ids(r.tb), "qn-2") {
				t.Fatalf("poll: %d %v %v", r.status, r.tb, r.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the long poll did not return on publish")
		}
	})
	t.Run("bad parameters", func(t *testing.T) {
		for _, q := range []string{"after=abc", "after=-1", "after=", "after=1&wait=abc", "after=1&wait=-1s", "after=1&wait=61s", "wait=1s"} {
			resp, body := get(t, base+"?"+q)
			var e struct {
				Error struct{ Code, Message string } `json:"error"`
			}
			if resp.StatusCode != http.StatusBadRequest || json.Unmarshal(body, &e) != nil || e.Error.Code != "BAD_REQUEST" || e.Error.Message == "" {
				t.Errorf("?%s: %s %s", q, resp.Status, body)
			}
		}
	})
}

func TestShutdownEndsLongPolls(t *testing.T) {
	b, stop := startBoss(t, testConfig(t, t.TempDir()))
	done := make(chan int, 1)
	go func() {
		resp, err := http.Get("http://" + b.Addr() + "/v1/table?after=0&wait=60s")
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	testutil.WaitFor(t, 5*time.Second, "the poll to wait", func() bool { return b.waiters.Load() == 1 })
	start := time.Now()
	stop()
	select {
	case s := <-done:
		if s != http.StatusNotModified {
			t.Fatalf("poll answered %d, want 304", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the long poll outlived the shutdown")
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("shutdown took %s", d)
	}
	if err := b.Shutdown(context.Background()); err != nil { // idempotent
		t.Fatal(err)
	}
}

func TestCrashedNodeRemoved(t *testing.T) {
	b, _, ms := threeNodes(t, t.TempDir())
	before := b.Table()
	ms[1].Shutdown() // qn-2 crashes: no leave message
	after := waitNodes(t, b, "qn-1", "qn-3")
	want, _, _ := before.Leave("qn-2")
	if after.Version() != before.Version()+1 || jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after the crash\n%s\nwant (only qn-2's buckets moved)\n%s", jsonOf(t, after), jsonOf(t, want))
	}
}

func TestLeftNodeRemoved(t *testing.T) {
	b, _, ms := threeNodes(t, t.TempDir())
	before := b.Table()
	if err := ms[0].Close(time.Second); err != nil {
		t.Fatal(err)
	}
	after := waitNodes(t, b, "qn-2", "qn-3")
	want, _, _ := before.Leave("qn-1")
	if jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after the leave\n%s\nwant\n%s", jsonOf(t, after), jsonOf(t, want))
	}
}

func TestFourthNodeStealsOnly(t *testing.T) {
	b, _, _ := threeNodes(t, t.TempDir())
	before := b.Table()
	startNode(t, b, "qn-4")
	after := waitNodes(t, b, "qn-1", "qn-2", "qn-3", "qn-4")
	want, moves, _ := before.Join(bucket.Node{ID: "qn-4", LinkAddr: "127.0.0.1:14"})
	if jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after the join\n%s\nwant\n%s", jsonOf(t, after), jsonOf(t, want))
	}
	// Every bucket not stolen kept its owner (the table did not split).
	stolen := map[int]bool{}
	for _, m := range moves {
		stolen[m.Bucket] = true
	}
	if after.Buckets() != before.Buckets() {
		t.Fatalf("buckets %d → %d", before.Buckets(), after.Buckets())
	}
	for bk := range after.Buckets() {
		if !stolen[bk] && after.Owner(bk).ID != before.Owner(bk).ID {
			t.Fatalf("bucket %d moved from %s to %s without being stolen", bk, before.Owner(bk).ID, after.Owner(bk).ID)
		}
		if stolen[bk] && after.Owner(bk).ID != "qn-4" {
			t.Fatalf("stolen bucket %d went to %s", bk, after.Owner(bk).ID)
		}
	}
}

func TestRestartKeepsTable(t *testing.T) {
	dir := t.TempDir()
	b1, stop1, ms := threeNodes(t, dir)
	persisted := b1.Table()
	testutil.WaitFor(t, 5*time.Second, "the peers to be persisted", func() bool {
		s, err := loadState(dir)
		return err == nil && len(s.Peers) == 3 && s.Table.Version() == persisted.Version()
	})
	stop1()
	// qn-3 dies while the boss is down; the others see it go.
	ms[2].Shutdown()
	testutil.WaitFor(t, 10*time.Second, "qn-1 to see qn-3 dead", func() bool {
		return !slices.ContainsFunc(ms[0].Peers(), func(p member.Peer) bool { return p.Meta.ID == "qn-3" })
	})

	cfg := testConfig(t, dir)
	cfg.ReconcileGrace = time.Minute // only the rejoin through the persisted peers can end it
	b2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := b2.Table(); jsonOf(t, got) != jsonOf(t, persisted) {
		t.Fatalf("restarted with\n%s\nwant\n%s", jsonOf(t, got), jsonOf(t, persisted))
	}
	if b2.Ready() {
		t.Fatal("a restarted boss with a table is ready before hearing from the cluster")
	}
	errc := make(chan error, 1)
	go func() { errc <- b2.Run(context.Background()) }()
	t.Cleanup(func() {
		b2.Shutdown(context.Background())
		<-errc
	})
	after := waitNodes(t, b2, "qn-1", "qn-2")
	want, _, _ := persisted.Leave("qn-3")
	if jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after the restart\n%s\nwant\n%s", jsonOf(t, after), jsonOf(t, want))
	}
	if !b2.Ready() {
		t.Fatal("not ready after removing a node")
	}
}

func TestRestartGrace(t *testing.T) {
	dir := t.TempDir()
	b1, stop1, ms := threeNodes(t, dir)
	persisted := b1.Table()
	stop1()
	for _, m := range ms { // the whole cluster is gone
		m.Shutdown()
	}
	cfg := testConfig(t, dir)
	cfg.ReconcileGrace = 700 * time.Millisecond
	start := time.Now()
	b2, _ := startBoss(t, cfg)
	if v := b2.Table().Version(); v != persisted.Version() {
		t.Fatalf("restarted at version %d, want %d", v, persisted.Version())
	}
	// During the grace period the nodes are listed as lost.
	resp, body := get(t, "http://"+b2.Addr()+"/v1/nodes")
	var nv NodesView
	if err := json.Unmarshal(body, &nv); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/v1/nodes: %s %s %v", resp.Status, body, err)
	}
	if time.Since(start) < cfg.ReconcileGrace {
		lost := 0
		for _, m := range nv.Members {
			if m.State == StateLost && m.Status == StatusLost && m.Buckets != nil && *m.Buckets > 0 {
				lost++
			}
		}
		if lost != 3 || nv.Ready {
			t.Fatalf("during the grace period: %s", body)
		}
	}
	waitNodes(t, b2)
	if d := time.Since(start); d < cfg.ReconcileGrace {
		t.Fatalf("nodes removed after %s, within the grace period %s", d, cfg.ReconcileGrace)
	}
	if b2.Table().Version() != persisted.Version()+3 {
		t.Fatalf("version %d, want %d", b2.Table().Version(), persisted.Version()+3)
	}
}

// tableAt returns tb with its version set to v, through its JSON form.
func tableAt(t *testing.T, tb *bucket.Table, v uint64) *bucket.Table {
	t.Helper()
	var j map[string]any
	if err := json.Unmarshal([]byte(jsonOf(t, tb)), &j); err != nil {
		t.Fatal(err)
	}
	j["version"] = v
	raw, _ := json.Marshal(j)
	var out bucket.Table
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

func TestAdoptsNewerTable(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	if b.Table().Version() >= 50 {
		t.Fatal("test needs a young table")
	}
	// A gateway holds version 50 of a table an earlier boss published:
	// qn-1 and qn-9, which is gone.
	newer := tableAt(t, build(t, []bucket.Node{{ID: "qn-1", LinkAddr: "127.0.0.1:11"}, {ID: "qn-9", LinkAddr: "127.0.0.1:19"}}), 50)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != cluster.TablePath {
			http.NotFound(w, r)
			return
		}
		cluster.ServeTable(w, newer)
	}))
	t.Cleanup(srv.Close)
	startMember(t, b.GossipAddr(), member.Meta{
		Role: member.RoleGateway, ID: "gw-1", HTTPAddr: strings.TrimPrefix(srv.URL, "http://"), TableVersion: 50,
	})
	waitNodes(t, b, "qn-1")
	testutil.WaitFor(t, 10*time.Second, "version 51", func() bool { return b.Table().Version() == 51 })
	want, _, _ := newer.Leave("qn-9")
	if after := b.Table(); jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after adopting\n%s\nwant\n%s", jsonOf(t, after), jsonOf(t, want))
	}
	if s, err := loadState(b.cfg.DataDir); err != nil || s.Table.Version() != 51 {
		t.Fatalf("persisted version %v, %v", s.Table, err)
	}
}

func TestNodesView(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	varz := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/varz" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"queues": 7}`)
	}))
	t.Cleanup(varz.Close)
	startMember(t, b.GossipAddr(), member.Meta{Role: member.RoleQueueNode, ID: "qn-1", LinkAddr: "127.0.0.1:11",
		HTTPAddr: strings.TrimPrefix(varz.URL, "http://")})
	startNode(t, b, "qn-2")
	startMember(t, b.GossipAddr(), member.Meta{Role: member.RoleGateway, ID: "gw-1", HTTPAddr: "127.0.0.1:1"})
	waitNodes(t, b, "qn-1", "qn-2")
	var nv NodesView
	testutil.WaitFor(t, 10*time.Second, "four members", func() bool {
		resp, body := get(t, "http://"+b.Addr()+"/v1/nodes")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/v1/nodes: %s %s", resp.Status, body)
		}
		nv = NodesView{}
		if err := json.Unmarshal(body, &nv); err != nil {
			t.Fatal(err)
		}
		return len(nv.Members) == 4
	})
	tb := b.Table()
	if nv.TableVersion != tb.Version() || nv.Buckets != tb.Buckets() || !nv.Ready {
		t.Fatalf("view %+v for table %v", nv, tb)
	}
	byID := map[string]MemberView{}
	var order []string
	for _, m := range nv.Members {
		byID[m.ID] = m
		order = append(order, m.ID)
	}
	if !slices.Equal(order, []string{"boss", "qn-1", "qn-2", "gw-1"}) {
		t.Fatalf("members in order %v", order)
	}
	counts := tb.Counts()
	for _, id := range []string{"qn-1", "qn-2"} {
		m := byID[id]
		if m.Role != member.RoleQueueNode || m.State != StateAlive || m.Status != StatusServing ||
			m.Buckets == nil || *m.Buckets != counts[id] || m.GossipAddr == "" || m.LinkAddr == "" || m.Started.IsZero() {
			t.Errorf("%s: %+v", id, m)
		}
	}
	var qv struct{ Queues int }
	if m := byID["qn-1"]; json.Unmarshal(m.Varz, &qv) != nil || qv.Queues != 7 || m.VarzError != "" {
		t.Errorf("qn-1 varz %s (%s)", m.Varz, m.VarzError)
	}
	if m := byID["qn-2"]; m.Varz != nil || m.VarzError == "" {
		t.Errorf("qn-2 has no HTTP address, yet varz %s (%q)", m.Varz, m.VarzError)
	}
	if m := byID["gw-1"]; m.Status != StatusGateway || m.Buckets != nil || m.VarzError == "" {
		t.Errorf("gw-1: %+v", m)
	}
	var bv Varz
	if m := byID["boss"]; m.Status != StatusBoss || json.Unmarshal(m.Varz, &bv) != nil || bv.TableVersion != tb.Version() {
		t.Errorf("boss: %+v", m)
	}
}

func TestIncarnations(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	old := startMember(t, b.GossipAddr(), member.Meta{Role: member.RoleQueueNode, ID: "qn-1", LinkAddr: "127.0.0.1:1"})
	startNode(t, b, "qn-2")
	before := waitNodes(t, b, "qn-1", "qn-2")
	testutil.WaitFor(t, time.Second, "a new millisecond", func() bool { return time.Now().UnixMilli() > old.Meta().Started })
	// qn-1 restarts on a new link address before its old self is gone.
	startMember(t, b.GossipAddr(), member.Meta{Role: member.RoleQueueNode, ID: "qn-1", LinkAddr: "127.0.0.1:2"})
	testutil.WaitFor(t, 10*time.Second, "qn-1 readdressed", func() bool {
		return b.Table().Nodes()[0].LinkAddr == "127.0.0.1:2"
	})
	after := b.Table()
	want, _ := before.Readdress(bucket.Node{ID: "qn-1", LinkAddr: "127.0.0.1:2"})
	if jsonOf(t, after) != jsonOf(t, want) {
		t.Fatalf("after the restart\n%s\nwant (same owners)\n%s", jsonOf(t, after), jsonOf(t, want))
	}
	// The old incarnation's death changes nothing.
	old.Shutdown()
	testutil.WaitFor(t, 10*time.Second, "the old incarnation to die", func() bool {
		return len(slices.DeleteFunc(b.member.Peers(), func(p member.Peer) bool { return p.Meta.ID != "qn-1" })) == 1
	})
	waitReconcile(t, b)
	if got := b.Table(); jsonOf(t, got) != jsonOf(t, want) {
		t.Fatalf("after the old incarnation died\n%s\nwant\n%s", jsonOf(t, got), jsonOf(t, want))
	}
}

func TestPersistFailure(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	cfg := testConfig(t, data)
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	// The data directory turns into a file: writes fail.
	if err := os.RemoveAll(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(data, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	startNode(t, b, "qn-2")
	waitNodes(t, b, "qn-1", "qn-2") // published all the same
	health := func() int {
		resp, _ := get(t, "http://"+b.Addr()+"/healthz")
		return resp.StatusCode
	}
	testutil.WaitFor(t, 5*time.Second, "unhealthy", func() bool { return health() == http.StatusServiceUnavailable })
	if n := counter(t, b, "imq_boss_persist_errors_total"); n < 1 {
		t.Fatalf("persist errors %v", n)
	}
	// Fixed: the next reconcile writes the state and the boss is healthy.
	os.Remove(data)
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, "healthy", func() bool { return health() == http.StatusOK })
	if s, err := loadState(data); err != nil || !slices.Equal(ids(s.Table), []string{"qn-1", "qn-2"}) {
		t.Fatalf("persisted %v, %v", s.Table, err)
	}
}

// waitReconcile waits for a whole reconcile to run after the call.
func waitReconcile(t *testing.T, b *Boss) {
	t.Helper()
	n := reconciles(t, b)
	b.kickReconcile()
	testutil.WaitFor(t, 5*time.Second, "a reconcile", func() bool { return reconciles(t, b) >= n+2 })
}

func reconciles(t *testing.T, b *Boss) uint64 {
	t.Helper()
	mfs, err := b.cfg.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "imq_boss_reconcile_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatal("no reconcile histogram")
	return 0
}

func counter(t *testing.T, b *Boss, name string) float64 {
	t.Helper()
	mfs, err := b.cfg.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestNoDataDir(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, ""))
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	var v Varz
	resp, body := get(t, "http://"+b.Addr()+"/varz")
	if err := json.Unmarshal(body, &v); err != nil || resp.StatusCode != http.StatusOK || v.Persisted || v.TableVersion != b.Table().Version() {
		t.Fatalf("/varz: %s %s", resp.Status, body)
	}
	if resp, _ := get(t, "http://"+b.Addr()+"/metrics"); resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
}

// TestNoDataDirWarning: a boss without a data directory warns that its
// table will not survive a restart, unless it is ephemeral (imq dev),
// where the user has nothing to set.
func TestNoDataDirWarning(t *testing.T) {
	for _, ephemeral := range []bool{false, true} {
		logger, logs := testutil.CaptureLogs(slog.LevelInfo)
		cfg := testConfig(t, "")
		cfg.Ephemeral = ephemeral
		cfg.Logger = logger
		_, stop := startBoss(t, cfg)
		stop()
		warned := strings.Contains(logs.String(), "level=WARN msg=\"no data directory")
		if warned == ephemeral {
			t.Errorf("ephemeral %v: warned %v; want %v. Logs:\n%s", ephemeral, warned, !ephemeral, logs.String())
		}
	}
}

// TestRepublishesOnDivergence: a member holds another table under the boss's
// own version (a boss that lost its state published a version the cluster
// already had). The boss republishes its table as the next version, which
// every member takes as newer.
func TestRepublishesOnDivergence(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	cur := b.Table()
	other := tableAt(t, build(t, []bucket.Node{{ID: "qn-7", LinkAddr: "127.0.0.1:17"}}), cur.Version())
	startMember(t, b.GossipAddr(), member.Meta{
		Role: member.RoleGateway, ID: "gw-1", TableVersion: other.Version(), TableSum: other.Sum(),
	})
	testutil.WaitFor(t, 10*time.Second, "a republish", func() bool { return b.Table().Version() == cur.Version()+1 })
	if got := b.Table(); got.Sum() != cur.Sum() {
		t.Fatalf("the republished table's contents changed: %s", jsonOf(t, got))
	}
	// A member that agrees with the boss changes nothing.
	startMember(t, b.GossipAddr(), member.Meta{
		Role: member.RoleGateway, ID: "gw-2", TableVersion: b.Table().Version(), TableSum: b.Table().Sum(),
	})
	time.Sleep(500 * time.Millisecond)
	if v := b.Table().Version(); v != cur.Version()+1 {
		t.Fatalf("version %d after an agreeing member joined", v)
	}
}

// TestLongPollFitsWriteTimeout: the boss's API server is an internal
// listener (obs.NewInternalServer) whose write timeout outlasts the longest
// long poll with room to write the table, and whose header limit refuses a
// 64 KiB header (431) where it took 1 MiB.
func TestLongPollFitsWriteTimeout(t *testing.T) {
	b, _ := startBoss(t, testConfig(t, t.TempDir()))
	if wt := b.http.WriteTimeout; wt < MaxWait+10*time.Second {
		t.Fatalf("write timeout %s: a long poll of up to %s would be cut off", wt, MaxWait)
	}
	req, err := http.NewRequest("GET", "http://"+b.Addr()+"/v1/nodes", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("a 64 KiB header: %s, want 431", resp.Status)
	}
}
