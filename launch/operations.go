package launch

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"syscall"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/bucket"
	imqcluster "github.com/imq-dev/imq/internal/cluster"
)

// The operations that change a running cluster's shape the way an operator
// does (docs/handoff.md, README "Operations"): drain a queue node through
// the boss, restart it as a new process with the same id, restart a
// gateway, pause a process. `imq cluster` and the end-to-end tests share
// them, so that a test exercises what an operator would do.

// shapeTimeout bounds each wait for the cluster to reach a shape (a node
// drained, serving again): hand-off moves --max-moves buckets at a time, and
// a boss gives a move up after --move-timeout (60 s by default).
const shapeTimeout = 90 * time.Second

// Table fetches the boss's current bucket table, moves included.
func (c *Cluster) Table(ctx context.Context) (*bucket.Table, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Boss.Addr("http")+imqcluster.TablePath, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("GET boss table: %s: %s", resp.Status, b)
	}
	return imqcluster.DecodeTable(resp.Body)
}

// Holding is what one queue node holds in a table: the buckets it owns and
// how many of them are moving away, and how many are moving to it.
type Holding struct {
	Owned, MovingOut, MovingIn int
}

// HoldingOf returns what node id holds in t.
func HoldingOf(t *bucket.Table, id string) Holding {
	h := Holding{Owned: t.Counts()[id]}
	for _, m := range t.Moving() {
		switch id {
		case m.From:
			h.MovingOut++
		case m.To:
			h.MovingIn++
		}
	}
	return h
}

// WaitHolding polls the boss's table until what node id holds satisfies ok,
// or shapeTimeout passes. what names the awaited shape in the error, which
// also says what the node held last.
func (c *Cluster) WaitHolding(ctx context.Context, id, what string, ok func(Holding) bool) (*bucket.Table, error) {
	ctx, cancel := context.WithTimeout(ctx, shapeTimeout)
	defer cancel()
	var last error
	for {
		t, err := c.Table(ctx)
		if err == nil {
			h := HoldingOf(t, id)
			if ok(h) {
				return t, nil
			}
			last = fmt.Errorf("table v%d: %s owns %d buckets, %d moving away, %d moving in (%d moves cluster-wide)",
				t.Version(), id, h.Owned, h.MovingOut, h.MovingIn, t.MovingCount())
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("launch: %s not %s: %w", id, what, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// WaitDrained waits until node id owns no bucket and none is moving to it.
func (c *Cluster) WaitDrained(ctx context.Context, id string) error {
	_, err := c.WaitHolding(ctx, id, "drained", func(h Holding) bool { return h.Owned == 0 && h.MovingIn == 0 })
	return err
}

// WaitServing waits until node id owns buckets and none is moving to or
// from it: a node that joined, or was undrained, got its share.
func (c *Cluster) WaitServing(ctx context.Context, id string) error {
	_, err := c.WaitHolding(ctx, id, "serving its share of buckets", func(h Holding) bool {
		return h.Owned > 0 && h.MovingIn == 0 && h.MovingOut == 0
	})
	return err
}

// Drain asks the boss to move every bucket off queue node id (POST
// /v1/nodes/{id}/drain with the operator key, the boss's --operator-key).
// It returns at once; WaitDrained follows the drain.
func (c *Cluster) Drain(ctx context.Context, id, operatorKey string) (boss.DrainView, error) {
	return c.drainCall(ctx, id, "drain", operatorKey)
}

// Undrain puts queue node id back in the boss's layout (POST
// /v1/nodes/{id}/undrain); its buckets come back as the boss moves them.
func (c *Cluster) Undrain(ctx context.Context, id, operatorKey string) (boss.DrainView, error) {
	return c.drainCall(ctx, id, "undrain", operatorKey)
}

func (c *Cluster) drainCall(ctx context.Context, id, action, operatorKey string) (boss.DrainView, error) {
	var dv boss.DrainView
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	url := "http://" + c.Boss.Addr("http") + "/v1/nodes/" + id + "/" + action
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
	if err != nil {
		return dv, err
	}
	req.Header.Set("Authorization", "Bearer "+operatorKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return dv, fmt.Errorf("launch: %s %s: %w", action, id, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return dv, fmt.Errorf("launch: %s %s: %w", action, id, err)
	}
	if resp.StatusCode != http.StatusOK {
		return dv, fmt.Errorf("launch: %s %s: %s: %s", action, id, resp.Status, body)
	}
	if err := json.Unmarshal(body, &dv); err != nil {
		return dv, fmt.Errorf("launch: %s %s: %w", action, id, err)
	}
	return dv, nil
}

// RollQueueNode replaces queue node p by a new process with the same id
// and addresses, the way a rolling upgrade does: drain it, wait until it
// holds no bucket, stop it (SIGTERM, SIGKILL after stopTimeout), start it
// again, undrain it and wait until it serves its share again.
func (c *Cluster) RollQueueNode(ctx context.Context, p *Process, operatorKey string, stopTimeout time.Duration) error {
	if _, err := c.Drain(ctx, p.Name, operatorKey); err != nil {
		return err
	}
	if err := c.WaitDrained(ctx, p.Name); err != nil {
		return err
	}
	p.Stop(syscall.SIGTERM, stopTimeout)
	if err := p.Restart(ctx); err != nil {
		return err
	}
	if _, err := c.Undrain(ctx, p.Name, operatorKey); err != nil {
		return err
	}
	return c.WaitServing(ctx, p.Name)
}

// RollGateway replaces gateway p by a new process on the same addresses:
// SIGTERM (it tells its clients to reconnect and exits; SIGKILL after
// stopTimeout), then a restart, and it returns once the new one is healthy
// (it routes by a table with a queue node link up).
func (c *Cluster) RollGateway(ctx context.Context, p *Process, stopTimeout time.Duration) error {
	p.Stop(syscall.SIGTERM, stopTimeout)
	if err := p.Restart(ctx); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, shapeTimeout)
	defer cancel()
	return p.WaitHealthy(ctx)
}

// Pause stops the running incarnation with SIGSTOP, as a GC storm or a VM
// hiccup would: it neither answers probes nor serves until Resume.
func (p *Process) Pause() error { return p.Signal(syscall.SIGSTOP) }

// Resume continues a paused process (SIGCONT).
func (p *Process) Resume() error { return p.Signal(syscall.SIGCONT) }
