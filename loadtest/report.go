package loadtest

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Report is everything a run measured. Its JSON form is what --json writes.
type Report struct {
	URL         string    `json:"url"`
	Scenario    Scenario  `json:"scenario"`
	Workers     int       `json:"workers"`
	RunID       string    `json:"run_id"`
	Started     time.Time `json:"started"`
	ElapsedSecs float64   `json:"elapsed_seconds"`
	// BotsPlanned is the scenario's bot count, BotsStarted those the ramp
	// started, PeakConnected the most connected at once.
	BotsPlanned   int   `json:"bots_planned"`
	BotsStarted   int   `json:"bots_started"`
	PeakConnected int64 `json:"peak_connected"`
	// AbortReason says why the run stopped early; empty if it did not.
	AbortReason string `json:"abort_reason,omitempty"`
	// AbortErrors is Config.AbortErrors: the fraction of bots that may
	// fail to connect before Err fails the run.
	AbortErrors float64 `json:"abort_errors,omitempty"`
	// ConnectError is the first error a bot could not connect with.
	ConnectError string `json:"connect_error,omitempty"`
	// RampStopped says which limit stopped the ramp, if one did.
	RampStopped string `json:"ramp_stopped,omitempty"`
	FileLimit   uint64 `json:"file_limit"`
	// TrackLimit is the cap on offsets each bot recorded for Verify.
	TrackLimit       int      `json:"track_limit"`
	Counters         Counters `json:"counters"`
	PublishesPerSec  float64  `json:"publishes_per_second"`
	DeliveriesPerSec float64  `json:"deliveries_per_second"`
	// Errors counts failed requests by code; Disconnects counts connection
	// losses and subscriptions ended by the server, by reason.
	Errors      map[string]int64 `json:"errors"`
	Disconnects map[string]int64 `json:"disconnects"`
	// Violations counts protocol violations by kind: out_of_order,
	// duplicate, gap and state_diverged as they happened, missing and
	// duplicated from Verify. What was still in flight at the end
	// (Verify.InFlight, State.Behind) is not a violation.
	Violations map[string]int64 `json:"violations"`
	Verify     VerifyResult     `json:"verify"`
	State      StateResult      `json:"state"`
	// Latency summarizes the histograms: "deliver" (publish→deliver, on
	// the sender's clock), "join" (request→joined) and "connect"
	// (dial→connected).
	Latency map[string]LatencySummary `json:"latency"`
	Series  []Point                   `json:"series"`
}

// LatencySummary is one histogram's count, extremes and percentile table,
// in milliseconds.
type LatencySummary struct {
	Count       int64        `json:"count"`
	MinMs       float64      `json:"min_ms"`
	MeanMs      float64      `json:"mean_ms"`
	MaxMs       float64      `json:"max_ms"`
	Percentiles []Percentile `json:"percentiles"`
}

// Percentile is one row of a percentile table.
type Percentile struct {
	P  float64 `json:"p"`
	Ms float64 `json:"ms"`
}

// Point is one second of the time series.
type Point struct {
	T                float64 `json:"t"` // seconds since the start
	Connected        int64   `json:"connected"`
	PublishesPerSec  float64 `json:"publishes_per_second"`
	DeliveriesPerSec float64 `json:"deliveries_per_second"`
	// LatencySamples counts the deliveries P50Ms, P99Ms and MaxMs
	// summarize; with none, they are 0 and mean nothing (charts leave a
	// gap).
	LatencySamples int64   `json:"latency_samples"`
	P50Ms          float64 `json:"p50_ms"`
	P99Ms          float64 `json:"p99_ms"`
	MaxMs          float64 `json:"max_ms"`
	Requests       int64   `json:"requests"`
	Failed         int64   `json:"failed"`
}

var tablePercentiles = []float64{50, 75, 90, 95, 99, 99.9, 99.99, 100}

func usToMs(v int64) float64 { return float64(v) / 1000 }

func summarize(h *hdrhistogram.Histogram) LatencySummary {
	s := LatencySummary{Count: h.TotalCount()}
	if s.Count == 0 {
		return s
	}
	s.MinMs, s.MeanMs, s.MaxMs = usToMs(h.Min()), h.Mean()/1000, usToMs(h.Max())
	for _, p := range tablePercentiles {
		s.Percentiles = append(s.Percentiles, Percentile{P: p, Ms: usToMs(h.ValueAtPercentile(p))})
	}
	return s
}

// TotalViolations sums Violations.
func (r *Report) TotalViolations() int64 {
	var n int64
	for _, v := range r.Violations {
		n += v
	}
	return n
}

