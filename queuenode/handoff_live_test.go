package queuenode

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster/clustertest"
	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// startHandoffBoss runs a real boss with two-phase moves, one at a time.
func startHandoffBoss(t *testing.T) *boss.Boss {
	t.Helper()
	b, err := boss.New(boss.Config{
		HTTPAddr: "127.0.0.1:0", Member: *testMemberConfig(), Ephemeral: true,
		Handoff: true, MaxMoves: 1, MoveTimeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- b.Run(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		b.Shutdown(ctx)
		<-done
	})
	return b
}

// startJoinableNode runs a cluster node that has not joined yet: join() joins
// it to the boss's membership. tune, if any, adjust its config.
func startJoinableNode(t *testing.T, id string, tune ...func(*Config)) (s *Server, join func(b *boss.Boss)) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member = id, testMemberConfig()
	for _, f := range tune {
		f(&cfg)
	}
	s = startNode(t, cfg)
	return s, func(b *boss.Boss) {
		if _, err := s.cluster.Member().Join([]string{b.GossipAddr()}); err != nil {
			t.Fatal(err)
		}
	}
}

// fakeGateway acts as a gateway toward queue nodes: one link to each, a
// reader per link recording every frame, and, on a BucketMoving, a
// BucketAdopted to the target unless the test holds it back.
type fakeGateway struct {
	t     *testing.T
	id    string
	links map[string]*imqlink.Conn // by node id; set before the readers start

	mu       sync.Mutex
	frames   map[string][]*imqpb.LinkDown // by node id, in arrival order
	replies  map[uint64]chan *imqpb.NodeReply
	holdBack bool                  // do not confirm marks (the test does)
	moving   []*imqpb.BucketMoving // marks seen
	nextID   atomic.Uint64
}

func newFakeGateway(t *testing.T, id string, nodes ...*Server) *fakeGateway {
	g := &fakeGateway{t: t, id: id, links: make(map[string]*imqlink.Conn), frames: make(map[string][]*imqpb.LinkDown),
		replies: make(map[uint64]chan *imqpb.NodeReply)}
	for _, n := range nodes {
		c, err := imqlink.Dial(context.Background(), n.LinkAddr(), imqlink.Config{
			Role: imqlink.RoleGateway, ID: id, PeerRoles: []imqpb.LinkRole{imqlink.RoleNode}, Timeout: time.Minute,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(nil) })
		go c.WriteLoop()
		g.links[n.NodeID()] = c
	}
	for node, c := range g.links {
		go g.read(node, c)
	}
	return g
}

func (g *fakeGateway) read(node string, c *imqlink.Conn) {
	for {
		b, err := c.Next()
		if err != nil {
			return
		}
		m := &imqpb.LinkDown{}
		if err := proto.Unmarshal(b, m); err != nil {
			return
		}
		g.mu.Lock()
		g.frames[node] = append(g.frames[node], m)
		if r := m.GetReply(); r != nil {
			if ch := g.replies[r.GetId()]; ch != nil {
				ch <- r
				delete(g.replies, r.GetId())
			}
		}
		mv := m.GetBucketMoving()
		if mv != nil {
			g.moving = append(g.moving, mv)
		}
		hold := g.holdBack
		g.mu.Unlock()
		if mv != nil && !hold {
			g.adopted(mv)
		}
	}
}

func (g *fakeGateway) adopted(mv *imqpb.BucketMoving) {
	b, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_BucketAdopted{BucketAdopted: &imqpb.BucketAdopted{
		Bucket: mv.GetBucket(), Bits: mv.GetBits(),
	}}})
	c := g.links[mv.GetToNode()]
	if c == nil {
		g.t.Errorf("%s: mark %v names a node it has no link to", g.id, mv)
		return
	}
	c.SendAlways(b)
}

func (g *fakeGateway) do(node string, req *imqpb.NodeRequest) *imqpb.NodeReply {
	g.t.Helper()
	req.Id = g.nextID.Add(1)
	ch := make(chan *imqpb.NodeReply, 1)
	g.mu.Lock()
	g.replies[req.Id] = ch
	g.mu.Unlock()
	b, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	g.links[node].SendAlways(b)
	select {
	case r := <-ch:
		return r
	case <-time.After(waitFor):
		g.t.Fatalf("no reply from %s to %v", node, req)
		return nil
	}
}

