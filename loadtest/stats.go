package loadtest

import (
	"errors"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/imq-dev/imq/client"
)

// Histograms record microseconds from 1µs to 60s with 3 significant digits.
const (
	histLowest  = 1
	histHighest = int64(60 * time.Second / time.Microsecond)
	histSigFigs = 3
)

func newHist() *hdrhistogram.Histogram {
	return hdrhistogram.New(histLowest, histHighest, histSigFigs)
}

// recordDur records d in microseconds, clamped into the histogram's range.
func recordDur(h *hdrhistogram.Histogram, d time.Duration) {
	_ = h.RecordValue(min(max(d.Microseconds(), histLowest), histHighest))
}

// exportHist returns h's snapshot with trailing zero counts cut, which
// Import accepts; nil for an empty histogram.
func exportHist(h *hdrhistogram.Histogram) *hdrhistogram.Snapshot {
	if h == nil || h.TotalCount() == 0 {
		return nil
	}
	s := h.Export()
	n := len(s.Counts)
	for n > 0 && s.Counts[n-1] == 0 {
		n--
	}
	s.Counts = s.Counts[:n]
	return s
}

// mergeSnap merges a snapshot into dst; a nil snapshot is empty.
func mergeSnap(dst *hdrhistogram.Histogram, s *hdrhistogram.Snapshot) {
	if s != nil {
		dst.Merge(hdrhistogram.Import(s))
	}
}

// Counters are event counts: deltas in a Tick, totals in a Report.
type Counters struct {
	Requests      int64 `json:"requests"`       // publish, set-state, join, leave requests sent
	Failed        int64 `json:"failed"`         // of which failed (by code in Errors)
	Publishes     int64 `json:"publishes"`      // chat publishes that succeeded
	Deliveries    int64 `json:"deliveries"`     // chat events received, all bots
	StateSets     int64 `json:"state_sets"`     // own-key updates that succeeded
	StateUpdates  int64 `json:"state_updates"`  // state changes received, all bots
	Joins         int64 `json:"joins"`          // joins that succeeded, first and churn
	Leaves        int64 `json:"leaves"`         // churn leaves
	Connects      int64 `json:"connects"`       // bots that connected
	ConnectFailed int64 `json:"connect_failed"` // bots that could not connect
	// ConnectRefused counts the bots among ConnectFailed whose last attempt
	// the gateway refused with 429 Too Many Requests (its per-address
	// limits, such as --max-pending-per-ip).
	ConnectRefused int64 `json:"connect_refused_429,omitempty"`
}

func (c *Counters) add(o Counters) {
	c.Requests += o.Requests
	c.Failed += o.Failed
	c.Publishes += o.Publishes
	c.Deliveries += o.Deliveries
	c.StateSets += o.StateSets
	c.StateUpdates += o.StateUpdates
	c.Joins += o.Joins
	c.Leaves += o.Leaves
	c.Connects += o.Connects
	c.ConnectFailed += o.ConnectFailed
	c.ConnectRefused += o.ConnectRefused
}

// Tick is one second of one engine's measurements: counter deltas, the
// connected-bots gauge, and the latency histograms of that second. Workers
// stream it as one JSON line.
type Tick struct {
	Connected   int64                  `json:"connected"`
	Counters    Counters               `json:"counters"`
	Errors      map[string]int64       `json:"errors,omitempty"`
	Disconnects map[string]int64       `json:"disconnects,omitempty"`
	Violations  map[string]int64       `json:"violations,omitempty"`
	Deliver     *hdrhistogram.Snapshot `json:"deliver,omitempty"`
	Join        *hdrhistogram.Snapshot `json:"join,omitempty"`
	Connect     *hdrhistogram.Snapshot `json:"connect,omitempty"`
	RampStopped string                 `json:"ramp_stopped,omitempty"`
	// ConnectError is the first error a bot could not connect with, sent
	// once.
	ConnectError string `json:"connect_error,omitempty"`
}

// histShards spreads the delivery histogram over locks: every received
// event records into it.
const histShards = 16

type shard struct {
	mu sync.Mutex
	h  *hdrhistogram.Histogram // guarded by mu
}

// stats is what an engine's bots record into, concurrently; tick takes and
// resets one second's worth.
type stats struct {
	connected                               atomic.Int64
	requests, failed, publishes, deliveries atomic.Int64
	stateSets, stateUpdates, joins, leaves  atomic.Int64
	connects, connectFailed, connectRefused atomic.Int64
	connectErr                              atomic.Pointer[string] // the first connect failure
	connectErrSent                          bool                   // owned by tick's caller
	deliver                                 [histShards]shard
	mu                                      sync.Mutex
	// Guarded by mu.
	join, connect                   *hdrhistogram.Histogram
	errors, disconnects, violations map[string]int64
}

