package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/member"
)

func TestDrainCommand(t *testing.T) {
	cfg := boss.DefaultConfig()
	cfg.HTTPAddr, cfg.Ephemeral = "127.0.0.1:0", true
	cfg.Member.BindAddr = "127.0.0.1:0"
	cfg.OperatorKeys = [][]byte{[]byte("op-key-for-tests")}
	// The members are bare memberlist nodes that cannot hand buckets off:
	// the drain moves them at once.
	cfg.Handoff = false
	b, err := boss.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go b.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	for _, id := range []string{"qn-1", "qn-2"} {
		mc := member.DefaultConfig()
		mc.BindAddr, mc.Join = "127.0.0.1:0", []string{b.GossipAddr()}
		m, err := member.Start(mc, member.Meta{Role: member.RoleQueueNode, ID: id, LinkAddr: "127.0.0.1:1"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Shutdown() })
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(b.Table().Nodes()) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("nodes never joined the table")
		}
		time.Sleep(10 * time.Millisecond)
	}
	url := "http://" + b.Addr()

	t.Setenv("IMQ_OPERATOR_KEY", "op-key-for-tests")
	if err := runDrain("drain", []string{"--boss", url, "--operator-key", "op-key-for-tests", "qn-1"}); err == nil || !strings.Contains(err.Error(), "not taken from the command line") {
		t.Fatalf("key on argv: %v", err)
	}
	if err := runDrain("drain", []string{"--boss", url, "qn-9"}); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("unknown node: %v", err)
	}
	if err := runDrain("drain", []string{"--boss", url, "--wait", "--timeout", "10s", "qn-1"}); err != nil {
		t.Fatal(err)
	}
	if got := b.Table().Nodes(); len(got) != 1 || got[0].ID != "qn-2" || !slices.Equal(b.Draining(), []string{"qn-1"}) {
		t.Fatalf("after drain --wait: nodes %v, draining %v", got, b.Draining())
	}
	t.Setenv("IMQ_OPERATOR_KEY", "wrong")
	if err := runDrain("undrain", []string{"--boss", url, "qn-1"}); err == nil || !strings.Contains(err.Error(), "wrong operator key") {
		t.Fatalf("wrong key: %v", err)
	}
}
