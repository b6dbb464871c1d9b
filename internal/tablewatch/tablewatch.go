// Package tablewatch keeps a process's copy of the bucket table current: it
// long-polls the boss (GET /v1/table?after=V) and hands each newer version to
// the process, in order. While the boss is away the last table stays in
// force: routing never waits for the boss.
package tablewatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
)

// errNotBoss: an answer to a long poll that the boss would not give.
var errNotBoss = errors.New("the boss URL does not long-poll like the boss")

// Path is the boss's table endpoint, also served by every gateway and queue
// node (their current table) for the boss to reconcile with after a restart.
const Path = "/v1/table"

// MaxTableBytes bounds a table response: 2^20 buckets with long addresses
// stay well under it.
const MaxTableBytes = 64 << 20

// DefaultWait is how long one long-poll waits for a newer version.
const DefaultWait = 25 * time.Second

// Config configures a Watcher.
type Config struct {
	// BossURL returns the boss's base URL ("http://127.0.0.1:7900"), and
	// false while no boss is known.
	BossURL func() (string, bool)
	// OnChange, if set, runs on the watcher's goroutine for each newer table,
	// in version order, after Table returns it.
	OnChange func(old, next *bucket.Table)
	// Wait is one long-poll's wait. Default DefaultWait.
	Wait time.Duration
	// Logger; default discard.
	Logger *slog.Logger
	// Client makes the requests; default one with no overall timeout (the
	// request context bounds each poll).
	Client *http.Client
}

// Watcher holds the newest table this process knows.
type Watcher struct {
	cfg     Config
	log     *slog.Logger
	table   atomic.Pointer[bucket.Table]
	kick    chan struct{}
	mu      sync.Mutex
	changed chan struct{} // closed and replaced at each new table; guarded by mu
}

// New returns a watcher holding initial (bucket.Empty() if nil).
func New(cfg Config, initial *bucket.Table) *Watcher {
	if cfg.Wait <= 0 {
		cfg.Wait = DefaultWait
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{}
	}
	if initial == nil {
		initial = bucket.Empty()
	}
	w := &Watcher{cfg: cfg, log: cfg.Logger, kick: make(chan struct{}, 1), changed: make(chan struct{})}
	w.table.Store(initial)
	return w
}

// Table returns the newest table known. It does not allocate.
func (w *Watcher) Table() *bucket.Table { return w.table.Load() }

// Changed returns a channel closed when a newer table than the current one
// arrives.
func (w *Watcher) Changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changed
}

// Kick asks the boss now, without waiting out a poll: a peer has seen a
// newer version. It never blocks.
func (w *Watcher) Kick() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// AtLeast waits until the table's version is at least v, or ctx ends, and
// returns the table then.
func (w *Watcher) AtLeast(ctx context.Context, v uint64) (*bucket.Table, error) {
	for {
		ch := w.Changed()
		if t := w.Table(); t.Version() >= v {
			return t, nil
		}
		w.Kick()
		select {
		case <-ch:
		case <-ctx.Done():
			return w.Table(), ctx.Err()
		}
	}
}

// Run polls the boss until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	failures := 0
	for ctx.Err() == nil {
		base, ok := w.cfg.BossURL()
		if !ok {
			w.pause(ctx, 250*time.Millisecond)
			continue
		}
		pctx, cancel := context.WithCancel(ctx)
		stopKick := w.cancelOnKick(pctx, cancel)
		t, err := w.poll(pctx, base)
		stopKick()
		cancel()
		if err == nil && t != nil && t.Version() <= w.Table().Version() {
			// The boss answers a long poll only with a newer table: this
			// is not the boss (a gateway's or node's /v1/table answers at
			// once), and asking again at once would spin.
			err = fmt.Errorf("%w: it served table version %d, not newer than ours, %d", errNotBoss, t.Version(), w.Table().Version())
			t = nil
		}
		switch {
		case err == nil:
			failures, backoff = 0, 100*time.Millisecond
			if t != nil {
				w.offer(t)
			}
		case errors.Is(err, context.Canceled) && ctx.Err() == nil:
			// kicked: ask again at once
		case ctx.Err() == nil:
			failures++
			if failures == 1 || failures%30 == 0 {
				w.log.Warn("cannot get the bucket table from the boss; routing on the last one", "boss", base, "err", err, "attempts", failures)
			}
			w.pause(ctx, backoff/2+rand.N(backoff/2+1))
			backoff = min(2*backoff, 2*time.Second)
		}
	}
}

// cancelOnKick cancels the poll when Kick is called; stop ends the watch.
func (w *Watcher) cancelOnKick(ctx context.Context, cancel func()) (stop func()) {
	done := make(chan struct{})
	go func() { // ends with stop or ctx
		select {
		case <-w.kick:
			cancel()
		case <-done:
		case <-ctx.Done():
		}
	}()
	return func() { close(done) }
}

func (w *Watcher) pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-w.kick:
	case <-time.After(d):
	}
}

// poll asks the boss for a table newer than ours; nil means none came in
// the wait.
func (w *Watcher) poll(ctx context.Context, base string) (*bucket.Table, error) {
	cur := w.Table().Version()
	url := base + Path + "?after=" + strconv.FormatUint(cur, 10) + "&wait=" + w.cfg.Wait.String()
	ctx, cancel := context.WithTimeout(ctx, w.cfg.Wait+10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := w.cfg.Client.Do(req)
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
	return Decode(resp.Body)
}

// Decode reads one table in the JSON form of bucket.Table, at most
// MaxTableBytes.
func Decode(r io.Reader) (*bucket.Table, error) {
	var t bucket.Table
	dec := json.NewDecoder(io.LimitReader(r, MaxTableBytes))
	if err := dec.Decode(&t); err != nil {
		return nil, err
	}
	return &t, nil
}

// offer installs t if it is newer than the current table.
func (w *Watcher) offer(t *bucket.Table) {
	old := w.Table()
	if t.Version() <= old.Version() {
		return
	}
	w.table.Store(t)
	w.mu.Lock()
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
	w.log.Info("bucket table updated", "version", t.Version(), "from", old.Version(), "nodes", len(t.Nodes()), "buckets", t.Buckets())
	if w.cfg.OnChange != nil {
		w.cfg.OnChange(old, t)
	}
}

// ServeTable answers GET /v1/table with t.
func ServeTable(w http.ResponseWriter, t *bucket.Table) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-IMQ-Table-Version", strconv.FormatUint(t.Version(), 10))
	json.NewEncoder(w).Encode(t)
}
