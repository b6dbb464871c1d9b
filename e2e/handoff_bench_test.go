package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/launch"
)

// BenchmarkHandoff measures live bucket hand-off between real imq processes
// for BENCHMARKS.md (scripts/handoff-bench.sh runs it): a boss with
// --handoff and one bucket moving at a time (--max-moves 1), two queue
// nodes, one gateway. Queues are filled with full histories (the node's
// default 256 events of 64 B per message mount) and a state mount of a few
// keys; then the node holding them is drained, and it reports:
//
//   - handoff-ms: from the boss marking the filled bucket moving to the
//     table naming its new owner (the bucket/… cases);
//   - p99-ms, max-ms: publish→deliver latency of the events published while
//     the filled bucket was moving (bucket/…), or while the node was
//     draining (node/…), to subscribers of some of the moving queues;
//   - drain-s: from POST /v1/nodes/qn-1/drain until qn-1 holds no bucket;
//   - gaps: subscriptions that saw a gap or were ended (must be 0).
//
// Cases: bucket/1k and bucket/10k put that many queues in one bucket;
// node/10k spreads 10k queues over every bucket of the drained node. It
// takes minutes and gigabytes, so it runs only with IMQ_HANDOFF_BENCH=1;
// IMQ_HANDOFF_BENCH_HISTORY sets the events per queue (default 256).
func BenchmarkHandoff(b *testing.B) {
	if os.Getenv("IMQ_HANDOFF_BENCH") != "1" {
		b.Skip("set IMQ_HANDOFF_BENCH=1 (scripts/handoff-bench.sh): it runs real processes for minutes")
	}
	history := 256
	if s := os.Getenv("IMQ_HANDOFF_BENCH_HISTORY"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("IMQ_HANDOFF_BENCH_HISTORY=%q: want a positive number", s)
		}
		history = n
	}
	for _, bc := range []struct {
		name      string
		queues    int
		oneBucket bool
	}{
		{"bucket/1k", 1_000, true},
		{"bucket/10k", 10_000, true},
		{"node/10k", 10_000, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			benchHandoff(b, bc.queues, history, bc.oneBucket)
		})
	}
}

// handoffSubs is how many of the moving queues have a subscriber, and
// handoffRate how many events a second each gets during the measurement.
const (
	handoffSubs = 100
	handoffRate = 10
)

func benchHandoff(b *testing.B, queues, history int, oneBucket bool) {
	c := startOpsCluster(b, 2, 1, "--max-moves", "1")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t0, err := c.Table(ctx)
	if err != nil {
		b.Fatal(err)
	}
	victim := c.Nodes[0].Name
	names, filled := queuesOn(t0, victim, queues, oneBucket)
	url := c.URLs()[0]

	start := time.Now()
	if err := fillQueues(ctx, url, names, history); err != nil {
		b.Fatal(err)
	}
	b.Logf("%d queues × %d events filled in %v", len(names), history, time.Since(start).Round(time.Millisecond))

	// Subscribers to some of the moving queues, and a publisher to them.
	watched := names[:min(handoffSubs, len(names))]
	lat := newLatencies()
	subs, err := subscribe(ctx, url, watched, lat)
	if err != nil {
		b.Fatal(err)
	}
	defer subs.close()
	stopPub := make(chan struct{})
	var pubs sync.WaitGroup
	pubs.Go(func() { publishLoop(url, watched, stopPub) })
	time.Sleep(2 * time.Second) // steady state before the move

	// Follow the filled bucket (bucket cases) through the boss's table.
	marked, flipped := make(chan time.Time, 1), make(chan time.Time, 1)
	go watchBucket(ctx, c, filled, victim, marked, flipped)

	b.ResetTimer()
	drainStart := time.Now()
	if !oneBucket {
		lat.window(drainStart)
	}
	if _, err := c.Drain(ctx, victim, opsOperatorKey); err != nil {
		b.Fatal(err)
	}
	var markedAt, flippedAt time.Time
	if oneBucket {
		markedAt = <-marked
		lat.window(markedAt)
		flippedAt = <-flipped
		lat.closeWindow(flippedAt)
	}
	if err := c.WaitDrained(ctx, victim); err != nil {
		b.Fatal(err)
	}
	drained := time.Since(drainStart)
	if !oneBucket {
		lat.closeWindow(time.Now())
	}
	b.StopTimer()
	time.Sleep(time.Second) // the last events arrive
	close(stopPub)
	pubs.Wait()

	if oneBucket {
		b.ReportMetric(float64(flippedAt.Sub(markedAt).Microseconds())/1000, "handoff-ms")
	}
	b.ReportMetric(drained.Seconds(), "drain-s")
	h := lat.during()
	b.ReportMetric(float64(h.ValueAtQuantile(99))/1000, "p99-ms")
	b.ReportMetric(float64(h.Max())/1000, "max-ms")
	b.ReportMetric(float64(subs.gaps.Load()), "gaps")
	b.Logf("%d deliveries during the move; %d in all", h.TotalCount(), lat.all.Load())
}