func (g *fakeGateway) ok(node string, req *imqpb.NodeRequest) *imqpb.NodeReply {
	g.t.Helper()
	r := g.do(node, req)
	if r.GetCode() != imqpb.Code_OK {
		g.t.Fatalf("%s: %v: %v %s", node, req, r.GetCode(), r.GetMessage())
	}
	return r
}

// seen returns a copy of the frames node sent.
func (g *fakeGateway) seen(node string) []*imqpb.LinkDown {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]*imqpb.LinkDown(nil), g.frames[node]...)
}

// offsets returns the offsets of queue's events among frames, and the
// index of the first BucketMoving for bucket (-1: none) relative to them.
func offsets(t *testing.T, frames []*imqpb.LinkDown, queue string) (offs []uint64, markAt int) {
	t.Helper()
	markAt = -1
	for _, m := range frames {
		if m.GetBucketMoving() != nil && markAt < 0 && bucket.Of(queue, int(m.GetBucketMoving().GetBits())) == int(m.GetBucketMoving().GetBucket()) {
			markAt = len(offs)
		}
		d := m.GetDeliver()
		if d == nil || d.GetQueue() != queue {
			continue
		}
		var sm imqpb.ServerMessage
		if err := proto.Unmarshal(d.GetFrame(), &sm); err != nil {
			t.Fatal(err)
		}
		if ev := sm.GetEvent(); ev != nil {
			offs = append(offs, ev.GetOffset())
		}
	}
	return offs, markAt
}

func userPub(session, queue string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: "u-" + session, Session: session, Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: "chat", Payload: []byte(`"x"`),
	}}}
}

func queueState(s *Server, name string) (epoch, head uint64, ok bool) {
	sh := s.shardFor(name)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	q := sh.queues[name]
	if q == nil {
		return 0, 0, false
	}
	return q.Epoch(), q.Head(), true
}

