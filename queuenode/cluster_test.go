package queuenode

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/cluster/clustertest"
	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// waitFor is how long a test waits for a condition before failing.
const waitFor = 5 * time.Second

// testMemberConfig is a membership on a free local port. Other members join
// the node's by hand (Member.Join), and leave gracefully rather than wait
// for the failure detector; its short timings are the backstop when a leave
// message is lost on a loaded machine (the default detection, 5.5 s, would
// outlast the tests' waits).
func testMemberConfig() *member.Config {
	return &member.Config{
		BindAddr: "127.0.0.1:0", ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond,
		SuspicionMult: 3, RejoinInterval: 200 * time.Millisecond,
	}
}

// startMember starts a member with meta that joins n's cluster, until the
// test ends.
func startMember(t *testing.T, n *testNode, meta member.Meta) *member.Member {
	t.Helper()
	m, err := member.Start(*testMemberConfig(), meta)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(time.Second) })
	if _, err := m.Join([]string{n.gossip}); err != nil {
		t.Fatal(err)
	}
	return m
}

// startNode runs a node with cfg on free local ports until the test ends.
func startNode(t testing.TB, cfg Config) *Server {
	t.Helper()
	return startNodeThen(t, cfg, nil)
}

// startNodeThen is startNode that calls before, if set, between New and Run.
func startNodeThen(t testing.TB, cfg Config, before func(*Server)) *Server {
	t.Helper()
	cfg.LinkAddr = "127.0.0.1:0"
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(s)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	return s
}

// testNode is a cluster-mode node under test.
type testNode struct {
	*Server
	gossip string // its membership address
}

// startClusterNode runs a cluster-mode node with id and no boss: tests give
// it tables with setTable. tune, if any, adjust its config.
func startClusterNode(t *testing.T, id string, tune ...func(*Config)) *testNode {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member = id, testMemberConfig()
	for _, f := range tune {
		f(&cfg)
	}
	var gossip string
	s := startNodeThen(t, cfg, func(s *Server) {
		// Read before the node runs: Member.Addr reads memberlist's own
		// node, which memberlist rewrites when the node gossips a new
		// table version (hashicorp/memberlist issue 306).
		gossip = s.cluster.Member().Addr()
	})
	return &testNode{Server: s, gossip: gossip}
}

// setTable installs table as the cluster runtime would on fetching it.
func (s *Server) setTable(table *bucket.Table) { s.cluster.Install(table) }

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// testLink is a gateway's end of a link, driven by hand.
type testLink struct {
	t      testing.TB
	c      net.Conn
	fr     *imqlink.Conn // the link after its handshake: frames in and out
	nextID uint64
	seen   []*imqpb.LinkDown // frames read while waiting for something else
}

// dialLink opens a link to the node at addr as gateway, without a cluster
// key.
func dialLink(t testing.TB, addr, gateway string) *testLink {
	t.Helper()
	return dialLinkWith(t, addr, imqlink.Config{ID: gateway})
}

// dialLinkWith opens a link to the node at addr as cfg says, as a gateway
// unless cfg has a role.
func dialLinkWith(t testing.TB, addr string, cfg imqlink.Config) *testLink {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if cfg.Role == 0 {
		cfg.Role = imqlink.RoleGateway
	}
	cfg.PeerRoles, cfg.Timeout = []imqpb.LinkRole{imqlink.RoleNode}, waitFor
	conn, err := imqlink.Client(c, cfg)
	if err != nil {
		t.Fatalf("link handshake: %v", err)
	}
	go conn.WriteLoop() // ends when c closes
	l := &testLink{t: t, c: c, fr: conn}
	// The node registers a link after the handshake; a pong says it has
	// (its reader runs), so links dialled one after another get serials in
	// that order.
	l.sync()
	return l
}

func (l *testLink) write(m *imqpb.LinkUp) {
	l.t.Helper()
	b, err := imqlink.MarshalFrame(m)
	if err != nil {
		l.t.Fatal(err)
	}
	if err := l.fr.SendAlways(b); err != nil {
		l.t.Fatal(err)
	}
}