// noConnectText says that no bot could connect, and why the first failed.
func (r *Report) noConnectText() string {
	return fmt.Sprintf("no bot could connect (%d tried); the first: %s%s", r.Counters.ConnectFailed, r.ConnectError, r.refusedHint())
}

// refusedHint says, when the gateway refused bots with 429, which knobs
// let more connect at once; otherwise it is empty.
func (r *Report) refusedHint() string {
	n := r.Counters.ConnectRefused
	if n == 0 {
		return ""
	}
	return fmt.Sprintf(" (%d refused with 429: a gateway admits --max-pending-per-ip, default 64, unauthenticated connections per source address; "+
		"spread the bots over more --source-addrs (loopback targets), lower --ramp-rate, or raise the gateway's --max-pending-per-ip)", n)
}

// requestLimit is the share of requests that may fail over a whole run
// when --abort-errors is 0 (off): a run in which most requests failed
// measured no service, whatever the thresholds.
const requestLimit = 0.5

// tooManyRequestsFailed says whether more of the run's requests (connects
// aside: tooManyConnectsFailed judges those) failed than --abort-errors
// allows, or, with --abort-errors 0, more than half; and how many of how
// many did.
func (r *Report) tooManyRequestsFailed() (failed, requests int64, limit float64, over bool) {
	c := r.Counters
	failed, requests = c.Failed-c.ConnectFailed, c.Requests-c.ConnectFailed
	limit = r.AbortErrors
	if limit == 0 {
		limit = requestLimit
	}
	return failed, requests, limit, failed > 0 && float64(failed) > limit*float64(requests)
}

// Err says why the run failed, or returns nil if it passed: it aborted
// (a threshold, or too many bots could not connect), more bots failed to
// connect than AbortErrors allows (with AbortErrors 0, any; a bot still
// connecting when the run ended failed), it saw a protocol violation, or
// more of its requests failed over the whole run than AbortErrors allows
// (with AbortErrors 0, half: retryable failures during a failover are
// expected and reported, a run in which most requests failed is not a
// measurement). Messages in flight at the end are reported, not failures. `imq loadtest` exits non-zero exactly when Err is not nil.
func (r *Report) Err() error {
	if why, kind := r.failure(); kind != nil {
		return fmt.Errorf("%w: %s", kind, why)
	}
	return nil
}

// failure returns why the run failed and the sentinel error for it, or ""
// and nil if it passed. Err and the summary's outcome line share it.
func (r *Report) failure() (string, error) {
	c := r.Counters
	switch {
	case r.AbortReason != "":
		return r.AbortReason, ErrAborted
	case c.ConnectFailed > 0 && c.Connects == 0:
		return r.noConnectText(), ErrConnect
	case r.tooManyConnectsFailed():
		return r.connectFailedText(), ErrConnect
	case r.TotalViolations() > 0:
		return fmt.Sprintf("%d%s", r.TotalViolations(), mapText(r.Violations)), ErrViolations
	}
	if failed, requests, limit, over := r.tooManyRequestsFailed(); over {
		return fmt.Sprintf("%d of %d requests failed over the run (%.2f%%, more than %g%%%s)%s",
			failed, requests, 100*float64(failed)/float64(requests), 100*limit, limitSource(r.AbortErrors), mapText(r.Errors)), ErrRequests
	}
	return "", nil
}

// limitSource names where the request limit came from.
func limitSource(abortErrors float64) string {
	if abortErrors == 0 {
		return ": --abort-errors is off, and most requests failing fails a run"
	}
	return ": --abort-errors"
}

// tooManyConnectsFailed says whether more bots failed to connect than
// AbortErrors allows (with AbortErrors 0, any).
func (r *Report) tooManyConnectsFailed() bool {
	c := r.Counters
	return c.ConnectFailed > 0 && float64(c.ConnectFailed) > r.AbortErrors*float64(c.Connects+c.ConnectFailed)
}

