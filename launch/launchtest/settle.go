package launchtest

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/launch"
)

// settleTimeout bounds WaitSettled: the boss moves at most --max-moves
// buckets at a time by hand-off, each within --move-timeout.
const settleTimeout = 90 * time.Second

// givenUpSettle is how long a table must stay unchanged to count as settled
// once the boss has given a move up: longer than the boss's reconcile
// interval (1 s), at which it marks the move again.
const givenUpSettle = 1500 * time.Millisecond

// WaitSettled waits until cluster c has settled and returns the boss's
// table then: the table has settled (WaitTableSettled), and every running
// gateway routes by it with a link up to each node
// (launch.Cluster.WaitRouting). With hand-off, a table that lists a new
// node may still be moving buckets to it, and gateways route by owners
// only: a test that reads who holds a queue from the table must read it
// from a settled one. It fails the test if the cluster has not settled
// within 90 s.
func WaitSettled(t testing.TB, c *launch.Cluster) *bucket.Table {
	t.Helper()
	return waitSettled(t, c, true)
}

// WaitTableSettled waits until the boss's table has settled and returns
// it: no bucket is moving, and it lists exactly the running queue nodes
// (each owning buckets: a node that owns nothing and is no move's target
// is not listed). Unlike WaitSettled it does not wait for the gateways,
// for a test that keeps one from learning the table. It fails the test if
// the table has not settled within 90 s.
func WaitTableSettled(t testing.TB, c *launch.Cluster) *bucket.Table {
	t.Helper()
	return waitSettled(t, c, false)
}

func waitSettled(t testing.TB, c *launch.Cluster, gateways bool) *bucket.Table {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
	defer cancel()
	var last error
	for {
		tb, err := settled(ctx, c, gateways)
		if err == nil {
			return tb
		}
		last = err
		select {
		case <-ctx.Done():
			t.Fatalf("the cluster did not settle within %v: %v", settleTimeout, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// settled returns the boss's table if it has settled and, when gateways,
// every gateway routes by it (WaitSettled); otherwise it says why not.
func settled(ctx context.Context, c *launch.Cluster, gateways bool) (*bucket.Table, error) {
	tb, err := c.Table(ctx)
	if err != nil {
		return nil, err
	}
	if n := tb.MovingCount(); n > 0 {
		return nil, fmt.Errorf("table v%d: %d buckets moving: %v", tb.Version(), n, tb.Moving())
	}
	var want, have []string
	for _, p := range c.Nodes {
		select {
		case <-p.Done(): // stopped or killed
		default:
			want = append(want, p.Name)
		}
	}
	for _, n := range tb.Nodes() {
		have = append(have, n.ID)
	}
	slices.Sort(want)
	if !slices.Equal(have, want) {
		return nil, fmt.Errorf("table v%d lists nodes %v, want the running %v", tb.Version(), have, want)
	}
	// A move given up (not reported within --move-timeout) loses its mark
	// and is marked again only at the boss's next reconcile (every second):
	// in between, the table moves nothing yet has not reached the layout.
	// After a give-up, then, the table must stay as it is for longer.
	if n, err := givenUp(ctx, c); err != nil {
		return nil, err
	} else if n > 0 {
		time.Sleep(givenUpSettle)
		if now, err := c.Table(ctx); err != nil {
			return nil, err
		} else if now.Version() != tb.Version() {
			return nil, fmt.Errorf("the table changed from v%d to v%d (%g moves given up so far)", tb.Version(), now.Version(), n)
		}
	}
	if !gateways {
		return tb, nil
	}
	// Every gateway routes by the boss's table; it is still the settled one.
	if err := c.WaitRouting(ctx); err != nil {
		return nil, err
	}
	now, err := c.Table(ctx)
	if err != nil {
		return nil, err
	}
	if now.Version() != tb.Version() {
		return nil, fmt.Errorf("the table changed from v%d to v%d", tb.Version(), now.Version())
	}
	return tb, nil
}

// givenUp returns how many moves the boss has given up since it started
// (imq_boss_moves_given_up_total on its /metrics).
func givenUp(ctx context.Context, c *launch.Cluster) (float64, error) {
	const name = "imq_boss_moves_given_up_total"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Boss.Addr("http")+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET boss /metrics: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("the boss's /metrics has no %s", name)
}