func (l *testLink) read() *imqpb.LinkDown {
	l.t.Helper()
	l.c.SetReadDeadline(time.Now().Add(waitFor))
	b, err := l.fr.Next()
	if err != nil {
		l.t.Fatalf("read link frame: %v", err)
	}
	var m imqpb.LinkDown
	if err := proto.Unmarshal(b, &m); err != nil {
		l.t.Fatal(err)
	}
	return &m
}

// do sends req and returns its reply.
func (l *testLink) do(req *imqpb.NodeRequest) *imqpb.NodeReply {
	l.t.Helper()
	l.nextID++
	req.Id = l.nextID
	l.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	for {
		m := l.read()
		if r := m.GetReply(); r != nil && r.GetId() == req.Id {
			return r
		}
		l.seen = append(l.seen, m)
	}
}

// ok sends req and fails the test unless it succeeds.
func (l *testLink) ok(req *imqpb.NodeRequest) *imqpb.NodeReply {
	l.t.Helper()
	r := l.do(req)
	if r.GetCode() != imqpb.Code_OK {
		l.t.Fatalf("%v: %v %s", req, r.GetCode(), r.GetMessage())
	}
	return r
}

// sync returns every frame the node sent before it answered a ping sent now,
// and forgets them.
func (l *testLink) sync() []*imqpb.LinkDown {
	l.t.Helper()
	l.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Ping{Ping: &imqpb.Ping{}}})
	for {
		m := l.read()
		if m.GetPong() != nil {
			out := l.seen
			l.seen = nil
			return out
		}
		l.seen = append(l.seen, m)
	}
}

// closedQueues returns the QueueClosed frames in frames, failing the test on
// one whose reason is not MOVED.
func closedQueues(t *testing.T, frames []*imqpb.LinkDown) []string {
	t.Helper()
	var out []string
	for _, m := range frames {
		if qc := m.GetQueueClosed(); qc != nil {
			if qc.GetReason() != imqpb.Reason_REASON_MOVED || qc.GetMessage() == "" {
				t.Fatalf("QueueClosed %v: want reason MOVED and a message", qc)
			}
			out = append(out, qc.GetQueue())
		}
	}
	slices.Sort(out)
	return out
}

func joinReq(queue, session string, mounts ...string) *imqpb.NodeRequest {
	j := &imqpb.Join{Queue: queue}
	for _, m := range mounts {
		j.Mounts = append(j.Mounts, msgSpec(m))
	}
	return &imqpb.NodeRequest{User: "u-" + session, Session: session, Op: &imqpb.NodeRequest_Join{Join: j}}
}

func leaveReq(queue, session string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: "u-" + session, Session: session, Op: &imqpb.NodeRequest_Leave{Leave: &imqpb.Leave{Queue: queue}}}
}

func publishReq(queue, mount string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: "alice", Session: "s-alice", Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: mount, Payload: []byte(`"hi"`),
	}}}
}

func setStateReq(queue, mount, key string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: "alice", Session: "s-alice", Op: &imqpb.NodeRequest_SetState{SetState: &imqpb.SetState{
		Queue: queue, Mount: mount, Key: key, Value: []byte("1"),
	}}}
}

// queuesWhere returns n queue names for which pred holds.
func queuesWhere(t *testing.T, n int, pred func(queue string) bool) []string {
	t.Helper()
	var out []string
	for i := 0; len(out) < n; i++ {
		if i > 100_000 {
			t.Fatal("no such queues")
		}
		if q := fmt.Sprintf("/room/%d", i); pred(q) {
			out = append(out, q)
		}
	}
	return out
}

func owner(table *bucket.Table, queue string) string {
	n, _ := table.Lookup(queue)
	return n.ID
}