// TestHandoffLive: a bucket with queues (history, state, subscribers of two
// gateways) moves from a to b with a real boss: same epoch, offsets,
// history and state on b; each gateway sees the mark on a's link after a's
// last event of the queue and b's events only after it confirms, in order,
// no gap, no duplicate; a request sent to a meanwhile is forwarded and
// answered as served by b; the boss flips the bucket on a's report; after
// the grace, a answers MOVED.
func TestHandoffLive(t *testing.T) {
	bs := startHandoffBoss(t)
	a, joinA := startJoinableNode(t, "a", func(c *Config) { c.HandoffGrace = 300 * time.Millisecond })
	joinA(bs)
	testutil.WaitFor(t, 10*time.Second, "a to own every bucket", func() bool {
		tb := a.currentTable()
		return tb.Buckets() > 0 && tb.Counts()["a"] == tb.Buckets()
	})
	b, joinB := startJoinableNode(t, "b")
	gw1 := newFakeGateway(t, "gw-1", a, b)
	gw2 := newFakeGateway(t, "gw-2", a, b)
	gw2.holdBack = true

	// One queue per bucket of a table split twice (the boss splits the
	// table when b joins), each with history, state and a subscriber on
	// each gateway.
	bits := a.currentTable().Bits() + 2
	queues := make([]string, 1<<bits)
	for bk := range queues {
		queues[bk] = queuesWhere(t, 1, func(q string) bool { return bucket.Of(q, bits) == bk })[0]
		q := queues[bk]
		gw1.ok("a", joinReq(q, "s1", "chat"))
		gw1.ok("a", joinReq(q, "s3", "chat")) // leaves below, through a
		gw2.ok("a", joinReq(q, "s2", "chat"))
		for range 3 {
			gw1.ok("a", userPub("s1", q))
		}
		gw1.ok("a", setStateReq(q, "score", "k"))
	}
	epochs := make(map[string]uint64)
	for _, q := range queues {
		epochs[q], _, _ = queueState(a, q)
	}

	joinB(bs)
	testutil.WaitFor(t, 10*time.Second, "a's first mark on gw-2's link", func() bool {
		gw2.mu.Lock()
		defer gw2.mu.Unlock()
		return len(gw2.moving) > 0
	})
	gw2.mu.Lock()
	mv := gw2.moving[0]
	gw2.mu.Unlock()
	if mv.GetToNode() != "b" {
		t.Fatalf("mark %v, want to b", mv)
	}
	k := bkey{bits: int(mv.GetBits()), b: int(mv.GetBucket())}
	var q string
	for _, name := range queues {
		if k.has(name) {
			q = name
		}
	}
	if q == "" {
		t.Fatalf("no queue in the bucket of mark %v", mv)
	}
	testutil.WaitFor(t, waitFor, "b to adopt "+q, func() bool { _, _, ok := queueState(b, q); return ok })
	if e, h, _ := queueState(b, q); e != epochs[q] || h != 4 {
		t.Fatalf("%s on b: epoch %d head %d, want epoch %d head 4", q, e, h, epochs[q])
	}

	// A publish sent to a is answered MOVED (the gateway's lane sends it
	// again to b by the table, in order); here the gateway sends it to b.
	if r := gw1.do("a", userPub("s1", q)); r.GetCode() != imqpb.Code_MOVED {
		t.Fatalf("publish through a after the hand-off: %v %s, want MOVED", r.GetCode(), r.GetMessage())
	}
	if r := gw1.ok("b", userPub("s1", q)); r.GetPublished().GetOffset() != 5 {
		t.Fatalf("publish on b after the hand-off: offset %d, want 5", r.GetPublished().GetOffset())
	}
	// A leave without a reply (its connection went) is forwarded to b,
	// which drops the subscriber.
	leave, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: leaveReq(q, "s3")}})
	if err := gw1.links["a"].Send(leave); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitFor, "b to drop s3, whose leave went to a", func() bool {
		sh := b.shardFor(q)
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return sh.queues[q] != nil && sh.queues[q].Subscribers() == 2
	})
	// A join sent to a is answered MOVED too.
	jr := gw1.do("a", &imqpb.NodeRequest{User: "u-s9", Session: "s9", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
		Queue: q, Mounts: []*imqpb.MountSpec{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}},
	}}})
	if jr.GetCode() != imqpb.Code_MOVED {
		t.Fatalf("join through a after the hand-off: %v %s, want MOVED", jr.GetCode(), jr.GetMessage())
	}
	// gw-1 confirmed at once: its event comes from b. gw-2 has not: b holds it.
	testutil.WaitFor(t, waitFor, "gw-1 to get offset 5 from b", func() bool {
		offs, _ := offsets(t, gw1.seen("b"), q)
		return len(offs) == 1 && offs[0] == 5
	})
	time.Sleep(50 * time.Millisecond)
	if offs, _ := offsets(t, gw2.seen("b"), q); len(offs) != 0 {
		t.Fatalf("gw-2 got events %v from b before it confirmed the mark", offs)
	}
	gw2.adopted(mv)
	testutil.WaitFor(t, waitFor, "gw-2 to get offset 5 from b once it confirmed", func() bool {
		offs, _ := offsets(t, gw2.seen("b"), q)
		return len(offs) == 1 && offs[0] == 5
	})
	for _, g := range []*fakeGateway{gw1, gw2} {
		offs, markAt := offsets(t, g.seen("a"), q)
		if fmt.Sprint(offs) != "[1 2 3]" || markAt != 3 {
			t.Fatalf("%s on a's link: offsets %v, mark after %d of them; want [1 2 3], the mark after all 3", g.id, offs, markAt)
		}
	}
	// History and state came along.
	st := gw1.ok("b", &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_GetState{GetState: &imqpb.GetState{Queue: q, Mount: "score"}}})
	if st.GetState().GetEpoch() != epochs[q] || len(st.GetState().GetEntries()) != 1 {
		t.Fatalf("state of %s on b: %v", q, st.GetState())
	}

	// The boss flips the bucket on a's report; after the grace a answers MOVED.
	testutil.WaitFor(t, 10*time.Second, "the boss to give the bucket to b", func() bool {
		return tableCovers(bs.Table(), k, "b")
	})
	testutil.WaitFor(t, 10*time.Second, "a to answer MOVED for "+q, func() bool {
		return gw1.do("a", userPub("s1", q)).GetCode() == imqpb.Code_MOVED
	})
	if got := counterValue(t, a.m.forwarded); got != 1 {
		t.Fatalf("forwarded requests counted %v, want 1 (the leave)", got)
	}
	if _, _, ok := queueState(a, q); ok {
		t.Fatalf("%s is still on a", q)
	}
}

