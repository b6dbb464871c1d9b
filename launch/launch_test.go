package launch

import (
	"context"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/client"
)

// TestDevWithBoss: imq dev's composition. The boss gives the one node every
// bucket, the gateway routes by that table, and a client's room works.
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