// twoNodeTables returns v1 (a owns everything), v2 (a and b) and v3 (a, b
// and c: some of a's buckets move to c).
func twoNodeTables(t *testing.T) (v1, v2, v3 *bucket.Table) {
	t.Helper()
	v1 = bucket.Single(bucket.Node{ID: "a", LinkAddr: "127.0.0.1:1"})
	v2, _, err := v1.Join(bucket.Node{ID: "b", LinkAddr: "127.0.0.1:2"})
	if err != nil {
		t.Fatal(err)
	}
	v3, _, err = v2.Join(bucket.Node{ID: "c", LinkAddr: "127.0.0.1:3"})
	if err != nil {
		t.Fatal(err)
	}
	return v1, v2, v3
}

func (s *Server) hasQueue(name string) bool {
	sh := s.shardFor(name)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return sh.queues[name] != nil
}

// TestClusterNodeWaitsForTable: before its first table the node serves no
// queue and answers MOVED by table 0, which a gateway routing by a real
// table retries (the node being the one behind) rather than failing.
func TestClusterNodeWaitsForTable(t *testing.T) {
	s := startClusterNode(t, "a")
	l := dialLink(t, s.LinkAddr(), "gw-1")
	if v := l.fr.TableVersion(); v != 0 {
		t.Fatalf("hello ack table version %d before any table, want 0", v)
	}
	for _, req := range []*imqpb.NodeRequest{joinReq("/room/1", "s1", "chat"), publishReq("/room/1", "chat"), setStateReq("/room/1", "score", "k")} {
		r := l.do(req)
		if r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 0 || r.GetMessage() == "" {
			t.Fatalf("%v without a table: %v %q (table %d), want MOVED by table 0", req.GetOp(), r.GetCode(), r.GetMessage(), r.GetTableVersion())
		}
	}
	if s.queueCount.Load() != 0 {
		t.Fatalf("%d queues created without a table", s.queueCount.Load())
	}
}

func TestClusterOwnership(t *testing.T) {
	s := startClusterNode(t, "a")
	_, v2, _ := twoNodeTables(t)
	s.setTable(v2)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	if v := l.fr.TableVersion(); v != 2 {
		t.Fatalf("hello ack table version %d, want 2", v)
	}
	mine := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "a" })[0]
	theirs := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "b" })[0]

	if j := l.ok(joinReq(mine, "s1", "chat")).GetJoined(); j.GetEpoch() == 0 {
		t.Fatalf("join %s: %v", mine, j)
	}
	if off := l.ok(publishReq(mine, "chat")).GetPublished().GetOffset(); off != 1 {
		t.Fatalf("publish offset %d, want 1", off)
	}
	l.ok(setStateReq(mine, "score", "k"))
	l.ok(leaveReq(mine, "s1"))

	for _, req := range []*imqpb.NodeRequest{joinReq(theirs, "s1", "chat"), publishReq(theirs, "chat"), setStateReq(theirs, "score", "k")} {
		r := l.do(req)
		if r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 2 || r.GetMessage() == "" {
			t.Fatalf("%v on another node's queue: %v v%d %q, want MOVED v2", req.GetOp(), r.GetCode(), r.GetTableVersion(), r.GetMessage())
		}
	}
	if got := counterValue(t, s.m.movedReplies); got != 3 {
		t.Fatalf("moved replies counted %v, want 3", got)
	}
	// Leave needs no ownership: the session is simply not joined.
	if r := l.do(leaveReq(theirs, "s1")); r.GetCode() != imqpb.Code_NOT_JOINED {
		t.Fatalf("leave on another node's queue: %v, want NOT_JOINED", r.GetCode())
	}
	if s.hasQueue(theirs) {
		t.Fatalf("a queue of node b was created on node a")
	}
}

