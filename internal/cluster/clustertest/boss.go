// Package clustertest is test support for services that follow a bucket
// table: a boss whose table the test sets. Only tests import it.
package clustertest

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
)

// Boss serves GET /v1/table as the boss does: at once when it holds a table
// newer than ?after, else when the test sets one (or the ?wait ends, or the
// test does: 304).
type Boss struct {
	mu      sync.Mutex
	table   *bucket.Table  // guarded by mu
	changed chan struct{}  // closed at each new table; guarded by mu
	polls   map[uint64]int // requests by ?after; guarded by mu
	stop    chan struct{}  // closed when the test ends: ends every waiting poll
}

// StartBoss serves table from a Boss on 127.0.0.1 until the test ends.
func StartBoss(t testing.TB, table *bucket.Table) (*Boss, *httptest.Server) {
	t.Helper()
	b := &Boss{table: table, changed: make(chan struct{}), polls: make(map[uint64]int), stop: make(chan struct{})}
	srv := httptest.NewServer(b)
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(b.stop) }) // runs before srv.Close, which waits for the polls
	return b, srv
}

// Set makes table the one the boss serves, and answers the waiting polls.
func (b *Boss) Set(table *bucket.Table) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.table = table
	close(b.changed)
	b.changed = make(chan struct{})
}

// Polls returns how many polls asked for a table newer than v.
func (b *Boss) Polls(v uint64) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.polls[v]
}

func (b *Boss) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	after, _ := strconv.ParseUint(r.URL.Query().Get("after"), 10, 64)
	var timeout <-chan time.Time
	if wait, err := time.ParseDuration(r.URL.Query().Get("wait")); err == nil && wait > 0 {
		timer := time.NewTimer(wait)
		defer timer.Stop()
		timeout = timer.C
	}
	b.mu.Lock()
	b.polls[after]++
	table, changed := b.table, b.changed
	b.mu.Unlock()
	if table.Version() <= after {
		select {
		case <-changed:
		case <-timeout:
		case <-b.stop:
		case <-r.Context().Done():
			return
		}
		b.mu.Lock()
		table = b.table
		b.mu.Unlock()
		if table.Version() <= after {
			w.WriteHeader(http.StatusNotModified)
			return
		}
	}
	cluster.ServeTable(w, table)
}
