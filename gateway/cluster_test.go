package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
	"github.com/imq-dev/imq/queuenode"
)

// Cluster routing without a boss: the tests install bucket tables into a
// cluster-mode gateway directly (InstallTable, as the table watcher would),
// over real standalone queue nodes and, where a node must answer MOVED or
// close a queue, a fake one.

// startClusterGateway starts a gateway in cluster mode, alone in its
// membership.
func startClusterGateway(t *testing.T, mod func(*gateway.Config)) *gateway.Server {
	t.Helper()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.Dev = "127.0.0.1:0", "127.0.0.1:0", true
	cfg.Member = &member.Config{BindAddr: "127.0.0.1:0", Cluster: "imq-gateway-test"}
	cfg.ShutdownSpread = 0 // the test's end need not wait for spread goodbyes
	if mod != nil {
		mod(&cfg)
	}
	gw, err := gateway.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go gw.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		gw.Shutdown(ctx)
	})
	return gw
}

// startNode starts a standalone queue node (it owns every queue and never
// answers MOVED).
func startNode(t *testing.T, id string, reg *prometheus.Registry) *queuenode.Server {
	t.Helper()
	cfg := queuenode.DefaultConfig()
	cfg.NodeID, cfg.LinkAddr, cfg.Registry = id, "127.0.0.1:0", reg
	n, err := queuenode.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go n.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Shutdown(ctx)
	})
	return n
}

func dialGateway(t *testing.T, gw *gateway.Server, user string) *rawClient {
	t.Helper()
	c, _, err := dialRawURL(t, "ws://"+gw.Addr()+"/ws", "?user="+user, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// queueOn returns a queue name that table tb gives to node.
func queueOn(t *testing.T, tb *bucket.Table, node, prefix string) string {
	t.Helper()
	for i := range 10000 {
		q := fmt.Sprintf("/room/%s-%d", prefix, i)
		if n, _ := tb.Lookup(q); n.ID == node {
			return q
		}
	}
	t.Fatalf("no queue on %s in %s", node, tb)
	return ""
}

// install routes gw by tb, as the table watcher would, and waits for the
// links to its nodes (gw.Run may not have started them yet).
func install(t *testing.T, gw *gateway.Server, tb *bucket.Table) {
	t.Helper()
	gw.InstallTable(tb)
	testutil.WaitFor(t, 5*time.Second, "links to every node of the table", func() bool {
		links := gw.Links()
		for _, n := range tb.Nodes() {
			if !links[n.ID] {
				return false
			}
		}
		return len(links) == len(tb.Nodes())
	})
}

// replies waits for the replies to ids, in any order; other messages are
// kept for next.
func (c *rawClient) replies(ids ...uint64) map[uint64]*imqpb.Reply {
	c.t.Helper()
	out := map[uint64]*imqpb.Reply{}
	for len(out) < len(ids) {
		m, err := c.read()
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		if r := m.GetReply(); r != nil {
			out[r.GetId()] = r
			continue
		}
		c.backlog = append(c.backlog, m)
	}
	for _, id := range ids {
		if out[id] == nil {
			c.t.Fatalf("no reply to %d: %v", id, out)
		}
	}
	return out
}

// mustJoin returns table t with node added.
func mustJoin(t *testing.T, tb *bucket.Table, node bucket.Node) *bucket.Table {
	t.Helper()
	next, _, err := tb.Join(node)
	if err != nil {
		t.Fatal(err)
	}
	return next
}

func counterSum(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func getJSON(t *testing.T, url string, v any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}

// unsubscribed reads until an Unsubscribed message and returns it.
func (c *rawClient) unsubscribed() *imqpb.Unsubscribed {
	c.t.Helper()
	for {
		if u := c.next().GetUnsubscribed(); u != nil {
			return u
		}
	}
}

// quiet pings and fails if an Unsubscribed arrives before the pong.
func (c *rawClient) quiet() {
	c.t.Helper()
	id := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}})
	for {
		m := c.next()
		if u := m.GetUnsubscribed(); u != nil {
			c.t.Fatalf("unexpected %v", u)
		}
		if p := m.GetPong(); p != nil && p.GetId() == id {
			return
		}
	}
}

func expectUnsubscribed(t *testing.T, u *imqpb.Unsubscribed, queue string, reason imqpb.Reason) {
	t.Helper()
	if u.GetQueue() != queue || u.GetReason() != reason || !u.GetRejoin() || u.GetMessage() == "" {
		t.Fatalf("got %v, want %s of %s with rejoin and a message", u, reason, queue)
	}
}

