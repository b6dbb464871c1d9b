package loadtest

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// sourceMsg is what an engine, in process or in a worker, sends the
// aggregator: a tick, or its final result (or failure) exactly once.
type sourceMsg struct {
	src   int
	tick  *Tick
	final *engineResult
	err   error
}

// abortWindow is how many recent seconds the abort thresholds look at.
const abortWindow = 3

// flushPhase is how long after the engines' ticks the aggregator closes
// each second.
const flushPhase = 500 * time.Millisecond

// minAbortRequests is the fewest requests in the window for the error
// rate to count, so that one failure of three does not abort a run.
const minAbortRequests = 20

// Run runs cfg's scenario and returns its report. It prints a progress
// line each second and stops early, with Report.AbortReason set, when an
// abort threshold is passed; when ctx ends it stops the bots and reports
// what they did so far. The error is for a run that could not happen (bad
// configuration, workers that failed); a run that aborted or saw violations
// still returns a nil error with its report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	ch := make(chan sourceMsg, 64)
	if cfg.Workers <= 1 {
		rooms := make([]int, cfg.Scenario.Rooms)
		for i := range rooms {
			rooms[i] = i
		}
		go func() {
			res := runEngine(ctx, cfg, rooms, func(t Tick) { ch <- sourceMsg{tick: &t} })
			ch <- sourceMsg{final: &res}
		}()
	} else if err := startWorkers(ctx, cfg, ch); err != nil {
		return nil, err
	}
	a := newAggregator(cfg)
	var errs []string
	// Engines tick each second from their start; the aggregator closes
	// its seconds half a second later, so that each point holds one tick
	// of each engine (workers start a little later than this process),
	// rather than none in one point and two in the next.
	flushes := 1
	flush := time.NewTimer(flushPhase + time.Second)
	defer flush.Stop()
	for pending := cfg.Workers; pending > 0; {
		select {
		case m := <-ch:
			switch {
			case m.tick != nil:
				a.add(m.src, m.tick)
			case m.final != nil:
				a.final(m.final)
				pending--
			default:
				errs = append(errs, m.err.Error())
				pending--
			}
		case <-flush.C:
			flushes++
			flush.Reset(time.Until(a.start.Add(flushPhase + time.Duration(flushes)*time.Second)))
			a.flush()
			if a.report.AbortReason == "" {
				if why := a.abortCheck(); why != "" {
					a.report.AbortReason = why
					cfg.Logger.Warn("aborting", "why", why)
					stop()
				}
			}
		}
	}
	a.flush()
	if cfg.Terminal {
		fmt.Fprintln(cfg.Out)
	}
	r := a.finish()
	if len(errs) > 0 {
		return r, fmt.Errorf("workers failed: %s", strings.Join(errs, "; "))
	}
	return r, nil
}

// aggregator merges the ticks of every engine into one report, a point
// per second, and judges the abort thresholds. It is used by Run's
// goroutine only.
type aggregator struct {
	cfg       Config
	start     time.Time
	report    *Report
	connected map[int]int64 // latest gauge per source
	total     map[string]*hdrhistogram.Histogram
	win       Tick // accumulated since the last flush
	winHist   *hdrhistogram.Histogram
	recent    []*hdrhistogram.Histogram // the last abortWindow seconds of deliveries
	recentReq []Counters
	lastLine  int
}

func newAggregator(cfg Config) *aggregator {
	now := time.Now()
	return &aggregator{
		cfg:   cfg,
		start: now,
		report: &Report{
			URL: cfg.URL, Scenario: cfg.Scenario, Workers: cfg.Workers, RunID: cfg.RunID, AbortErrors: cfg.AbortErrors,
			Started: now, BotsPlanned: cfg.Scenario.Bots(), TrackLimit: cfg.TrackLimit,
			Errors: map[string]int64{}, Disconnects: map[string]int64{}, Violations: map[string]int64{},
			Latency: map[string]LatencySummary{},
		},
		connected: map[int]int64{},
		total:     map[string]*hdrhistogram.Histogram{"deliver": newHist(), "join": newHist(), "connect": newHist()},
		winHist:   newHist(),
	}
}

func (a *aggregator) add(src int, t *Tick) {
	r := a.report
	a.connected[src] = t.Connected
	r.Counters.add(t.Counters)
	a.win.Counters.add(t.Counters)
	addMap(r.Errors, t.Errors)
	addMap(r.Disconnects, t.Disconnects)
	addMap(r.Violations, t.Violations)
	mergeSnap(a.total["deliver"], t.Deliver)
	mergeSnap(a.total["join"], t.Join)
	mergeSnap(a.total["connect"], t.Connect)
	mergeSnap(a.winHist, t.Deliver)
	if t.RampStopped != "" && r.RampStopped == "" {
		r.RampStopped = t.RampStopped
	}
	if t.ConnectError != "" && r.ConnectError == "" {
		r.ConnectError = t.ConnectError
	}
}

