package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
)

// DefaultPollWait is how long one long poll waits for a newer version.
const DefaultPollWait = 25 * time.Second

// Table returns the table installed last (bucket.Empty() before the first).
// It does not allocate.
func (c *Cluster) Table() *bucket.Table { return c.table.Load() }

// Install hands next to the install hook if it is newer than the table
// installed, then makes it the cluster's table, advertises its version and
// sum in the membership and, last, releases the waiters of WaitVersion. It reports
// whether next was installed. Run installs what it fetches; tests call
// Install directly, as if the boss had served next.
func (c *Cluster) Install(next *bucket.Table) bool {
	c.installMu.Lock()
	defer c.installMu.Unlock()
	old := c.table.Load()
	if next.Version() <= old.Version() {
		return false
	}
	c.cfg.Install(old, next)
	c.table.Store(next)
	c.member.Load().SetTable(next.Version(), next.Sum())
	c.mu.Lock()
	close(c.installed)
	c.installed = make(chan struct{})
	c.mu.Unlock()
	return true
}

// WaitVersion waits until a table of version v or newer is installed (the
// install hook has returned), asking the boss at once if it is not, and
// returns the installed table. When ctx ends first it returns the table
// installed then and ctx's error.
func (c *Cluster) WaitVersion(ctx context.Context, v uint64) (*bucket.Table, error) {
	for {
		c.mu.Lock()
		ch := c.installed
		c.mu.Unlock()
		if t := c.table.Load(); t.Version() >= v {
			return t, nil
		}
		c.Kick()
		select {
		case <-ch:
		case <-ctx.Done():
			return c.table.Load(), ctx.Err()
		}
	}
}

// Kick asks the boss now, without waiting out the poll under way. It never
// blocks; kicks before the next poll coalesce.
func (c *Cluster) Kick() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// KickIfBehind kicks when v, a table version a peer routed or answered by,
// is newer than the table installed.
func (c *Cluster) KickIfBehind(v uint64) {
	if v > c.table.Load().Version() {
		c.Kick()
	}
}

// Run follows the boss's table until ctx ends: it long-polls for a version
// newer than the installed one, installs what comes, and backs off (keeping
// the table it has) while the boss cannot be reached.
func (c *Cluster) Run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	failures := 0
	for ctx.Err() == nil {
		base, ok := c.BossURL()
		if !ok {
			c.pause(ctx, 250*time.Millisecond)
			continue
		}
		after := c.Table().Version()
		pctx, cancel := context.WithCancel(ctx)
		stopKick := c.cancelOnKick(pctx, cancel)
		t, err := c.poll(pctx, base, after)
		stopKick()
		cancel()
		if err == nil && t != nil && t.Version() <= after {
			// The boss answers a long poll only with a newer table: this
			// is not the boss (a gateway's or node's /v1/table answers at
			// once), and asking again at once would spin.
			err = fmt.Errorf("%w: it served table version %d, not newer than ours, %d", errNotBoss, t.Version(), after)
			t = nil
		}
		switch {
		case err == nil:
			failures, backoff = 0, 100*time.Millisecond
			if t != nil {
				c.Install(t)
			}
		case errors.Is(err, context.Canceled) && ctx.Err() == nil:
			// kicked: ask again at once
		case ctx.Err() == nil:
			failures++
			if failures == 1 || failures%30 == 0 {
				c.log.Warn("cannot get the bucket table from the boss; routing on the last one", "boss", base, "err", err, "attempts", failures)
			}
			c.pause(ctx, backoff/2+rand.N(backoff/2+1))
			backoff = min(2*backoff, 2*time.Second)
		}
	}
}

// cancelOnKick cancels the poll when Kick is called; stop ends the watch.
func (c *Cluster) cancelOnKick(ctx context.Context, cancel func()) (stop func()) {
	done := make(chan struct{})
	go func() { // ends with stop or ctx
		select {
		case <-c.kick:
			cancel()
		case <-done:
		case <-ctx.Done():
		}
	}()
	return func() { close(done) }
}

// pause waits d, or until a kick or ctx's end.
func (c *Cluster) pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-c.kick:
	case <-t.C:
	}
}

// poll asks the boss at base for a table newer than version after; nil
// means none came in the wait.
func (c *Cluster) poll(ctx context.Context, base string, after uint64) (*bucket.Table, error) {
	url := base + TablePath + "?after=" + strconv.FormatUint(after, 10) + "&wait=" + c.cfg.PollWait.String()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.PollWait+10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.cfg.Client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNotModified:
		return nil, nil
	case http.StatusOK:
	default:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("boss answered %s: %s", resp.Status, b)
	}
	return DecodeTable(resp.Body)
}