// fakeNode is a queue node that answers each request with handle's reply,
// records the requests, and lets the test send frames of its own.
type fakeNode struct {
	id     string
	ln     net.Listener
	handle func(*imqpb.NodeRequest) *imqpb.NodeReply
	reqs   chan *imqpb.NodeRequest
	// adopted gets the BucketAdopted messages the gateway sends.
	adopted chan *imqpb.BucketAdopted
	mu      sync.Mutex
	conns   []net.Conn   // Guarded by mu.
	links   []*link.Conn // Guarded by mu: the conns after their handshake.
}

// startFakeNode starts a fake node with id "qa".
func startFakeNode(t *testing.T, handle func(*imqpb.NodeRequest) *imqpb.NodeReply) *fakeNode {
	t.Helper()
	return startFakeNodeID(t, "qa", handle)
}

// startFakeNodeID starts a fake node that answers handshakes as id: a
// gateway in cluster mode links only to the id its table names.
func startFakeNodeID(t *testing.T, id string, handle func(*imqpb.NodeRequest) *imqpb.NodeReply) *fakeNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeNode{id: id, ln: ln, handle: handle, reqs: make(chan *imqpb.NodeRequest, 100), adopted: make(chan *imqpb.BucketAdopted, 10)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, c := range f.conns {
			c.Close()
		}
	})
	return f
}

func (f *fakeNode) addr() string { return f.ln.Addr().String() }

func (f *fakeNode) serve(c net.Conn) {
	defer c.Close()
	conn, err := link.Server(c, link.Config{Role: link.RoleNode, ID: f.id, PeerRoles: []imqpb.LinkRole{link.RoleGateway}})
	if err != nil {
		return
	}
	go conn.WriteLoop() // ends when c closes
	f.mu.Lock()
	f.conns = append(f.conns, c)
	f.links = append(f.links, conn)
	f.mu.Unlock()
	for {
		b, err := conn.Next()
		if err != nil {
			return
		}
		var up imqpb.LinkUp
		if proto.Unmarshal(b, &up) != nil {
			return
		}
		switch {
		case up.GetPing() != nil:
			f.write(conn, &imqpb.LinkDown{Msg: &imqpb.LinkDown_Pong{Pong: &imqpb.Pong{}}})
		case up.GetBucketAdopted() != nil:
			f.adopted <- up.GetBucketAdopted()
		case up.GetRequest() != nil:
			req := up.GetRequest()
			select {
			case f.reqs <- req:
			default:
			}
			if r := f.handle(req); r != nil && req.GetId() != 0 {
				r.Id = req.GetId()
				f.write(conn, &imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: r}})
			}
		}
	}
}

func (f *fakeNode) write(conn *link.Conn, m *imqpb.LinkDown) {
	b, _ := link.MarshalFrame(m)
	conn.SendAlways(b)
}

// push sends m on every link.
func (f *fakeNode) push(m *imqpb.LinkDown) {
	f.mu.Lock()
	links := append([]*link.Conn(nil), f.links...)
	f.mu.Unlock()
	for _, l := range links {
		f.write(l, m)
	}
}

// request waits for the next request the node received.
func (f *fakeNode) request(t *testing.T) *imqpb.NodeRequest {
	t.Helper()
	select {
	case r := <-f.reqs:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("the fake node received no request")
		return nil
	}
}

// fakeOK answers joins with the chat mount and every other request OK.
func fakeOK(req *imqpb.NodeRequest) *imqpb.NodeReply {
	if j := req.GetJoin(); j != nil {
		return &imqpb.NodeReply{Result: &imqpb.NodeReply_Joined{Joined: &imqpb.Joined{
			Queue: j.GetQueue(), Epoch: 1, Mounts: []*imqpb.MountState{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}},
		}}}
	}
	if req.GetPublish() != nil {
		return &imqpb.NodeReply{Result: &imqpb.NodeReply_Published{Published: &imqpb.Published{Offset: 1}}}
	}
	return &imqpb.NodeReply{}
}