// TestHandoffTargetDiesMidStream: the target closes the node link after the
// first frame of queues; a keeps the bucket, same epoch, ends the marked
// gateway's subscriptions honestly (QueueClosed), and serves again.
func TestHandoffTargetDiesMidStream(t *testing.T) {
	bs := startHandoffBoss(t)
	a, joinA := startJoinableNode(t, "a", func(c *Config) { c.HandoffRetry = time.Minute })
	joinA(bs)
	testutil.WaitFor(t, 10*time.Second, "a to own every bucket", func() bool {
		tb := a.currentTable()
		return tb.Buckets() > 0 && tb.Counts()["a"] == tb.Buckets()
	})
	// A fake b: accepts the node link, reads one frame, closes.
	ln := startFakeTarget(t, func(conn *imqlink.Conn) {
		conn.Next()
		conn.Close(nil)
	})
	gw := newFakeGateway(t, "gw-1", a)
	gw.holdBack = true
	bits := a.currentTable().Bits() + 2
	queues := make([]string, 1<<bits)
	for bk := range queues {
		queues[bk] = queuesWhere(t, 1, func(q string) bool { return bucket.Of(q, bits) == bk })[0]
		gw.ok("a", joinReq(queues[bk], "s1", "chat"))
		gw.ok("a", userPub("s1", queues[bk]))
	}
	epochs := make(map[string]uint64)
	for _, q := range queues {
		epochs[q], _, _ = queueState(a, q)
	}
	m, err := member.Start(*testMemberConfig(), member.Meta{Role: member.RoleQueueNode, ID: "b", LinkAddr: ln.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(time.Second) })
	if _, err := m.Join([]string{bs.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "a hand-off to fail mid-stream", func() bool {
		return counterValue(t, a.m.handoffsFailed.WithLabelValues(failStream)) > 0
	})
	var mv *imqpb.BucketMoving
	testutil.WaitFor(t, waitFor, "the mark and the honest close", func() bool {
		gw.mu.Lock()
		defer gw.mu.Unlock()
		if len(gw.moving) == 0 {
			return false
		}
		mv = gw.moving[0]
		return len(closedOf(gw.frames["a"])) > 0
	})
	k := bkey{bits: int(mv.GetBits()), b: int(mv.GetBucket())}
	testutil.WaitFor(t, waitFor, "a to run the bucket again", func() bool {
		out, _ := a.ho.counts()
		return out == 0
	})
	var inBucket []string
	for _, q := range queues {
		if k.has(q) {
			inBucket = append(inBucket, q)
		}
	}
	slices.Sort(inBucket)
	got := closedOf(gw.seen("a"))
	slices.Sort(got)
	if fmt.Sprint(got) != fmt.Sprint(inBucket) {
		t.Fatalf("QueueClosed for %v, want %v", got, inBucket)
	}
	for _, q := range inBucket {
		if e, h, ok := queueState(a, q); !ok || e != epochs[q] || h != 1 {
			t.Fatalf("%s after the failed hand-off: epoch %d head %d (held %v), want epoch %d head 1", q, e, h, ok, epochs[q])
		}
		if r := gw.ok("a", userPub("s1", q)); r.GetPublished().GetOffset() != 2 || r.GetServedBy() != "" {
			t.Fatalf("publish after the failed hand-off: %v", r)
		}
	}
}

func closedOf(frames []*imqpb.LinkDown) []string {
	var out []string
	for _, m := range frames {
		if qc := m.GetQueueClosed(); qc != nil {
			out = append(out, qc.GetQueue())
		}
	}
	return out
}

// TestHandoffTableRules: a bucket the table marks moving away keeps its
// queues (the node hands them off); one the table gives to another node
// with no move (the boss thought this node dead) is closed honestly.
func TestHandoffTableRules(t *testing.T) {
	s := startClusterNode(t, "a", func(c *Config) { c.HandoffRetry = time.Minute })
	v1 := bucket.Single(bucket.Node{ID: "a", LinkAddr: s.LinkAddr()})
	s.setTable(v1)
	layout, _, err := v1.Join(bucket.Node{ID: "b", LinkAddr: testutil.ClosedAddr(t)})
	if err != nil {
		t.Fatal(err)
	}
	marked, _ := v1.Advance(layout, layout.Nodes(), 64, nil)
	if marked.MovingCount() == 0 {
		t.Fatal("no move marked")
	}
	mvb := marked.Moving()[0].Bucket
	q := queuesWhere(t, 1, func(q string) bool { return marked.Bucket(q) == mvb })[0]
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(joinReq(q, "s1", "chat"))
	l.sync()
	s.setTable(marked)
	testutil.WaitFor(t, waitFor, "the hand-off to b (unreachable) to fail", func() bool {
		return counterValue(t, s.m.handoffsFailed.WithLabelValues(failDial)) > 0
	})
	if !s.hasQueue(q) || len(closedQueues(t, l.sync())) != 0 {
		t.Fatal("a queue of a bucket marked moving away was dropped")
	}
	settled := marked.Settled() // b owns it with no hand-off done
	s.setTable(settled)
	if s.hasQueue(q) {
		t.Fatal("a queue of a bucket given to another node at once was kept")
	}
	if got := closedQueues(t, l.sync()); len(got) != 1 || got[0] != q {
		t.Fatalf("QueueClosed for %v, want [%s]", got, q)
	}
}

// TestFenceWaitsForNewerTable: a request routed by a newer table than the
// node holds waits for that table, then is decided by it: a node that
// lost the bucket answers MOVED by the new table rather than serving (or
// answering by) its old one.
func TestFenceWaitsForNewerTable(t *testing.T) {
	s := startClusterNode(t, "a")
	v1 := bucket.Single(bucket.Node{ID: "a", LinkAddr: s.LinkAddr()})
	v2, _, err := v1.Join(bucket.Node{ID: "b", LinkAddr: "127.0.0.1:2"})
	if err != nil {
		t.Fatal(err)
	}
	q := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "b" })[0]
	fb, srv := clustertest.StartBoss(t, v1)
	startMember(t, s, member.Meta{Role: member.RoleBoss, ID: "boss", HTTPAddr: srv.Listener.Addr().String()})
	testutil.WaitFor(t, waitFor, "table v1", func() bool { return s.currentTable().Version() == 1 })
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(joinReq(q, "s1", "chat"))
	go func() {
		time.Sleep(200 * time.Millisecond)
		fb.Set(v2)
	}()
	req := publishReq(q, "chat")
	req.TableVersion = 2
	r := l.do(req)
	if r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 2 {
		t.Fatalf("publish routed by v2 to a node holding v1: %v v%d %s, want MOVED by v2", r.GetCode(), r.GetTableVersion(), r.GetMessage())
	}
	if s.hasQueue(q) {
		t.Fatal("the queue outlived the newer table")
	}
}

