package gateway_test

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster/clustertest"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
	"github.com/imq-dev/imq/queuenode"
)

// movingCluster is a cluster-mode gateway over two cluster-mode queue nodes,
// each process following a test-driven boss of its own, so that the test
// decides which of them learns a new table when. next gives every bucket to
// the other node, so every queue moves (the old owner closes it, the new one
// starts it afresh on its next operation).
type movingCluster struct {
	gw     *gateway.Server
	gwBoss *clustertest.Boss
	nodes  []*queuenode.Server
	bosses []*clustertest.Boss // of nodes
	table  *bucket.Table
}

// startTableBoss serves tables to the members of a cluster of its own, in
// which it is the boss; it returns the membership config to join it with.
func startTableBoss(t *testing.T) (*clustertest.Boss, string, *member.Config) {
	t.Helper()
	b, srv := clustertest.StartBoss(t, bucket.Empty())
	mc := member.Config{
		BindAddr: "127.0.0.1:0", Cluster: "imq-order-" + strconv.FormatUint(rand.Uint64(), 36),
		ProbeInterval: 100 * time.Millisecond, SuspicionMult: 3, RejoinInterval: 200 * time.Millisecond,
	}
	bm, err := member.Start(mc, member.Meta{Role: member.RoleBoss, ID: "boss", HTTPAddr: srv.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bm.Close(time.Second) })
	mc.Join = []string{bm.Addr()}
	return b, srv.URL, &mc
}

func startMovingCluster(t *testing.T) *movingCluster {
	t.Helper()
	mc := &movingCluster{}
	var tb *bucket.Table
	for _, id := range []string{"qa", "qb"} {
		boss, _, join := startTableBoss(t)
		cfg := queuenode.DefaultConfig()
		cfg.NodeID, cfg.LinkAddr, cfg.InternalAddr, cfg.Member = id, "127.0.0.1:0", "127.0.0.1:0", join
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
		mc.nodes, mc.bosses = append(mc.nodes, n), append(mc.bosses, boss)
		node := bucket.Node{ID: id, LinkAddr: n.LinkAddr()}
		if tb == nil {
			tb = bucket.Single(node)
		} else {
			tb = mustJoin(t, tb, node)
		}
	}
	boss, url, _ := startTableBoss(t)
	mc.gwBoss = boss
	mc.gw = startClusterGateway(t, func(c *gateway.Config) { c.BossURL = url })
	mc.settle(t, tb)
	return mc
}

// settle gives every process table tb and waits until each holds it.
func (mc *movingCluster) settle(t *testing.T, tb *bucket.Table) {
	t.Helper()
	mc.table = tb
	mc.gwBoss.Set(tb)
	for _, b := range mc.bosses {
		b.Set(tb)
	}
	install(t, mc.gw, tb)
	testutil.WaitFor(t, 5*time.Second, "every node to hold the table", func() bool {
		for _, n := range mc.nodes {
			var got bucket.Table
			if getJSON(t, "http://"+n.InternalAddr()+"/v1/table", &got); got.Version() != tb.Version() {
				return false
			}
		}
		return true
	})
}

// next returns the current table with every bucket given to the other node.
func (mc *movingCluster) next(t *testing.T) *bucket.Table {
	t.Helper()
	b, err := json.Marshal(mc.table)
	if err != nil {
		t.Fatal(err)
	}
	var j struct {
		Version uint64            `json:"version"`
		Bits    uint8             `json:"bits"`
		Nodes   []json.RawMessage `json:"nodes"`
		Owners  []int             `json:"owners"`
	}
	if err := json.Unmarshal(b, &j); err != nil {
		t.Fatal(err)
	}
	j.Version++
	for i := range j.Owners {
		j.Owners[i] = 1 - j.Owners[i]
	}
	if b, err = json.Marshal(j); err != nil {
		t.Fatal(err)
	}
	var next bucket.Table
	if err := json.Unmarshal(b, &next); err != nil {
		t.Fatal(err)
	}
	return &next
}

