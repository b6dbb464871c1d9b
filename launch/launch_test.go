package launch

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
)

// TestDevWithBoss: imq dev's composition. The boss gives the one node every
// bucket, the gateway routes by that table, and a client's room works. The
// gossip is keyed with a key of the run's own: a member without it cannot
// join.
func TestDevWithBoss(t *testing.T) {
	cfg := LocalDevConfig()
	bc := boss.DefaultConfig()
	bc.HTTPAddr = "127.0.0.1:0"
	bc.Member.BindAddr = "127.0.0.1:0"
	cfg.Boss = &bc
	cfg.QueueNode.NodeID = "dev-node"
	d, err := StartDev(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := d.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	tb := d.Boss.Table()
	if n := tb.Nodes(); len(n) != 1 || n[0].ID != "dev-node" || n[0].LinkAddr != d.Node.LinkAddr() {
		t.Fatalf("boss table nodes %v", n)
	}
	outsider, err := member.Start(member.Config{BindAddr: "127.0.0.1:0", Cluster: bc.Member.Cluster}, member.Meta{Role: member.RoleQueueNode, ID: "outsider"})
	if err != nil {
		t.Fatal(err)
	}
	defer outsider.Shutdown()
	if _, err := outsider.Join([]string{d.Boss.GossipAddr()}); err == nil {
		t.Error("a member without the cluster key joined imq dev's gossip")
	}
	c, err := client.Dial(ctx, d.URL(), client.WithUser("dev-user"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub, err := c.Join(ctx, "/room/dev", client.Messages("chat"))
	if err != nil {
		t.Fatal(err)
	}
	off, err := c.Publish(ctx, "/room/dev", "chat", []byte(`{"hi":1}`))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case u := <-sub.Updates():
		if u.Kind != client.KindEvent || u.Offset != off {
			t.Fatalf("got %+v, want the event at offset %d", u, off)
		}
	case <-ctx.Done():
		t.Fatal("no event")
	}
}

// TestDevNodesShowEveryMembersVarz: under imq dev the boss's /v1/nodes
// shows every member with its own /varz, the queue node's included, each
// fetched from the member's internal listener (never a gateway's client
// port, which no longer serves /varz).
func TestDevNodesShowEveryMembersVarz(t *testing.T) {
	cfg := LocalDevConfig()
	bc := boss.DefaultConfig()
	bc.HTTPAddr, bc.Member.BindAddr = "127.0.0.1:0", "127.0.0.1:0"
	bc.Member.Cluster = "imq-launch-nodes-test"
	cfg.Boss = &bc
	cfg.QueueNode.NodeID, cfg.Gateway.GatewayID = "dev-node", "dev-gw"
	cfg.QueueNode.InternalAddr = "" // StartDev gives the node one of its own
	d, err := StartDev(cfg)
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
	if d.Node.InternalAddr() == "" {
		t.Fatal("the dev queue node has no internal listener")
	}
	want := map[string]struct{ http, client, varzID string }{
		"boss":     {d.Boss.Addr(), "", ""},
		"dev-node": {d.Node.InternalAddr(), "", `"node_id":"dev-node"`},
		"dev-gw":   {d.Gateway.InternalAddr(), d.Gateway.Addr(), `"gateway_id":"dev-gw"`},
	}
	var last string
	for {
		last = devNodesProblem(ctx, d, want)
		if last == "" {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("/v1/nodes: %s", last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// devNodesProblem says what in the boss's /v1/nodes differs from want (by
// member id: internal HTTP address, client address, a fragment of its
// /varz), or "" when nothing does.
func devNodesProblem(ctx context.Context, d *Dev, want map[string]struct{ http, client, varzID string }) string {
	var view boss.NodesView
	if err := getJSON(ctx, "http://"+d.Boss.Addr()+"/v1/nodes", &view); err != nil {
		return err.Error()
	}
	seen := map[string]bool{}
	for _, m := range view.Members {
		w, ok := want[m.ID]
		switch {
		case !ok:
			return fmt.Sprintf("unexpected member %s", m.ID)
		case m.VarzError != "" || len(m.Varz) == 0:
			return fmt.Sprintf("%s (%s) has no varz: %q", m.ID, m.Role, m.VarzError)
		case m.HTTPAddr != w.http || m.ClientAddr != w.client:
			return fmt.Sprintf("%s advertises internal %q, client %q; want %q, %q", m.ID, m.HTTPAddr, m.ClientAddr, w.http, w.client)
		}
		compact := strings.Join(strings.Fields(string(m.Varz)), "")
		if !strings.Contains(compact, strings.ReplaceAll(w.varzID, " ", "")) {
			return fmt.Sprintf("%s's varz is not its own: %s", m.ID, compact)
		}
		seen[m.ID] = true
	}
	if len(seen) != len(want) {
		return fmt.Sprintf("members %v, want %d", seen, len(want))
	}
	return ""
}

// TestDevBossQuietAboutDataDir: imq dev's boss has no data directory and
// imq dev no flag to give it one, so it does not warn that none is set.
func TestDevBossQuietAboutDataDir(t *testing.T) {
	logger, logs := testutil.CaptureLogs(slog.LevelInfo)
	cfg := LocalDevConfig()
	bc := boss.DefaultConfig()
	bc.HTTPAddr = "127.0.0.1:0"
	cfg.Boss = &bc
	cfg.Logger = logger
	d, err := StartDev(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	defer d.Shutdown(ctx)
	if err := d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if s := logs.String(); strings.Contains(s, `level=WARN msg="no data directory`) {
		t.Errorf("imq dev's boss warned about its data directory:\n%s", s)
	}
}