// connectFailedText says how many bots could not connect, against
// --abort-errors, and why the first failed.
func (r *Report) connectFailedText() string {
	c := r.Counters
	tried := c.Connects + c.ConnectFailed
	return fmt.Sprintf("%d of %d bots could not connect (%.2f%%, more than --abort-errors %g%%); the first: %s%s",
		c.ConnectFailed, tried, 100*float64(c.ConnectFailed)/float64(tried), 100*r.AbortErrors, r.ConnectError, r.refusedHint())
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteSummary writes the human summary table.
func (r *Report) WriteSummary(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	s := r.Scenario
	fmt.Fprintf(tw, "imq loadtest\t%s  run %s\n", r.URL, r.RunID)
	fmt.Fprintf(tw, "scenario\t%d rooms × %d bots, chat %g/s, state %g/s, churn %g/min, %d B, %v, %d worker(s)\n",
		s.Rooms, s.BotsPerRoom, s.ChatRate, s.StateRate, s.ChurnRate, s.MessageSize, time.Duration(s.Duration), r.Workers)
	outcome := "completed"
	if why, kind := r.failure(); r.AbortReason != "" {
		outcome = "ABORTED: " + r.AbortReason
	} else if kind != nil {
		outcome = "FAILED: " + why
	}
	fmt.Fprintf(tw, "outcome\t%s after %.1fs\n", outcome, r.ElapsedSecs)
	if r.RampStopped != "" {
		fmt.Fprintf(tw, "ramp stopped\t%s\n", r.RampStopped)
	}
	c := r.Counters
	fmt.Fprintf(tw, "bots\t%d planned, %d started, %d connected, %d failed to connect, peak %d connected\n",
		r.BotsPlanned, r.BotsStarted, c.Connects, c.ConnectFailed, r.PeakConnected)
	if r.ConnectError != "" {
		fmt.Fprintf(tw, "connect error\t(the first) %s\n", r.ConnectError)
	}
	fmt.Fprintf(tw, "publishes\t%d (%.1f/s)\n", c.Publishes, r.PublishesPerSec)
	v := r.Verify
	fmt.Fprintf(tw, "deliveries\t%d (%.1f/s): %d inside the exactly-once intervals, %d outside them (before a join's own update, after a bot's last one, past the tracking cap, or in a lost room)\n",
		c.Deliveries, r.DeliveriesPerSec, v.InWindow, c.Deliveries-v.InWindow)
	fmt.Fprintf(tw, "state\t%d sets, %d changes received\n", c.StateSets, c.StateUpdates)
	fmt.Fprintf(tw, "joins / leaves\t%d / %d\n", c.Joins, c.Leaves)
	fmt.Fprintf(tw, "requests\t%d, %d failed%s\n", c.Requests, c.Failed, mapText(r.Errors))
	disc := strings.TrimPrefix(mapText(r.Disconnects), ": ")
	if disc == "" {
		disc = "none"
	}
	fmt.Fprintf(tw, "disconnects\t%s\n", disc)
	fmt.Fprintf(tw, "exactly once\t%d expected: %d delivered once, %d lost (a later offset arrived), %d duplicated; %d untracked; %d intervals (first %d offsets per bot)\n",
		v.Expected, v.Delivered, v.Missing, v.Duplicated, v.Untracked, v.Intervals, r.TrackLimit)
	fmt.Fprintf(tw, "in flight\t%d messages published while a bot was joined, not received by its leave or the drain's end, nor anything after them: late or lost, not violations (%d memberships)\n",
		v.InFlight, v.Unconfirmed)
	if v.RoomsLost > 0 {
		fmt.Fprintf(tw, "rooms lost	%d (their queue was lost and recreated, as the server told the bots; not checked for exactly once)\n", v.RoomsLost)
	}
	fmt.Fprintf(tw, "state converged\t%d of %d pairs; %d behind (update in flight at the end of the drain, not a violation), %d diverged\n",
		r.State.Converged, r.State.Checked, r.State.Behind, r.State.Diverged)
	if r.State.Unknown > 0 {
		fmt.Fprintf(tw, "state unknown\t%d pairs not checked: the other bot's update had an unknown outcome (TIMEOUT, UNAVAILABLE, no answer), so its last value is not known\n", r.State.Unknown)
	}
	fmt.Fprintf(tw, "violations\t%d%s\n", r.TotalViolations(), mapText(r.Violations))
	fmt.Fprintln(tw)
	fmt.Fprint(tw, "latency (ms)\tcount\tmin\tmean")
	for _, p := range tablePercentiles[:len(tablePercentiles)-1] {
		fmt.Fprintf(tw, "\tp%g", p)
	}
	fmt.Fprint(tw, "\tmax\n")
	for _, name := range []string{"deliver", "join", "connect"} {
		l := r.Latency[name]
		fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f", name, l.Count, l.MinMs, l.MeanMs)
		for i := range len(tablePercentiles) - 1 {
			ms := 0.0
			if i < len(l.Percentiles) {
				ms = l.Percentiles[i].Ms
			}
			fmt.Fprintf(tw, "\t%.2f", ms)
		}
		fmt.Fprintf(tw, "\t%.2f\n", l.MaxMs)
	}
	return tw.Flush()
}

// mapText renders counts by key as ": A 1, B 2", or "" for none.
func mapText(m map[string]int64) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if m[k] != 0 {
			parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return ": " + strings.Join(parts, ", ")
}