func TestClusterConfig(t *testing.T) {
	for name, mod := range map[string]func(*gateway.Config){
		"neither": func(c *gateway.Config) {},
		"both": func(c *gateway.Config) {
			c.QueueNode = "127.0.0.1:7100"
			c.Member = &member.Config{BindAddr: "127.0.0.1:0"}
		},
		"bad membership": func(c *gateway.Config) { c.Member = &member.Config{BindAddr: "nohost"} },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := gateway.DefaultConfig()
			cfg.Addr, cfg.InternalAddr, cfg.Dev = "127.0.0.1:0", "127.0.0.1:0", true
			mod(&cfg)
			if gw, err := gateway.New(cfg); err == nil {
				gw.Shutdown(context.Background())
				t.Fatal("New accepted the config")
			}
		})
	}
}

// TestClusterRoutesByTable: before any table the gateway answers
// UNAVAILABLE and is unhealthy; with a table of two nodes it spreads queues
// over them as the table says.
func TestClusterRoutesByTable(t *testing.T) {
	gw := startClusterGateway(t, nil)
	base := "http://" + gw.Addr()
	c := dialGateway(t, gw, "alice")

	var health struct{ Status string }
	if code := getJSON(t, base+"/healthz", &health); code != http.StatusServiceUnavailable {
		t.Fatalf("healthz %d without a table", code)
	}
	r := c.join("/room/early", chat())
	expectCode(t, r, imqpb.Code_UNAVAILABLE)
	if !r.GetRetryable() {
		t.Fatal("no-table error is not retryable")
	}
	expectCode(t, c.publish("/room/early", "chat", []byte("1")), imqpb.Code_UNAVAILABLE)

	regs := map[string]*prometheus.Registry{"qa": prometheus.NewRegistry(), "qb": prometheus.NewRegistry()}
	qa, qb := startNode(t, "qa", regs["qa"]), startNode(t, "qb", regs["qb"])
	table := mustJoin(t, bucket.Single(bucket.Node{ID: "qa", LinkAddr: qa.LinkAddr()}), bucket.Node{ID: "qb", LinkAddr: qb.LinkAddr()})
	install(t, gw, table)
	if code := getJSON(t, base+"/healthz", &health); code != http.StatusOK {
		t.Fatalf("healthz %d with a table and links up", code)
	}
	var v gateway.Varz
	getJSON(t, "http://"+gw.InternalAddr()+"/varz", &v)
	if v.TableVersion != table.Version() || v.LinksUp != 2 || v.Mode != "cluster" {
		t.Fatalf("varz %+v", v)
	}
	var served bucket.Table
	getJSON(t, "http://"+gw.InternalAddr()+"/v1/table", &served)
	if served.Version() != table.Version() || served.Buckets() != table.Buckets() {
		t.Fatalf("/v1/table served %s, want %s", &served, table)
	}

	want := map[string]float64{}
	for i := range 24 {
		q := fmt.Sprintf("/room/spread-%d", i)
		n, _ := table.Lookup(q)
		want[n.ID]++
		expectCode(t, c.join(q, chat()), imqpb.Code_OK)
		off := c.publish(q, "chat", []byte(`"hi"`)).GetPublished().GetOffset()
		if ev := nextEvent(t, c); ev.GetQueue() != q || ev.GetOffset() != off {
			t.Fatalf("event %v, want %s offset %d", ev, q, off)
		}
	}
	if want["qa"] == 0 || want["qb"] == 0 {
		t.Fatalf("the table put every queue on one node: %v", want)
	}
	for id, reg := range regs {
		if got := counterSum(t, reg, "imq_queuenode_queues_created_total"); got != want[id] {
			t.Errorf("node %s created %v queues, the table gives it %v", id, got, want[id])
		}
	}
}

// TestClusterMovedIsRetried: a node answering MOVED makes the gateway wait
// for a newer table and send again to the new owner; the client sees only
// success.
func TestClusterMovedIsRetried(t *testing.T) {
	gw := startClusterGateway(t, nil)
	old := startFakeNode(t, func(*imqpb.NodeRequest) *imqpb.NodeReply {
		return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: 1}
	})
	owner := startNode(t, "qb", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: old.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: owner.LinkAddr()})
	install(t, gw, t1)
	q := queueOn(t, t2, "qb", "moved")

	c := dialGateway(t, gw, "alice")
	joinID := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: q, Mounts: []*imqpb.MountSpec{chat()}}}})
	pubID := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: q, Mount: "chat", Payload: []byte("1")}}})
	for range 2 {
		if r := old.request(t); r.GetTableVersion() != 1 {
			t.Fatalf("request routed by table %d, want 1", r.GetTableVersion())
		}
	}
	install(t, gw, t2) // what the watcher would fetch once kicked
	// Each retry runs on its own: the replies come in either order.
	rs := c.replies(joinID, pubID)
	expectCode(t, rs[joinID], imqpb.Code_OK)
	expectCode(t, rs[pubID], imqpb.Code_OK)
	// The subscription is on the new owner.
	off := c.publish(q, "chat", []byte(`"again"`)).GetPublished().GetOffset()
	for {
		ev := nextEvent(t, c)
		if ev.GetOffset() == off {
			break
		}
	}
	if v := metricValue(t, gw.InternalAddr(), "imq_gateway_moved_retries_total"); v != "2" {
		t.Fatalf("moved retries %q, want 2", v)
	}
}