func TestClusterTableChangeClosesMovedQueues(t *testing.T) {
	s := startClusterNode(t, "a")
	_, v2, v3 := twoNodeTables(t)
	s.setTable(v2)
	stays := func(q string) bool { return owner(v2, q) == "a" && owner(v3, q) == "a" }
	moves := func(q string) bool { return owner(v2, q) == "a" && owner(v3, q) == "c" }
	kept := queuesWhere(t, 2, stays)
	moved := queuesWhere(t, 3, moves)

	gwA, gwB := dialLink(t, s.LinkAddr(), "gw-a"), dialLink(t, s.LinkAddr(), "gw-b")
	// gw-a: two sessions on moved[0] (different mounts), one on moved[1]
	// and kept[0]. gw-b: kept[0] and kept[1] only. moved[2] holds history
	// and no subscribers.
	gwA.ok(joinReq(moved[0], "a1", "chat"))
	gwA.ok(joinReq(moved[0], "a2", "input", "chat"))
	gwA.ok(joinReq(moved[1], "a1", "chat"))
	keptEpoch := gwA.ok(joinReq(kept[0], "a1", "chat")).GetJoined().GetEpoch()
	gwB.ok(joinReq(kept[0], "b1", "chat"))
	gwB.ok(joinReq(kept[1], "b1", "chat"))
	gwB.ok(publishReq(moved[2], "chat"))
	gwB.ok(publishReq(kept[0], "chat"))
	gwA.sync()
	gwB.sync()
	before := s.queueCount.Load()

	s.setTable(v3)

	if got, want := closedQueues(t, gwA.sync()), []string{moved[0], moved[1]}; !slices.Equal(got, want) {
		t.Fatalf("gw-a was told of closed queues %v, want %v once each", got, want)
	}
	if got := closedQueues(t, gwB.sync()); len(got) != 0 {
		t.Fatalf("gw-b, with no subscriber to a moved queue, was told of closed queues %v", got)
	}
	for _, q := range moved {
		if s.hasQueue(q) {
			t.Fatalf("moved queue %s still on the node", q)
		}
		if r := gwA.do(joinReq(q, "a1", "chat")); r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 3 {
			t.Fatalf("join moved queue %s: %v v%d, want MOVED v3", q, r.GetCode(), r.GetTableVersion())
		}
	}
	if got := s.queueCount.Load(); got != before-3 {
		t.Fatalf("%d queues after the move, want %d", got, before-3)
	}
	if got := counterValue(t, s.m.queuesMoved); got != 3 {
		t.Fatalf("queues moved counted %v, want 3", got)
	}

	// The kept queues are untouched: same epoch, history, subscribers.
	if j := gwB.ok(joinReq(kept[0], "b2", "chat")).GetJoined(); j.GetEpoch() != keptEpoch || j.GetHead() != 1 {
		t.Fatalf("kept queue after the move: epoch %d head %d, want epoch %d head 1", j.GetEpoch(), j.GetHead(), keptEpoch)
	}
	if off := gwA.ok(publishReq(kept[0], "chat")).GetPublished().GetOffset(); off != 2 {
		t.Fatalf("publish on kept queue: offset %d, want 2", off)
	}
	for _, l := range []*testLink{gwA, gwB} {
		delivered := 0
		for _, m := range l.sync() {
			if d := m.GetDeliver(); d != nil && d.GetQueue() == kept[0] {
				delivered++
			}
		}
		if delivered != 1 {
			t.Fatalf("a gateway subscribed to the kept queue got %d deliveries, want 1", delivered)
		}
	}

	if v := s.cluster.Member().Meta().TableVersion; v != 3 {
		t.Fatalf("membership advertises table version %d, want 3", v)
	}
	vz := s.varz().(Varz)
	if vz.TableVersion != 3 || vz.BucketsOwned != v3.Counts()["a"] || vz.BucketsOwned == 0 {
		t.Fatalf("varz table v%d, %d buckets owned; want v3, %d", vz.TableVersion, vz.BucketsOwned, v3.Counts()["a"])
	}
	// An older table is ignored.
	s.setTable(v2)
	if v := s.currentTable().Version(); v != 3 {
		t.Fatalf("table version %d after offering an older one, want 3", v)
	}
}