func (a *aggregator) final(res *engineResult) {
	r := a.report
	r.BotsStarted += res.Bots
	r.Verify.add(res.Verify)
	r.State.add(res.State)
	if res.RampStopped != "" && r.RampStopped == "" {
		r.RampStopped = res.RampStopped
	}
	if r.FileLimit == 0 || res.FileLimit < r.FileLimit {
		r.FileLimit = res.FileLimit
	}
}

// flush closes the current second: a point of the series and a progress
// line.
func (a *aggregator) flush() {
	r := a.report
	var connected int64
	for _, c := range a.connected {
		connected += c
	}
	r.PeakConnected = max(r.PeakConnected, connected)
	// The point is stamped with the end of the engines' second it holds.
	t := max(time.Since(a.start).Seconds()-flushPhase.Seconds(), 0)
	dt := max(t, 1)
	if n := len(r.Series); n > 0 {
		t = max(t, r.Series[n-1].T)
		dt = max(t-r.Series[n-1].T, 1) // the last flush may come early: no inflated rate
	}
	c := a.win.Counters
	h := a.winHist
	p := Point{
		T: t, Connected: connected, LatencySamples: h.TotalCount(),
		PublishesPerSec: float64(c.Publishes) / dt, DeliveriesPerSec: float64(c.Deliveries) / dt,
		P50Ms: usToMs(h.ValueAtPercentile(50)), P99Ms: usToMs(h.ValueAtPercentile(99)), MaxMs: usToMs(h.Max()),
		Requests: c.Requests, Failed: c.Failed,
	}
	r.Series = append(r.Series, p)
	a.recent = append(a.recent, h)
	a.recentReq = append(a.recentReq, c)
	if len(a.recent) > abortWindow {
		a.recent, a.recentReq = a.recent[1:], a.recentReq[1:]
	}
	a.win, a.winHist = Tick{}, newHist()
	a.progress(p)
}

func (a *aggregator) progress(p Point) {
	line := fmt.Sprintf("%5.0fs  bots %d/%d  pub/s %.0f  deliv/s %.0f  p50 %.2fms  p99 %.2fms  errors %d  violations %d",
		p.T, p.Connected, a.report.BotsPlanned, p.PublishesPerSec, p.DeliveriesPerSec, p.P50Ms, p.P99Ms,
		a.report.Counters.Failed, a.report.TotalViolations())
	if !a.cfg.Terminal {
		fmt.Fprintln(a.cfg.Out, line)
		return
	}
	pad := max(0, a.lastLine-len(line))
	a.lastLine = len(line)
	fmt.Fprintf(a.cfg.Out, "\r%s%s", line, strings.Repeat(" ", pad))
}

// abortCheck returns why the run must stop, or "".
func (a *aggregator) abortCheck() string {
	// Connect failures are judged once enough bots have tried: the run
	// would fail at its end anyway (Report.Err), so it stops now.
	if c := a.report.Counters; c.Connects+c.ConnectFailed >= int64(min(a.report.BotsPlanned, minAbortRequests)) {
		if c.Connects == 0 {
			return a.report.noConnectText()
		}
		if a.report.tooManyConnectsFailed() {
			return a.report.connectFailedText()
		}
	}
	if time.Since(a.start) < a.cfg.AbortGrace {
		return ""
	}
	if a.cfg.AbortP99 > 0 {
		h := newHist()
		for _, w := range a.recent {
			h.Merge(w)
		}
		if h.TotalCount() > 0 {
			p99 := time.Duration(h.ValueAtPercentile(99)) * time.Microsecond
			if p99 > a.cfg.AbortP99 {
				return fmt.Sprintf("publish→deliver p99 %v over the last %ds exceeds --abort-p99 %v", p99, len(a.recent), a.cfg.AbortP99)
			}
		}
	}
	if a.cfg.AbortErrors > 0 {
		var c Counters
		for _, w := range a.recentReq {
			c.add(w)
		}
		if c.Requests >= minAbortRequests {
			if rate := float64(c.Failed) / float64(c.Requests); rate > a.cfg.AbortErrors {
				return fmt.Sprintf("error rate %.2f%% (%d of %d requests) over the last %ds exceeds --abort-errors %g%%",
					100*rate, c.Failed, c.Requests, len(a.recentReq), 100*a.cfg.AbortErrors)
			}
		}
	}
	return ""
}

func (a *aggregator) finish() *Report {
	r := a.report
	r.ElapsedSecs = time.Since(a.start).Seconds()
	if r.ElapsedSecs > 0 {
		r.PublishesPerSec = float64(r.Counters.Publishes) / r.ElapsedSecs
		r.DeliveriesPerSec = float64(r.Counters.Deliveries) / r.ElapsedSecs
	}
	for name, h := range a.total {
		r.Latency[name] = summarize(h)
	}
	if r.Verify.Missing > 0 {
		r.Violations["missing"] = r.Verify.Missing
	}
	if r.Verify.Duplicated > 0 {
		r.Violations["duplicated"] = r.Verify.Duplicated
	}
	return r
}
