package tablewatch

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/testutil"
)

// fakeBoss serves tables the way the boss does: 200 when it has a newer
// one than ?after, else 304 after the wait (or at once when told).
type fakeBoss struct {
	mu      sync.Mutex
	table   *bucket.Table
	changed chan struct{}
	polls   int
	broken  bool
}

func newFakeBoss(t *bucket.Table) *fakeBoss { return &fakeBoss{table: t, changed: make(chan struct{})} }

func (b *fakeBoss) publish(t *bucket.Table) {
	b.mu.Lock()
	b.table = t
	close(b.changed)
	b.changed = make(chan struct{})
	b.mu.Unlock()
}

func (b *fakeBoss) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	after, _ := strconv.ParseUint(r.URL.Query().Get("after"), 10, 64)
	wait, _ := time.ParseDuration(r.URL.Query().Get("wait"))
	b.mu.Lock()
	b.polls++
	broken := b.broken
	t, ch := b.table, b.changed
	b.mu.Unlock()
	if broken {
		http.Error(w, "broken", http.StatusInternalServerError)
		return
	}
	if t.Version() <= after {
		select {
		case <-ch:
		case <-time.After(wait):
		case <-r.Context().Done():
			return
		}
		b.mu.Lock()
		t = b.table
		b.mu.Unlock()
		if t.Version() <= after {
			w.WriteHeader(http.StatusNotModified)
			return
		}
	}
	ServeTable(w, t)
}

func table(ids ...string) *bucket.Table {
	t := bucket.Empty()
	for _, id := range ids {
		t, _, _ = t.Join(bucket.Node{ID: id, LinkAddr: id + ":1"})
	}
	return t
}

func startWatcher(t *testing.T, boss *fakeBoss, onChange func(old, next *bucket.Table)) *Watcher {
	srv := httptest.NewServer(boss)
	t.Cleanup(srv.Close)
	w := New(Config{BossURL: func() (string, bool) { return srv.URL, true }, OnChange: onChange, Wait: 200 * time.Millisecond}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

func TestWatcherFollowsTheBossInOrder(t *testing.T) {
	boss := newFakeBoss(table("a"))
	var mu sync.Mutex
	var seen []uint64
	w := startWatcher(t, boss, func(old, next *bucket.Table) {
		mu.Lock()
		seen = append(seen, next.Version())
		mu.Unlock()
		if next.Version() <= old.Version() {
			t.Errorf("OnChange went from v%d to v%d", old.Version(), next.Version())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if got, err := w.AtLeast(ctx, 1); err != nil || len(got.Nodes()) != 1 {
		t.Fatalf("first table: %v %v", got, err)
	}
	time.Sleep(300 * time.Millisecond) // a poll times out with 304 in between
	boss.publish(table("a", "b"))
	if got, err := w.AtLeast(ctx, 2); err != nil || len(got.Nodes()) != 2 {
		t.Fatalf("second table: %v %v", got, err)
	}
	// OnChange runs once Table returns the new table: wait for it.
	testutil.WaitFor(t, 5*time.Second, "OnChange to see the second table", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) >= 2
	})
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != 1 || seen[1] != 2 {
		t.Fatalf("OnChange saw versions %v, want [1 2]", seen)
	}
}

func TestWatcherNeverGoesBack(t *testing.T) {
	boss := newFakeBoss(table("a", "b", "c"))
	w := startWatcher(t, boss, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := w.AtLeast(ctx, 3); err != nil {
		t.Fatal(err)
	}
	boss.publish(table("x")) // version 1: a boss that lost its state
	time.Sleep(500 * time.Millisecond)
	if v := w.Table().Version(); v != 3 {
		t.Fatalf("the watcher went back to v%d", v)
	}
}

func TestWatcherKeepsItsTableWhileTheBossIsDown(t *testing.T) {
	boss := newFakeBoss(table("a"))
	w := startWatcher(t, boss, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := w.AtLeast(ctx, 1); err != nil {
		t.Fatal(err)
	}
	boss.mu.Lock()
	boss.broken = true
	boss.mu.Unlock()
	time.Sleep(400 * time.Millisecond)
	if w.Table().Version() != 1 {
		t.Fatal("the table was dropped while the boss failed")
	}
	boss.mu.Lock()
	boss.broken = false
	boss.mu.Unlock()
	boss.publish(table("a", "b"))
	if _, err := w.AtLeast(ctx, 2); err != nil {
		t.Fatalf("no table after the boss came back: %v", err)
	}
}

func TestDecodeRefusesGarbage(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"version":9,"bits":1,"nodes":[{"id":"a"}],"owners":[0,5]}`))
	}))
	defer srv.Close()
	w := New(Config{BossURL: func() (string, bool) { return srv.URL, true }}, nil)
	if _, err := w.poll(context.Background(), srv.URL); err == nil {
		t.Fatal("a table with an owner out of range was accepted")
	}
	if w.Table().Version() != 0 {
		t.Fatal("a bad table was installed")
	}
}

// TestWatcherDoesNotSpinOnANonBoss: a URL that answers at once with a table
// no newer than ours (a gateway's or queue node's /v1/table given as the
// boss) is polled with backoff, not in a tight loop.
func TestWatcherDoesNotSpinOnANonBoss(t *testing.T) {
	var mu sync.Mutex
	polls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		polls++
		mu.Unlock()
		ServeTable(w, table("a"))
	}))
	defer srv.Close()
	w := New(Config{BossURL: func() (string, bool) { return srv.URL, true }}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	time.Sleep(500 * time.Millisecond)
	cancel()
	<-done
	if w.Table().Version() != 1 {
		t.Fatalf("table v%d, want the v1 served", w.Table().Version())
	}
	mu.Lock()
	defer mu.Unlock()
	if polls > 20 {
		t.Fatalf("%d polls in half a second", polls)
	}
}