// queuesOn returns n queue names that the table gives to node id: all in
// one bucket of id (returned too) when oneBucket, else spread over all of
// id's buckets. With oneBucket and no such names among the first candidates
// it gives up.
func queuesOn(t *bucket.Table, id string, n int, oneBucket bool) ([]string, int) {
	filled := -1
	if oneBucket {
		for bk := range t.Buckets() {
			if t.Owner(bk).ID == id {
				filled = bk
				break
			}
		}
	}
	var out []string
	for i := 0; len(out) < n && i < 1000*n; i++ {
		name := fmt.Sprintf("/bench/q%d", i)
		bk := t.Bucket(name)
		if t.Owner(bk).ID == id && (!oneBucket || bk == filled) {
			out = append(out, name)
		}
	}
	return out, filled
}

// fillQueues publishes history events to every queue and sets a few state
// keys, with 64 requests in flight, each user creating at most 500 queues
// (a gateway's --max-queue-creates allows 600 a minute per user).
func fillQueues(ctx context.Context, url string, names []string, history int) error {
	const inFlight = 64
	conns := max(4, (len(names)+499)/500)
	cls := make([]*client.Client, conns)
	for i := range cls {
		cl, err := client.Dial(ctx, url, client.WithUser(fmt.Sprintf("filler-%d", i)))
		if err != nil {
			return err
		}
		defer cl.Close()
		cls[i] = cl
	}
	work := make(chan int)
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	for range inFlight {
		wg.Go(func() {
			payload := make([]byte, 64)
			for q := range work {
				cl := cls[q%conns]
				for i := range history {
					if _, err := cl.Publish(ctx, names[q], "chat", payload); err != nil {
						firstErr.CompareAndSwap(nil, &err)
						return
					}
					if i < 4 {
						if _, err := cl.SetState(ctx, names[q], "scores", fmt.Sprintf("k%d", i), payload[:16]); err != nil {
							firstErr.CompareAndSwap(nil, &err)
							return
						}
					}
				}
			}
		})
	}
	for q := range names {
		if firstErr.Load() != nil {
			break
		}
		work <- q
	}
	close(work)
	wg.Wait()
	if p := firstErr.Load(); p != nil {
		return *p
	}
	return nil
}

// latencies records publish→deliver latency, in µs, of the events sent
// within a window (the move).
type latencies struct {
	mu       sync.Mutex
	h        *hdrhistogram.Histogram
	from, to int64 // window of send times, Unix ns; to 0: open
	all      atomic.Int64
}

func newLatencies() *latencies {
	return &latencies{h: hdrhistogram.New(1, int64(time.Minute/time.Microsecond), 3), from: -1}
}

func (l *latencies) window(from time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.from = from.UnixNano()
}

func (l *latencies) closeWindow(to time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.to = to.UnixNano()
}

func (l *latencies) record(sent int64, d time.Duration) {
	l.all.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.from >= 0 && sent >= l.from && (l.to == 0 || sent <= l.to) {
		l.h.RecordValue(max(1, d.Microseconds()))
	}
}

func (l *latencies) during() *hdrhistogram.Histogram {
	l.mu.Lock()
	defer l.mu.Unlock()
	return hdrhistogram.Import(l.h.Export())
}

// subscribers hold one subscription per watched queue, over a few
// connections, recording latencies and counting gaps and ends.
type subscribers struct {
	cls  []*client.Client
	gaps atomic.Int64
	wg   sync.WaitGroup
}

func subscribe(ctx context.Context, url string, queues []string, lat *latencies) (*subscribers, error) {
	s := &subscribers{}
	for i := range 4 {
		cl, err := client.Dial(ctx, url, client.WithUser(fmt.Sprintf("watcher-%d", i)))
		if err != nil {
			s.close()
			return nil, err
		}
		s.cls = append(s.cls, cl)
	}
	for i, q := range queues {
		sub, err := s.cls[i%len(s.cls)].Join(ctx, q, client.Messages("chat"))
		if err != nil {
			s.close()
			return nil, err
		}
		s.wg.Go(func() {
			for u := range sub.Updates() {
				switch u.Kind {
				case client.KindEvent:
					if sent := sentAt(u); sent > 0 {
						lat.record(sent, time.Duration(time.Now().UnixNano()-sent))
					}
				case client.KindGap, client.KindClosed:
					s.gaps.Add(1)
				}
			}
		})
	}
	return s, nil
}

func (s *subscribers) close() {
	for _, cl := range s.cls {
		cl.Close()
	}
	s.wg.Wait()
}

// publishLoop publishes a timestamped event to each queue handoffRate
// times a second until stop is closed; failures (retryable, during a move)
// are skipped.
func publishLoop(url string, queues []string, stop <-chan struct{}) {
	cl, err := client.Dial(context.Background(), url, client.WithUser("bench-publisher"))
	if err != nil {
		return
	}
	defer cl.Close()
	tick := time.NewTicker(time.Second / handoffRate)
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		for _, q := range queues {
			wg.Go(func() {
				payload := binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano()))
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				cl.Publish(ctx, q, "chat", payload)
			})
		}
	}
}

// watchBucket polls the boss's table until bucket bk is marked moving away
// from id (sent on marked) and then owned by another node (flipped).
func watchBucket(ctx context.Context, c *launch.Cluster, bk int, id string, marked, flipped chan<- time.Time) {
	if bk < 0 {
		return
	}
	sawMark := false
	for ctx.Err() == nil {
		t, err := c.Table(ctx)
		if err == nil {
			if _, moving := t.Target(bk); moving && !sawMark {
				sawMark = true
				marked <- time.Now()
			}
			if t.Owner(bk).ID != id {
				if !sawMark {
					marked <- time.Now() // flipped between two polls
				}
				flipped <- time.Now()
				return
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}