// TestClusterMovedGivesUp: MOVED with no newer table in sight ends, after 5
// attempts, in a retryable UNAVAILABLE; a join overtaken by a leave of the
// same queue is not sent again.
func TestClusterMovedGivesUp(t *testing.T) {
	for name, nodeVersion := range map[string]uint64{"node as new": 1, "node behind": 0} {
		t.Run(name, func(t *testing.T) {
			gw := startClusterGateway(t, func(*gateway.Config) {})
			gw.SetMovedWait(20 * time.Millisecond)
			fake := startFakeNode(t, func(*imqpb.NodeRequest) *imqpb.NodeReply {
				return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: nodeVersion}
			})
			install(t, gw, bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()}))
			c := dialGateway(t, gw, "alice")

			r := c.publish("/room/nowhere", "chat", []byte("1"))
			expectCode(t, r, imqpb.Code_UNAVAILABLE)
			if !r.GetRetryable() {
				t.Fatal("not retryable")
			}
			if !strings.Contains(r.GetMessage(), "not mine") {
				t.Fatalf("message %q does not pass on the node's last answer", r.GetMessage())
			}
			for i := range 5 {
				if req := fake.request(t); req.GetPublish() == nil || req.GetTableVersion() != 1 {
					t.Fatalf("attempt %d: %v", i+1, req)
				}
			}
			select {
			case req := <-fake.reqs:
				t.Fatalf("a sixth attempt: %v", req)
			default:
			}

			// A join and a leave of the same queue, pipelined: the join is
			// superseded at its first retry, the leave runs its course.
			joinID := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/room/nowhere", Mounts: []*imqpb.MountSpec{chat()}}}})
			leaveID := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: "/room/nowhere"}}})
			rs := c.replies(joinID, leaveID)
			expectCode(t, rs[joinID], imqpb.Code_UNAVAILABLE)
			if !rs[joinID].GetRetryable() {
				t.Fatal("superseded join not retryable")
			}
			expectCode(t, rs[leaveID], imqpb.Code_UNAVAILABLE)
			joins, leaves := 0, 0
			for range 6 {
				req := fake.request(t)
				if req.GetJoin() != nil {
					joins++
				} else if req.GetLeave() != nil {
					leaves++
				}
			}
			if joins != 1 || leaves != 5 {
				t.Fatalf("node saw %d joins and %d leaves, want 1 and 5", joins, leaves)
			}
			if v := metricValue(t, gw.InternalAddr(), `imq_gateway_moved_failures_total{reason="superseded"}`); v != "1" {
				t.Fatalf("superseded failures %q", v)
			}
		})
	}
}