// TestHandoffBoundsFromConfig: the old owner's hand-off bounds are its
// own Config's. With a target that never acks, a's HandoffTimeout ends the
// hand-off (a keeps the bucket); meanwhile /varz shows the bucket moving
// out, and a's HandoffHoldBytes holds four publishes of the frozen bucket
// and answers the rest UNAVAILABLE; the held ones then run on a.
func TestHandoffBoundsFromConfig(t *testing.T) {
	bs := startHandoffBoss(t)
	a, joinA := startJoinableNode(t, "a", func(c *Config) {
		c.HandoffTimeout = 2 * time.Second
		c.HandoffRetry = time.Minute
		c.HandoffHoldBytes = 4 * c.Limits.MaxPayload
	})
	joinA(bs)
	testutil.WaitFor(t, 10*time.Second, "a to own every bucket", func() bool {
		tb := a.currentTable()
		return tb.Buckets() > 0 && tb.Counts()["a"] == tb.Buckets()
	})
	// A fake b: accepts the node link and reads it, never answering.
	ln := startFakeTarget(t, func(conn *imqlink.Conn) {
		for {
			if _, err := conn.Next(); err != nil {
				return
			}
		}
	})
	gw := newFakeGateway(t, "gw-1", a)
	gw.holdBack = true
	bits := a.currentTable().Bits() + 2
	queues := make([]string, 1<<bits)
	for bk := range queues {
		queues[bk] = queuesWhere(t, 1, func(q string) bool { return bucket.Of(q, bits) == bk })[0]
		gw.ok("a", joinReq(queues[bk], "s1", "chat"))
	}
	m, err := member.Start(*testMemberConfig(), member.Meta{Role: member.RoleQueueNode, ID: "b", LinkAddr: ln.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(time.Second) })
	if _, err := m.Join([]string{bs.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	var mv *imqpb.BucketMoving
	testutil.WaitFor(t, 10*time.Second, "a's mark", func() bool {
		gw.mu.Lock()
		defer gw.mu.Unlock()
		if len(gw.moving) > 0 {
			mv = gw.moving[0]
		}
		return mv != nil
	})
	if v := a.varz().(Varz); v.BucketsMovingOut != 1 {
		t.Fatalf("/varz during the hand-off: %d buckets moving out, want 1", v.BucketsMovingOut)
	}
	k := bkey{bits: int(mv.GetBits()), b: int(mv.GetBucket())}
	var q string
	for _, name := range queues {
		if k.has(name) {
			q = name
		}
	}
	// Six publishes of 60,000 bytes: four fit in 4 × 64 KiB.
	replies := make(chan *imqpb.NodeReply, 6)
	for range 6 {
		req := userPublishBytes("u-s1", q, 60_000)
		req.Session = "s1"
		req.Id = gw.nextID.Add(1)
		gw.mu.Lock()
		gw.replies[req.Id] = replies
		gw.mu.Unlock()
		b, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
		gw.links["a"].SendAlways(b)
	}
	codes := map[imqpb.Code]int{}
	for range 6 {
		select {
		case r := <-replies:
			codes[r.GetCode()]++
		case <-time.After(waitFor):
			t.Fatalf("replies so far %v, want 6", codes)
		}
	}
	if codes[imqpb.Code_OK] != 4 || codes[imqpb.Code_UNAVAILABLE] != 2 {
		t.Fatalf("publishes of the frozen bucket answered %v, want 4 OK (held, then run on a) and 2 UNAVAILABLE", codes)
	}
	if got := counterValue(t, a.m.heldRefused); got != 2 {
		t.Fatalf("held requests refused: %v, want 2", got)
	}
	if got := counterValue(t, a.m.handoffsFailed.WithLabelValues(failTimeout)); got != 1 {
		t.Fatalf("hand-offs failed by timeout: %v, want 1", got)
	}
	testutil.WaitFor(t, waitFor, "a to run the bucket again", func() bool {
		return a.varz().(Varz).BucketsMovingOut == 0
	})
	if _, h, ok := queueState(a, q); !ok || h != 4 {
		t.Fatalf("%s after the failed hand-off: head %d (held %v), want 4", q, h, ok)
	}
}

// TestForgetTarget: when the boss refuses the report of a hand-off while
// this node's table still gives it the bucket, the new owner is not live
// (the boss applies every report whose new owner is), so this node stops
// forwarding to it and serves the bucket again, afresh; when the table
// gives the bucket to another node, it keeps forwarding (retireIfMoved
// decides).
func TestForgetTarget(t *testing.T) {
	s := startNode(t, DefaultConfig())
	s.table.Store(bucket.Single(bucket.Node{ID: s.cfg.NodeID, LinkAddr: s.LinkAddr()})) // every bucket its own
	k := bkey{bits: 4, b: 3}
	q := queuesWhere(t, 1, func(q string) bool { return k.has(q) })[0]
	handedOff := func() {
		s.ho.mu.Lock()
		s.ho.out[k] = &outgoing{key: k, to: bucket.Node{ID: "b"}, mode: outForwarding, wake: make(chan struct{}, 1)}
		s.ho.publishLocked()
		s.ho.mu.Unlock()
	}
	forwarding := func() bool {
		out, local := s.ho.view.Load().outgoing(q)
		return out && !local
	}
	log := s.log
	handedOff()
	s.forgetTarget(k, "c", log) // not the node it was handed to
	if !forwarding() {
		t.Fatal("forgot a hand-off to b on a refusal about c")
	}
	s.forgetTarget(k, "b", log)
	if forwarding() {
		t.Fatal("still forwarding after the boss refused the report with the bucket still this node's")
	}
}

// TestHandoffInChecksTheTable: holding the cluster key is not enough to
// hand a bucket to a node. A node-role peer that claims to hand off a
// bucket the node owns (its live queue keeps its epoch and history), one
// that claims an owner's id the table does not give the bucket, or a
// bucket the table does not move, is refused with FORBIDDEN and nothing is
// installed; the bucket the table moves from its owner to the node is
// taken.
func TestHandoffInChecksTheTable(t *testing.T) {
	s := startClusterNode(t, "b", func(c *Config) { c.ClusterKeys = [][]byte{testOldKey} })
	// b owns one bucket (mine); one more moves from a to b (moving); a
	// keeps the rest (still).
	v1 := bucket.Single(bucket.Node{ID: "a", LinkAddr: testutil.ClosedAddr(t)})
	layout, _, err := v1.Join(bucket.Node{ID: "b", LinkAddr: s.LinkAddr()})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := v1.Advance(layout, layout.Nodes(), 1, nil)
	mine := first.Moving()[0].Bucket
	done, err := first.CompleteMove(mine, "a", "b")
	if err != nil {
		t.Fatal(err)
	}
	table, _ := done.Advance(layout, layout.Nodes(), 1, nil)
	if table.MovingCount() != 1 || table.Owner(mine).ID != "b" {
		t.Fatalf("table %v: want b owning bucket %d and one bucket moving", table, mine)
	}
	moving := table.Moving()[0].Bucket
	still := -1
	for b := range table.Buckets() {
		if b != mine && b != moving && still < 0 {
			still = b
		}
	}
	s.setTable(table)

	in := func(b int) string { return queuesWhere(t, 1, func(q string) bool { return table.Bucket(q) == b })[0] }
	live := in(mine)
	gw := dialLinkWith(t, s.LinkAddr(), imqlink.Config{ID: "gw-1", Keys: [][]byte{testOldKey}})
	for range 3 {
		r := publishReq(live, "chat")
		r.TableVersion = table.Version()
		gw.ok(r)
	}
	epoch, head := queueAt(t, s.Server, live)

	handOff := func(from string, b int, queue string) *imqpb.HandoffAck {
		t.Helper()
		peer := dialLinkWith(t, s.LinkAddr(), imqlink.Config{Role: imqlink.RoleNode, ID: from, Keys: [][]byte{testOldKey}})
		now := time.Now().UnixNano()
		peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffQueues{HandoffQueues: &imqpb.HandoffQueues{
			Bucket: uint32(b), Bits: uint32(table.Bits()), TableVersion: table.Version(),
			Queues: []*imqpb.QueueSnapshot{{Name: queue, Epoch: 7, CreatedUnixNano: now, LastActiveUnixNano: now}},
		}}})
		peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffEnd{HandoffEnd: &imqpb.HandoffEnd{
			Bucket: uint32(b), Bits: uint32(table.Bits()), TableVersion: table.Version(), Queues: 1,
		}}})
		for {
			if ack := peer.read().GetHandoffAck(); ack != nil {
				return ack
			}
		}
	}
	for _, c := range []struct {
		name, from string
		bucket     int
		queue      string
	}{
		{"a bucket the node owns", "a", mine, live},
		{"an id that does not own the bucket", "mallory", moving, in(moving)},
		{"the node's own id", "b", moving, in(moving)},
		{"a bucket that is not moving", "a", still, in(still)},
	} {
		t.Run(c.name, func(t *testing.T) {
			ack := handOff(c.from, c.bucket, c.queue)
			if ack.GetCode() != imqpb.Code_FORBIDDEN {
				t.Fatalf("hand-off acked %v %q, want FORBIDDEN", ack.GetCode(), ack.GetMessage())
			}
			if c.queue != live && s.hasQueue(c.queue) {
				t.Fatalf("refused hand-off installed %s", c.queue)
			}
		})
	}
	if e, h := queueAt(t, s.Server, live); e != epoch || h != head {
		t.Fatalf("live queue %s at epoch %d head %d after refused hand-offs, was %d, %d", live, e, h, epoch, head)
	}
	if ack := handOff("a", moving, in(moving)); ack.GetCode() != imqpb.Code_OK {
		t.Fatalf("the hand-off the table marks was acked %v %q", ack.GetCode(), ack.GetMessage())
	}
	if e, _ := queueAt(t, s.Server, in(moving)); e != 7 {
		t.Fatalf("adopted queue at epoch %d, want the snapshot's 7", e)
	}
}