func TestTableEndpoint(t *testing.T) {
	get := func(t *testing.T, s *Server) *bucket.Table {
		t.Helper()
		mux := http.NewServeMux()
		s.HandleHTTP(mux)
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		resp, err := http.Get(srv.URL + cluster.TablePath)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s", cluster.TablePath, resp.Status)
		}
		table, err := cluster.DecodeTable(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if h := resp.Header.Get("X-IMQ-Table-Version"); h != strconv.FormatUint(table.Version(), 10) {
			t.Fatalf("version header %q for table v%d", h, table.Version())
		}
		return table
	}
	t.Run("cluster", func(t *testing.T) {
		s := startClusterNode(t, "a")
		_, v2, _ := twoNodeTables(t)
		s.setTable(v2)
		if got := get(t, s.Server); got.Version() != 2 || got.Buckets() != v2.Buckets() || owner(got, "/room/1") != owner(v2, "/room/1") {
			t.Fatalf("served %v, want %v", got, v2)
		}
	})
	t.Run("standalone", func(t *testing.T) {
		cfg := DefaultConfig()
		s := startNode(t, cfg)
		if got := get(t, s); got.Version() != 0 || got.Buckets() != 0 {
			t.Fatalf("standalone node served %v, want an empty table", got)
		}
	})
}

// TestStandaloneIgnoresTables: without membership the node owns every queue
// whatever table version a gateway routed by.
func TestStandaloneIgnoresTables(t *testing.T) {
	s := startNode(t, DefaultConfig())
	l := dialLink(t, s.LinkAddr(), "gw-1")
	if v := l.fr.TableVersion(); v != 0 {
		t.Fatalf("standalone hello ack table version %d, want 0", v)
	}
	req := joinReq("/room/1", "s1", "chat")
	req.TableVersion = 9
	l.ok(req)
	req = publishReq("/room/1", "chat")
	req.TableVersion = 9
	l.ok(req)
	if vz := s.varz().(Varz); vz.TableVersion != 0 || vz.BucketsOwned != 0 {
		t.Fatalf("standalone varz: %+v", vz)
	}
}

// TestClusterFollowsBoss: the node finds the boss through the membership,
// fetches its table, advertises the version it holds, and asks again at once
// when a gateway routed by a newer table.
func TestClusterFollowsBoss(t *testing.T) {
	s := startClusterNode(t, "a")
	v1, v2, _ := twoNodeTables(t)
	boss, srv := clustertest.StartBoss(t, v1)
	bm := startMember(t, s, member.Meta{Role: member.RoleBoss, ID: "boss", HTTPAddr: srv.Listener.Addr().String()})
	// What the boss hears of the node's table version.
	nodeAdvertises := func(v uint64) func() bool {
		return func() bool {
			for _, p := range bm.Peers() {
				if p.Meta.ID == "a" {
					return p.Meta.TableVersion == v
				}
			}
			return false
		}
	}

	testutil.WaitFor(t, waitFor, "the node to fetch table v1", func() bool { return s.currentTable().Version() == 1 })
	testutil.WaitFor(t, waitFor, "the boss to hear the node holds table v1", nodeAdvertises(1))
	testutil.WaitFor(t, waitFor, "the node to long-poll for a table after v1", func() bool { return boss.Polls(1) == 1 })

	l := dialLink(t, s.LinkAddr(), "gw-1")
	req := publishReq("/room/1", "chat")
	req.TableVersion = 2 // the gateway knows a newer table than the node
	// Fencing: the node does not serve by its older table; it asks the boss
	// and, the table not coming within fenceWait, answers UNAVAILABLE.
	if r := l.do(req); r.GetCode() != imqpb.Code_UNAVAILABLE {
		t.Fatalf("publish routed by a newer table the node cannot fetch: %v %s, want UNAVAILABLE", r.GetCode(), r.GetMessage())
	}
	if s.hasQueue("/room/1") {
		t.Fatal("the node served a request routed by a newer table by its older one")
	}
	testutil.WaitFor(t, waitFor, "the kicked node to poll again", func() bool { return boss.Polls(1) >= 2 })

	boss.Set(v2)
	testutil.WaitFor(t, waitFor, "the node to fetch table v2", func() bool { return s.currentTable().Version() == 2 })
	testutil.WaitFor(t, waitFor, "the boss to hear the node holds table v2", nodeAdvertises(2))
	if l2 := dialLink(t, s.LinkAddr(), "gw-2"); l2.fr.TableVersion() != 2 {
		t.Fatalf("hello ack table version %d, want 2", l2.fr.TableVersion())
	}
}