// TestClusterQueueClosed: a node closing a queue ends the subscriptions
// made through it (MOVED, rejoin) and no others; the subscribers rejoin on
// the new owner.
func TestClusterQueueClosed(t *testing.T) {
	gw := startClusterGateway(t, nil)
	fake := startFakeNode(t, fakeOK)
	owner := startNode(t, "qb", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: owner.LinkAddr()})
	q := queueOn(t, t2, "qb", "closing")
	other := queueOn(t, t2, "qa", "staying")
	install(t, gw, t1)

	viaOld, viaNew, bystander := dialGateway(t, gw, "a"), dialGateway(t, gw, "b"), dialGateway(t, gw, "c")
	expectCode(t, viaOld.join(q, chat()), imqpb.Code_OK)
	expectCode(t, bystander.join(other, chat()), imqpb.Code_OK)
	install(t, gw, t2)
	expectCode(t, viaNew.join(q, chat()), imqpb.Code_OK)

	// The old node's events reach only the subscriber made through it.
	frame, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: q, Mount: "chat", Offset: 999}}})
	fake.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{Queue: q, Mount: "chat", Frame: frame}}})
	if ev := nextEvent(t, viaOld); ev.GetOffset() != 999 {
		t.Fatalf("event %v", ev)
	}

	fake.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
		Queue: q, Reason: imqpb.Reason_REASON_MOVED, Message: "moved to qb",
	}}})
	expectUnsubscribed(t, viaOld.unsubscribed(), q, imqpb.Reason_REASON_MOVED)
	viaNew.quiet()
	bystander.quiet()

	// The new owner's events reach the subscriber made through it, and the
	// moved one after it rejoins.
	expectCode(t, viaOld.join(q, chat()), imqpb.Code_OK)
	off := viaNew.publish(q, "chat", []byte(`"on qb"`)).GetPublished().GetOffset()
	for _, c := range []*rawClient{viaNew, viaOld} {
		if ev := nextEvent(t, c); ev.GetOffset() != off {
			t.Fatalf("event %v, want offset %d from the new owner", ev, off)
		}
	}
	if v := metricValue(t, gw.InternalAddr(), `imq_gateway_unsubscribed_total{reason="moved"}`); v != "1" {
		t.Fatalf("moved unsubscriptions %q", v)
	}
}

// TestClusterNodeLeavesTable: a node removed from the table has its link
// stopped; exactly the subscriptions made through it end with NODE_LOST.
func TestClusterNodeLeavesTable(t *testing.T) {
	gw := startClusterGateway(t, nil)
	qa, qb := startNode(t, "qa", nil), startNode(t, "qb", nil)
	t2 := mustJoin(t, bucket.Single(bucket.Node{ID: "qa", LinkAddr: qa.LinkAddr()}), bucket.Node{ID: "qb", LinkAddr: qb.LinkAddr()})
	install(t, gw, t2)
	onA, onB := queueOn(t, t2, "qa", "lost"), queueOn(t, t2, "qb", "kept")
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(onA, chat()), imqpb.Code_OK)
	expectCode(t, c.join(onB, chat()), imqpb.Code_OK)

	t3, _, err := t2.Leave("qa")
	if err != nil {
		t.Fatal(err)
	}
	install(t, gw, t3)
	expectUnsubscribed(t, c.unsubscribed(), onA, imqpb.Reason_REASON_NODE_LOST)
	if l := gw.Links(); len(l) != 1 || !l["qb"] {
		t.Fatalf("links %v, want qb alone", l)
	}
	c.quiet()
	off := c.publish(onB, "chat", []byte(`"still here"`)).GetPublished().GetOffset()
	if ev := nextEvent(t, c); ev.GetQueue() != onB || ev.GetOffset() != off {
		t.Fatalf("event %v", ev)
	}
	expectCode(t, c.join(onA, chat()), imqpb.Code_OK) // now on qb
	var v gateway.Varz
	getJSON(t, "http://"+gw.InternalAddr()+"/varz", &v)
	if v.TableVersion != t3.Version() || v.LinksUp != 1 || len(v.Links) != 1 || v.Links[0].Node != "qb" {
		t.Fatalf("varz %+v", v)
	}
}

// TestClusterNodeReaddressed: a node back at a new address (a restart) gets
// a new link; the subscriptions made through the old one end with NODE_LOST
// and rejoin on the new one.
func TestClusterNodeReaddressed(t *testing.T) {
	gw := startClusterGateway(t, nil)
	before := startNode(t, "qa", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: before.LinkAddr()})
	install(t, gw, t1)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join("/room/restart", chat()), imqpb.Code_OK)

	after := startNode(t, "qa", nil)
	t2, err := t1.Readdress(bucket.Node{ID: "qa", LinkAddr: after.LinkAddr()})
	if err != nil {
		t.Fatal(err)
	}
	install(t, gw, t2)
	expectUnsubscribed(t, c.unsubscribed(), "/room/restart", imqpb.Reason_REASON_NODE_LOST)
	expectCode(t, c.join("/room/restart", chat()), imqpb.Code_OK)
	off := c.publish("/room/restart", "chat", []byte(`"back"`)).GetPublished().GetOffset()
	if ev := nextEvent(t, c); ev.GetOffset() != off {
		t.Fatalf("event %v", ev)
	}
	var v gateway.Varz
	getJSON(t, "http://"+gw.InternalAddr()+"/varz", &v)
	if len(v.Links) != 1 || v.Links[0].Addr != after.LinkAddr() || !v.Links[0].Up {
		t.Fatalf("links %+v, want qa at %s", v.Links, after.LinkAddr())
	}
}