// queueAt returns the epoch and head of queue on s.
func queueAt(t *testing.T, s *Server, queue string) (epoch, head uint64) {
	t.Helper()
	sh := s.shardFor(queue)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	q := sh.queues[queue]
	if q == nil {
		t.Fatalf("no queue %s", queue)
	}
	return q.Epoch(), q.Head()
}

// TestShutdownClosesNodeLinks: an accepted node link (a peer handing a
// bucket off, pinging as peers do) does not keep the node from stopping:
// Shutdown closes it and Run returns.
func TestShutdownClosesNodeLinks(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member, cfg.LinkAddr, cfg.InternalAddr = "b", testMemberConfig(), "127.0.0.1:0", "127.0.0.1:0"
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	peer := dialLinkWith(t, s.LinkAddr(), imqlink.Config{ID: "a", Role: imqlink.RoleNode})
	stopPings := make(chan struct{})
	defer close(stopPings)
	go func() { // ends with the test
		ping, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Ping{Ping: &imqpb.Ping{}}})
		for {
			select {
			case <-stopPings:
				return
			case <-time.After(50 * time.Millisecond):
				peer.fr.SendAlways(ping)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with a node link open: %v", err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Shutdown: the node link kept it")
	}
}

// TestNodeLinkTakesOnlyLeaves: a node link carries forwarded leaves without
// a reply and nothing else of the kind: the old owner answers requests with
// a reply MOVED itself (docs/handoff.md, step 5), so a peer that forwards
// one is in error and its link is closed, not answered.
func TestNodeLinkTakesOnlyLeaves(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member, cfg.LinkAddr, cfg.InternalAddr = "b", testMemberConfig(), "127.0.0.1:0", "127.0.0.1:0"
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go s.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	peer := dialLinkWith(t, s.LinkAddr(), imqlink.Config{ID: "a", Role: imqlink.RoleNode})
	leave := leaveReq("room", "s1")
	leave.OriginGateway = "gw-1"
	peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: leave}})
	if seen := peer.sync(); len(seen) != 0 { // the link is still up
		t.Fatalf("a forwarded leave was answered: %v", seen)
	}
	pub := userPub("s1", "room")
	pub.Id, pub.OriginGateway = 7, "gw-1"
	peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: pub}})
	peer.c.SetReadDeadline(time.Now().Add(waitFor))
	switch b, err := peer.fr.Next(); {
	case err == nil:
		t.Fatalf("a forwarded publish with a reply was answered (%d bytes), not refused by closing the link", len(b))
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatal("a forwarded publish with a reply left the node link open")
	}
}

// startFakeTarget listens as queue node "b" for node links (no cluster
// key) and runs serve on each, on a goroutine of its own, until the test
// ends; a hand-off test points a at it to act out a target that fails.
func startFakeTarget(t *testing.T, serve func(conn *imqlink.Conn)) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() { // ends when the listener closes
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conn, err := imqlink.Server(c, imqlink.Config{Role: imqlink.RoleNode, ID: "b", PeerRoles: []imqpb.LinkRole{imqlink.RoleNode}, Timeout: time.Minute})
			if err != nil {
				c.Close()
				continue
			}
			go serve(conn) // ends when serve returns: the peer closes the link with the test
		}
	}()
	return ln
}
