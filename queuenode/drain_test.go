package queuenode

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
)

var drainTestKey = []byte("drain-test-cluster-key-012345678")

// startDrainBoss runs a real boss (buckets move at once: hand-off off) that
// verifies members' signatures with drainTestKey, until the test ends.
func startDrainBoss(t *testing.T) *boss.Boss {
	t.Helper()
	cfg := boss.Config{
		HTTPAddr: "127.0.0.1:0", Member: *testMemberConfig(), Ephemeral: true,
		ClusterKeys: [][]byte{drainTestKey},
	}
	b, err := boss.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- b.Run(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		b.Shutdown(ctx)
		<-errc
	})
	return b
}

// startBossNode runs a queue node with id joined to b, until the test ends.
func startBossNode(t *testing.T, b *boss.Boss, id string) *Server {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member, cfg.ClusterKeys = id, testMemberConfig(), [][]byte{drainTestKey}
	cfg.Member.Join = []string{b.GossipAddr()}
	return startNode(t, cfg)
}

func tableIDs(t *bucket.Table) []string {
	var ids []string
	for _, n := range t.Nodes() {
		ids = append(ids, n.ID)
	}
	return ids
}

// waitBossNodes waits until b's table holds exactly ids, and each node in
// nodes holds that table.
func waitBossNodes(t *testing.T, b *boss.Boss, ids []string, nodes ...*Server) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, "the boss's table to hold "+strings.Join(ids, ", "), func() bool {
		tb := b.Table()
		if !slices.Equal(tableIDs(tb), ids) {
			return false
		}
		for _, n := range nodes {
			if n.cluster.Table().Version() < tb.Version() {
				return false
			}
		}
		return true
	})
}

// TestDrainWithBoss: Drain asks a real boss, signed with the cluster key,
// and returns once the node's table shows it holds nothing and every
// gateway routes by such a table; it times out cleanly, saying why, while
// a gateway lags; Undrain puts the node back.
func TestDrainWithBoss(t *testing.T) {
	b := startDrainBoss(t)
	qn1 := startBossNode(t, b, "qn-1")
	qn2 := startBossNode(t, b, "qn-2")
	waitBossNodes(t, b, []string{"qn-1", "qn-2"}, qn1, qn2)

	// A gateway that has not caught up with the drained table.
	gw, err := member.Start(*testMemberConfig(), member.Meta{Role: member.RoleGateway, ID: "gw-1", TableVersion: b.Table().Version()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close(time.Second) })
	if _, err := gw.Join([]string{b.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitFor, "qn-1 to see the gateway", func() bool {
		return slices.ContainsFunc(qn1.cluster.Member().Peers(), func(p member.Peer) bool { return p.Meta.ID == "gw-1" })
	})

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	err = qn1.Drain(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || !errContains(err, "gw-1") {
		t.Fatalf("Drain while gw-1 lags: %v", err)
	}
	if tb := b.Table(); !slices.Equal(tableIDs(tb), []string{"qn-2"}) || !slices.Equal(b.Draining(), []string{"qn-1"}) {
		t.Fatalf("the boss after the drain: nodes %v draining %v", tableIDs(tb), b.Draining())
	}
	if p := progressOf(qn1.cluster.Table(), "qn-1"); !p.drained() {
		t.Fatalf("qn-1's table after the drain: %+v", p)
	}

	// The gateway catches up while Drain (asked again: idempotent) waits.
	var caughtUp atomic.Bool
	go func() {
		time.Sleep(200 * time.Millisecond) // Drain is waiting by now
		tb := b.Table()
		caughtUp.Store(true)
		gw.SetTable(tb.Version(), tb.Sum())
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := qn1.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if !caughtUp.Load() {
		t.Fatal("Drain returned while gw-1 still routed by an older table")
	}

	if err := qn1.Undrain(ctx); err != nil {
		t.Fatalf("Undrain: %v", err)
	}
	if len(b.Draining()) != 0 {
		t.Fatalf("still draining after Undrain: %v", b.Draining())
	}
	waitBossNodes(t, b, []string{"qn-1", "qn-2"}, qn1, qn2)
}

// TestDrainLastNode: the boss cannot move the last node's buckets anywhere;
// Drain says so at once rather than wait out its deadline.
func TestDrainLastNode(t *testing.T) {
	b := startDrainBoss(t)
	qn1 := startBossNode(t, b, "qn-1")
	waitBossNodes(t, b, []string{"qn-1"}, qn1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := qn1.Drain(ctx); !errors.Is(err, ErrNoDrainTarget) {
		t.Fatalf("Drain of the last node: %v", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Drain waited out its deadline")
	}
}

// TestDrainCannotAsk: no boss known (retried until the deadline), no
// cluster key, standalone.
func TestDrainCannotAsk(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member, cfg.ClusterKeys = "qn-1", testMemberConfig(), [][]byte{drainTestKey} // a cluster without a boss
	n := startNode(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := n.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) || !errContains(err, "no boss known") {
		t.Fatalf("Drain without a boss: %v", err)
	}

	keyless := startClusterNode(t, "qn-2")
	if err := keyless.Drain(context.Background()); !errors.Is(err, ErrNoClusterKey) {
		t.Fatalf("Drain without a cluster key: %v", err)
	}
	standalone := startNode(t, DefaultConfig())
	if err := standalone.Undrain(context.Background()); !errors.Is(err, ErrStandalone) {
		t.Fatalf("Undrain standalone: %v", err)
	}
}

func errContains(err error, s string) bool { return err != nil && strings.Contains(err.Error(), s) }