func newStats() *stats {
	s := &stats{join: newHist(), connect: newHist(),
		errors: map[string]int64{}, disconnects: map[string]int64{}, violations: map[string]int64{}}
	for i := range s.deliver {
		s.deliver[i].h = newHist()
	}
	return s
}

func (s *stats) recordDeliver(bot int, d time.Duration) {
	sh := &s.deliver[bot%histShards]
	sh.mu.Lock()
	recordDur(sh.h, d)
	sh.mu.Unlock()
}

func (s *stats) recordJoin(d time.Duration) {
	s.mu.Lock()
	recordDur(s.join, d)
	s.mu.Unlock()
}

func (s *stats) recordConnect(d time.Duration) {
	s.mu.Lock()
	recordDur(s.connect, d)
	s.mu.Unlock()
}

func (s *stats) bump(m func(*stats) map[string]int64, key string) {
	s.mu.Lock()
	m(s)[key]++
	s.mu.Unlock()
}

func (s *stats) violation(kind string) {
	s.bump(func(s *stats) map[string]int64 { return s.violations }, kind)
}

func (s *stats) disconnect(reason string) {
	s.bump(func(s *stats) map[string]int64 { return s.disconnects }, reason)
}

// connectFailure counts a bot that could not connect, as a failed request
// too, and keeps the first error.
func (s *stats) connectFailure(err error) {
	s.connectFailed.Add(1)
	if refused429(err) {
		s.connectRefused.Add(1)
	}
	s.requests.Add(1)
	s.failed.Add(1)
	s.bump(func(s *stats) map[string]int64 { return s.errors }, "CONNECT_FAILED")
	msg := err.Error()
	s.connectErr.CompareAndSwap(nil, &msg)
}

// refused429 says whether err is a WebSocket upgrade the gateway refused
// with 429 Too Many Requests (the client puts the status in the text).
func refused429(err error) bool {
	return strings.Contains(err.Error(), "websocket handshake: 429 ")
}

// request counts one request and, if it failed, its error code.
func (s *stats) request(err error) {
	s.requests.Add(1)
	if err != nil {
		s.failed.Add(1)
		s.bump(func(s *stats) map[string]int64 { return s.errors }, errorCode(err))
	}
}

// errorCode names err by the protocol's code or the client's sentinel.
func errorCode(err error) string {
	if e, ok := errors.AsType[*client.Error](err); ok {
		return e.Code.String()
	}
	switch {
	case errors.Is(err, client.ErrTimeout):
		return "TIMEOUT"
	case errors.Is(err, client.ErrConnectionLost):
		return "CONNECTION_LOST"
	case errors.Is(err, client.ErrClosed):
		return "CLIENT_CLOSED"
	}
	return "OTHER"
}

// tick takes the counts and histograms recorded since the last tick.
func (s *stats) tick() Tick {
	t := Tick{Connected: s.connected.Load(), Counters: Counters{
		Requests: s.requests.Swap(0), Failed: s.failed.Swap(0), Publishes: s.publishes.Swap(0),
		Deliveries: s.deliveries.Swap(0), StateSets: s.stateSets.Swap(0), StateUpdates: s.stateUpdates.Swap(0),
		Joins: s.joins.Swap(0), Leaves: s.leaves.Swap(0), Connects: s.connects.Swap(0), ConnectFailed: s.connectFailed.Swap(0),
		ConnectRefused: s.connectRefused.Swap(0),
	}}
	if p := s.connectErr.Load(); p != nil && !s.connectErrSent {
		t.ConnectError, s.connectErrSent = *p, true
	}
	win := newHist()
	for i := range s.deliver {
		sh := &s.deliver[i]
		sh.mu.Lock()
		win.Merge(sh.h)
		sh.h.Reset()
		sh.mu.Unlock()
	}
	t.Deliver = exportHist(win)
	s.mu.Lock()
	defer s.mu.Unlock()
	t.Join, t.Connect = exportHist(s.join), exportHist(s.connect)
	s.join.Reset()
	s.connect.Reset()
	take := func(m map[string]int64) map[string]int64 {
		if len(m) == 0 {
			return nil
		}
		out := maps.Clone(m)
		clear(m)
		return out
	}
	t.Errors, t.Disconnects, t.Violations = take(s.errors), take(s.disconnects), take(s.violations)
	return t
}

func addMap(dst map[string]int64, src map[string]int64) {
	for k, v := range src {
		dst[k] += v
	}
}