// inSendOrder reports whether the offsets the publishes of one queue got,
// in the order they were sent, are 1..k on the old owner and then 1..m on
// the new one: no publish overtook an earlier one.
func inSendOrder(offsets []uint64) bool {
	want := uint64(1)
	restarted := false
	for _, o := range offsets {
		switch {
		case o == want:
		case o == 1 && !restarted:
			restarted = true
		default:
			return false
		}
		want = o + 1
	}
	return true
}

func TestInSendOrder(t *testing.T) {
	for _, c := range []struct {
		offsets []uint64
		ok      bool
	}{
		{nil, true},
		{[]uint64{1, 2, 3}, true},
		{[]uint64{1, 2, 1, 2, 3}, true},
		{[]uint64{1, 1, 2}, true},
		{[]uint64{1, 2, 1, 3, 2}, false},
		{[]uint64{2, 1}, false},
		{[]uint64{1, 2, 1, 2, 1}, false},
		{[]uint64{1, 3, 2}, false},
	} {
		if got := inSendOrder(c.offsets); got != c.ok {
			t.Errorf("inSendOrder(%v) = %v", c.offsets, got)
		}
	}
}

// TestPublishOrderAcrossMove: a connection pipelines publishes to a queue
// while the queue moves to the other node, the gateway and the two nodes
// learning of it in varied orders and at varied moments. Whatever the
// timing, the publishes land in the order they were sent: the offsets the
// nodes assign go 1, 2, ... on the old owner and start again at 1 on the new
// one, never out of order.
//
// The new owner learns of the table no later than the gateway, as with the
// live hand-off (docs/handoff.md), where a node adopts a bucket before any
// table routes it there: a new owner behind the gateway answers MOVED to the
// first publish of a burst and may accept the next, already on its way,
// once it has caught up, and no gateway can undo that.
func TestPublishOrderAcrossMove(t *testing.T) {
	const rounds, n = 30, 40
	mc := startMovingCluster(t)
	c := dialGateway(t, mc.gw, "alice")
	bad := 0
	for round := range rounds {
		q := "/room/order-" + strconv.Itoa(round)
		next := mc.next(t)
		owner, _ := mc.table.Lookup(q)
		oldOwner, newOwner := mc.learner(t, 0, next), mc.learner(t, 1, next)
		if owner.ID == "qb" {
			oldOwner, newOwner = newOwner, oldOwner
		}
		// The order the three learn of next in, the new owner before the
		// gateway; between each, a pause of up to half a millisecond.
		orders := [][]func(){
			{oldOwner, newOwner, mc.installer(next)},
			{newOwner, oldOwner, mc.installer(next)},
			{newOwner, mc.installer(next), oldOwner},
		}
		order := rand.N(len(orders))
		flipAt := rand.N(n)
		ids := make([]uint64, 0, n)
		for i := range n {
			if i == flipAt {
				for _, learn := range orders[order] {
					learn()
					time.Sleep(time.Duration(rand.N(500)) * time.Microsecond)
				}
			}
			ids = append(ids, c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{
				Queue: q, Mount: "chat", Payload: []byte(strconv.Itoa(i)),
			}}}))
		}
		rs := c.replies(ids...)
		offsets := make([]uint64, n)
		for i, id := range ids {
			expectCode(t, rs[id], imqpb.Code_OK)
			offsets[i] = rs[id].GetPublished().GetOffset()
		}
		if !inSendOrder(offsets) {
			bad++
			t.Errorf("round %d (flip after %d, order %d): offsets in send order %v", round, flipAt, order, offsets)
		}
		mc.settle(t, next)
	}
	if bad > 0 {
		t.Logf("%d of %d rounds out of order", bad, rounds)
	}
}

// learner gives node i table tb and waits until it holds it.
func (mc *movingCluster) learner(t *testing.T, i int, tb *bucket.Table) func() {
	return func() {
		mc.bosses[i].Set(tb)
		deadline := time.Now().Add(5 * time.Second)
		for {
			var got bucket.Table
			if getJSON(t, "http://"+mc.nodes[i].InternalAddr()+"/v1/table", &got); got.Version() >= tb.Version() {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d did not fetch table %d", i, tb.Version())
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
}

// installer gives the gateway tb, as its boss would.
func (mc *movingCluster) installer(tb *bucket.Table) func() {
	return func() { mc.gwBoss.Set(tb); mc.gw.InstallTable(tb) }
}