// TestClusterClosesLinksOfDeadGateway: a gateway that leaves the membership
// has its links closed and its subscribers removed even though its TCP
// connections stay open; other gateways' links stay.
func TestClusterClosesLinksOfDeadGateway(t *testing.T) {
	s := startClusterNode(t, "a")
	v1, _, _ := twoNodeTables(t)
	s.setTable(v1)
	gm := startMember(t, s, member.Meta{Role: member.RoleGateway, ID: "gw-gone"})
	gone, stays := dialLink(t, s.LinkAddr(), "gw-gone"), dialLink(t, s.LinkAddr(), "gw-stays")
	gone.ok(joinReq("/room/1", "g1", "chat"))
	stays.ok(joinReq("/room/1", "s1", "chat"))
	testutil.WaitFor(t, waitFor, "the node to see the gateway member", func() bool {
		s.gwMu.Lock()
		defer s.gwMu.Unlock()
		return s.liveGateways["gw-gone"]
	})

	if err := gm.Close(time.Second); err != nil {
		t.Fatal(err)
	}
	gone.c.SetReadDeadline(time.Now().Add(waitFor))
	for {
		if _, err := gone.fr.Next(); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the link of the departed gateway is still open")
			}
			break
		}
	}
	testutil.WaitFor(t, waitFor, "the departed gateway's subscribers to be removed", func() bool {
		sh := s.shardFor("/room/1")
		sh.mu.Lock()
		defer sh.mu.Unlock()
		q := sh.queues["/room/1"]
		return q != nil && q.Subscribers() == 1
	})
	if n := s.linkCount(); n != 1 {
		t.Fatalf("%d links, want only gw-stays's", n)
	}
	stays.ok(publishReq("/room/1", "chat"))
	if got := counterValue(t, s.m.deadGatewayLinks); got != 1 {
		t.Fatalf("dead gateway links counted %v, want 1", got)
	}
}

func TestClusterConfigValidated(t *testing.T) {
	cfg := DefaultConfig()
	cfg.LinkAddr = "127.0.0.1:0"
	cfg.Member = testMemberConfig()
	cfg.Member.ProbeInterval, cfg.Member.ProbeTimeout = time.Second, time.Second
	if s, err := New(cfg); err == nil {
		s.Shutdown(context.Background())
		t.Fatal("New accepted a membership config whose probe timeout is not shorter than its interval")
	}
}

// TestClusterRunContextShutsDown: ending Run's context shuts the node down
// as Shutdown does: its links close and it leaves the membership, rather
// than staying a live member that no longer takes links.
func TestClusterRunContextShutsDown(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.LinkAddr, cfg.Member = "a", "127.0.0.1:0", testMemberConfig()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := &testNode{Server: s, gossip: s.cluster.Member().Addr()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		sctx, scancel := context.WithTimeout(context.Background(), waitFor)
		defer scancel()
		s.Shutdown(sctx)
	})
	observer := startMember(t, n, member.Meta{Role: member.RoleGateway, ID: "observer"})
	sees := func() bool {
		for _, p := range observer.Peers() {
			if p.Meta.ID == "a" {
				return true
			}
		}
		return false
	}
	testutil.WaitFor(t, waitFor, "the observer to see the node", sees)
	l := dialLink(t, s.LinkAddr(), "gw-1")

	cancel()
	l.c.SetReadDeadline(time.Now().Add(waitFor))
	for {
		if _, err := l.fr.Next(); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the link is still open after Run's context ended")
			}
			break
		}
	}
	testutil.WaitFor(t, waitFor, "the node to leave the membership", func() bool { return !sees() })
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(waitFor):
		t.Fatal("Run did not return")
	}
}
