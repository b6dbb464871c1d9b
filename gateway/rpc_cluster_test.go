package gateway_test

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestRPCKickCluster: a kick on one gateway closes the user's sessions on
// every gateway of the cluster, and names the gateways that did not answer.
// A boss, a queue node and gateway gw-1 run in-process (launch.StartDev
// with Boss); gw-2 joins the same membership.
func TestRPCKickCluster(t *testing.T) {
	const cluster = "imq-rpc-kick-test"
	cfg := launch.LocalDevConfig()
	bc := boss.DefaultConfig()
	bc.HTTPAddr, bc.Member.BindAddr, bc.Member.Cluster = "127.0.0.1:0", "127.0.0.1:0", cluster
	cfg.Boss = &bc
	cfg.Gateway.GatewayID = "gw-1"
	cfg.Gateway.APIKeys = testAPIKeys(t)
	cfg.Gateway.RPCTimeout = 2 * time.Second
	cfg.ClusterKeys = [][]byte{launch.NewClusterKey()} // gw-2 joins with it
	d, err := launch.StartDev(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		d.Shutdown(ctx)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	join := func() *member.Config {
		return &member.Config{BindAddr: "127.0.0.1:0", Join: []string{d.Boss.GossipAddr()}, Cluster: cluster, Keys: cfg.ClusterKeys}
	}
	gw2 := startClusterGateway(t, func(c *gateway.Config) {
		c.GatewayID, c.Member, c.APIKeys, c.ClusterKeys = "gw-2", join(), testAPIKeys(t), cfg.ClusterKeys
	})
	testutil.WaitFor(t, 15*time.Second, "gw-2 healthy", func() bool {
		resp, err := http.Get("http://" + gw2.Addr() + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	bob1 := mustDial(t, d, "bob", false)
	bob2 := dialGateway(t, gw2, "bob")
	bob3 := dialGateway(t, gw2, "bob")
	carol := dialGateway(t, gw2, "carol")
	for _, c := range []*rawClient{bob1, bob2, bob3, carol} {
		c.connected()
	}
	kick := func(body string) kickRes {
		t.Helper()
		var r kickRes
		rpcOK(t, d, "kick", body, &r)
		return r
	}
	// Gossip tells gw-1 of gw-2 soon.
	testutil.WaitFor(t, 15*time.Second, "a kick to reach both gateways", func() bool { return kick(`{"user":"nobody"}`).Gateways == 2 })

	r := kick(`{"user":"bob","reason":"see you"}`)
	if r.Sessions != 3 || r.Gateways != 2 || len(r.Failed) != 0 {
		t.Fatalf("kick: %+v, want 3 sessions on 2 gateways", r)
	}
	for _, c := range []*rawClient{bob1, bob2, bob3} {
		if g := c.expectGoodbye(imqpb.Reason_REASON_KICKED); g.GetMessage() != "see you" || g.GetReconnect() {
			t.Fatalf("goodbye %v", g)
		}
	}
	carol.quiet()

	// Gateways that are gone or hang are reported, within the RPC timeout.
	dead, err := member.Start(*join(), member.Meta{Role: member.RoleGateway, ID: "gw-dead", HTTPAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dead.Close(time.Second) })
	hang, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hang.Close() })
	go func() { // accepts and never answers
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := hang.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	hung, err := member.Start(*join(), member.Meta{Role: member.RoleGateway, ID: "gw-hung", HTTPAddr: hang.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hung.Close(time.Second) })
	testutil.WaitFor(t, 15*time.Second, "four peers", func() bool { return peers(t, d, 4) })
	carol2 := dialGateway(t, gw2, "carol")
	carol2.connected()
	start := time.Now()
	r = kick(`{"user":"carol"}`)
	if r.Sessions != 2 || r.Gateways != 4 || !slices.Equal(r.Failed, []string{"gw-dead", "gw-hung"}) {
		t.Fatalf("kick: %+v, want 2 sessions, 4 gateways, gw-dead and gw-hung failed", r)
	}
	if took := time.Since(start); took >= cfg.Gateway.RPCTimeout {
		t.Fatalf("the kick took %s; the RPC timeout is %s, which the answer must beat", took, cfg.Gateway.RPCTimeout)
	}
	carol.expectGoodbye(imqpb.Reason_REASON_KICKED)
	carol2.expectGoodbye(imqpb.Reason_REASON_KICKED)
}

// peers reports whether gw-1 counts n gateways in a kick (itself included).
func peers(t *testing.T, d *launch.Dev, n int) bool {
	t.Helper()
	var r kickRes
	rpcOK(t, d, "kick", `{"user":"nobody"}`, &r)
	return r.Gateways == n
}

// TestRPCMoved: an RPC call answered MOVED is sent again to the queue's new
// owner once the gateway has the newer table; the caller sees one answer.
func TestRPCMoved(t *testing.T) {
	gw := startClusterGateway(t, func(c *gateway.Config) { c.APIKeys = testAPIKeys(t) })
	fake := startFakeNode(t, func(*imqpb.NodeRequest) *imqpb.NodeReply {
		return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: 2}
	})
	owner := startNode(t, "qb", nil)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: owner.LinkAddr()})
	q := queueOn(t, t2, "qb", "rpc-moved")
	install(t, gw, t1)

	done := make(chan rpcAnswer, 1)
	go func() {
		done <- rpcDo(t, gw.Addr(), http.MethodPost, "set_state", testAPIKey, `{"queue":"`+q+`","mount":"s","key":"k","value":1}`, nil)
	}()
	if req := fake.request(t); !req.GetBackend() || req.GetTableVersion() != 1 || req.GetSetState().GetQueue() != q {
		t.Fatalf("first attempt %v", req)
	}
	install(t, gw, t2)
	a := <-done
	if a.status != http.StatusOK || string(bytes.TrimSpace(a.body)) != `{"version":1,"created":true}` {
		t.Fatalf("set_state: %s", a)
	}
	// Reads too.
	a = rpcDo(t, gw.Addr(), http.MethodPost, "queue_info", testAPIKey, `{"queue":"`+q+`"}`, nil)
	if a.status != http.StatusOK || !strings.Contains(string(a.body), `"node":"qb"`) {
		t.Fatalf("queue_info: %s", a)
	}
}

// TestRPCMovedGivesUp: a queue that keeps moving ends in 503 UNAVAILABLE,
// retryable, with the node's last word.
func TestRPCMovedGivesUp(t *testing.T) {
	gw := startClusterGateway(t, func(c *gateway.Config) { c.APIKeys = testAPIKeys(t) })
	gw.SetMovedWait(20 * time.Millisecond)
	fake := startFakeNode(t, func(*imqpb.NodeRequest) *imqpb.NodeReply {
		return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: 1}
	})
	install(t, gw, bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()}))
	a := rpcDo(t, gw.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/x","mount":"chat","data":1}`, nil)
	expectRPCError(t, a, http.StatusServiceUnavailable, "UNAVAILABLE")
	if !strings.Contains(string(a.body), "not mine") {
		t.Fatalf("%s", a)
	}
}

// TestRPCNoTable: a cluster gateway without a table yet answers 503.
func TestRPCNoTable(t *testing.T) {
	gw := startClusterGateway(t, func(c *gateway.Config) { c.APIKeys = testAPIKeys(t) })
	expectRPCError(t, rpcDo(t, gw.Addr(), http.MethodPost, "get_state", testAPIKey, `{"queue":"/room/x","mount":"s"}`, nil), http.StatusServiceUnavailable, "UNAVAILABLE")
}