// TestClusterMovedWaitsForNodesTable: a node ahead of the gateway answers
// MOVED with its table's version; the gateway resends as soon as it holds
// that version, rather than waiting for one newer still (which may never
// come).
func TestClusterMovedWaitsForNodesTable(t *testing.T) {
	gw := startClusterGateway(t, func(c *gateway.Config) { c.RequestTimeout = 2 * time.Second })
	gw.SetMovedWait(time.Minute) // only the request's time bounds the wait
	old := startFakeNode(t, func(*imqpb.NodeRequest) *imqpb.NodeReply {
		return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: 2}
	})
	owner := startNode(t, "qb", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: old.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: owner.LinkAddr()})
	install(t, gw, t1)
	q := queueOn(t, t2, "qb", "ahead")

	c := dialGateway(t, gw, "alice")
	id := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: q, Mount: "chat", Payload: []byte("1")}}})
	old.request(t)
	install(t, gw, t2) // the node's version
	expectCode(t, c.reply(id), imqpb.Code_OK)
}

// TestClusterRefusedRequestChangesNothing: a join or leave refused by the
// in-flight limit neither supersedes the join still on its way nor ends a
// subscription.
func TestClusterRefusedRequestChangesNothing(t *testing.T) {
	gw := startClusterGateway(t, func(c *gateway.Config) { c.MaxInflight = 1 })
	hold := make(chan struct{})
	fake := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		if req.GetJoin().GetQueue() == "/room/held" {
			<-hold
		}
		return fakeOK(req)
	})
	install(t, gw, bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()}))
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join("/room/a", chat()), imqpb.Code_OK)

	joinID := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/room/held", Mounts: []*imqpb.MountSpec{chat()}}}})
	testutil.WaitFor(t, 5*time.Second, "the held join to reach the node", func() bool {
		for {
			select {
			case r := <-fake.reqs:
				if r.GetJoin().GetQueue() == "/room/held" {
					return true
				}
			default:
				return false
			}
		}
	})
	expectCode(t, c.join("/room/held", chat()), imqpb.Code_LIMIT_EXCEEDED)
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: "/room/a"}}}), imqpb.Code_LIMIT_EXCEEDED)
	close(hold)
	expectCode(t, c.reply(joinID), imqpb.Code_OK)

	for i, q := range []string{"/room/held", "/room/a"} {
		frame, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: q, Mount: "chat", Offset: uint64(10 + i)}}})
		fake.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{Queue: q, Mount: "chat", Frame: frame}}})
		if ev := nextEvent(t, c); ev.GetQueue() != q {
			t.Fatalf("event %v, want one of %s", ev, q)
		}
	}
}

// TestClusterLeaveFollowsSubscription: after the queue's bucket moved, a
// leave goes to the node the subscription was made through (which has the
// subscriber), and a rejoin through the new owner leaves the old one.
func TestClusterLeaveFollowsSubscription(t *testing.T) {
	gw := startClusterGateway(t, nil)
	old := startFakeNode(t, fakeOK)
	owner := startNode(t, "qb", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: old.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: owner.LinkAddr()})
	install(t, gw, t1)
	q1, q2 := queueOn(t, t2, "qb", "left"), queueOn(t, t2, "qb", "rejoined")

	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q1, chat()), imqpb.Code_OK)
	expectCode(t, c.join(q2, chat()), imqpb.Code_OK)
	old.request(t)
	old.request(t)
	install(t, gw, t2) // the old node has not closed the queues yet

	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: q1}}}), imqpb.Code_OK)
	if r := old.request(t); r.GetLeave().GetQueue() != q1 || r.GetId() == 0 {
		t.Fatalf("the old node got %v, want the leave of %s", r, q1)
	}

	expectCode(t, c.join(q2, chat()), imqpb.Code_OK) // through the new owner
	if r := old.request(t); r.GetLeave().GetQueue() != q2 {
		t.Fatalf("the old node got %v, want a leave of %s", r, q2)
	}
	off := c.publish(q2, "chat", []byte(`"on qb"`)).GetPublished().GetOffset()
	if ev := nextEvent(t, c); ev.GetQueue() != q2 || ev.GetOffset() != off {
		t.Fatalf("event %v, want %s offset %d from the new owner", ev, q2, off)
	}
}
