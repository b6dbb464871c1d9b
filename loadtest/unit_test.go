package loadtest

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/imq-dev/imq/client"
	imqpb "github.com/imq-dev/imq/proto"
)

func TestLoadScenario(t *testing.T) {
	base := DefaultScenario()
	tests := []struct {
		name, json string
		wantErr    string
		check      func(ScenarioFile) bool
	}{
		{"overrides", `{"rooms": 2, "bots_per_room": 3, "duration": "5s", "chat_rate": 0.5}`, "",
			func(s ScenarioFile) bool {
				return s.Rooms == 2 && s.BotsPerRoom == 3 && s.Duration == Duration(5*time.Second) && s.ChatRate == 0.5 && s.Namespace == "/dark" && s.URL == ""
			}},
		{"duration in seconds", `{"duration": 1.5}`, "", func(s ScenarioFile) bool { return s.Duration == Duration(1500*time.Millisecond) }},
		{"url", `{"url": "ws://127.0.0.1:9/ws,ws://127.0.0.1:10/ws", "rooms": 3}`, "",
			func(s ScenarioFile) bool { return s.URL == "ws://127.0.0.1:9/ws,ws://127.0.0.1:10/ws" && s.Rooms == 3 }},
		{"bad url", `{"url": "http://127.0.0.1:9/ws"}`, "want ws://", nil},
		{"two values", `{"rooms": 2} {"rooms": 3}`, "more than one", nil},
		{"unknown field", `{"roms": 2}`, "unknown field", nil},
		{"bad duration", `{"duration": "soon"}`, "duration", nil},
		{"zero rooms", `{"rooms": 0}`, "rooms", nil},
		{"small message", `{"message_size": 4}`, "message size", nil},
		{"negative churn", `{"churn_rate": -1}`, "churn", nil},
		{"namespace", `{"namespace": "dark"}`, "namespace", nil},
		{"too many bots", `{"bots_per_room": 5000}`, "bots per room", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := LoadScenario(strings.NewReader(tt.json), base)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v: want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !tt.check(s) {
				t.Fatalf("got %+v, %v", s, err)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	for _, mod := range []func(*Config){
		func(c *Config) { c.Workers = 11 }, // more than rooms
		func(c *Config) { c.AbortErrors = 2 },
		func(c *Config) { c.TrackLimit = -1 },
		func(c *Config) { c.URL = "http://127.0.0.1/ws" },
		func(c *Config) { c.URL = "ws://example.com/ws" },
	} {
		c := DefaultConfig()
		mod(&c)
		if err := c.validate(); err == nil {
			t.Errorf("config %+v: want an error", c)
		}
	}
	c := DefaultConfig()
	if err := c.validate(); err != nil || c.Out == nil || c.Logger == nil || c.RunID == "" || c.SourceAddrs != 1 {
		t.Fatalf("default config: %v, %+v", err, c)
	}
}

func TestCheckTarget(t *testing.T) {
	tests := []struct {
		url         string
		allowRemote bool
		ok          bool
	}{
		{"ws://127.0.0.1:8080/ws", false, true},
		{"ws://127.9.3.4:8080/ws", false, true},
		{"ws://localhost:8080/ws", false, true},
		{"ws://[::1]:8080/ws", false, true},
		{"wss://LOCALHOST/ws", false, true},
		{"ws://10.0.0.1:8080/ws", false, false},
		{"ws://game.example.com/ws", false, false},
		{"ws://128.0.0.1/ws", false, false},
		{"ws://game.example.com/ws", true, true},
		{"http://127.0.0.1/ws", true, false},
		{"ws:///ws", true, false},
	}
	for _, tt := range tests {
		err := CheckTarget(tt.url, tt.allowRemote)
		if (err == nil) != tt.ok {
			t.Errorf("CheckTarget(%q, %v) = %v; want ok %v", tt.url, tt.allowRemote, err, tt.ok)
		}
		if !tt.ok && !tt.allowRemote && strings.HasPrefix(tt.url, "ws://") && tt.url != "ws:///ws" && !errors.Is(err, ErrRemoteTarget) {
			t.Errorf("CheckTarget(%q): %v; want ErrRemoteTarget", tt.url, err)
		}
	}
	if !loopbackV4("ws://127.0.0.1:1/ws") || loopbackV4("ws://[::1]:1/ws") || loopbackV4("ws://localhost:1/ws") {
		t.Error("loopbackV4: want true only for 127.x literals")
	}
}

func TestPoissonBounds(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, rate := range []float64{0.01, 1, 5, 1000} {
		p := poisson{rng, rate}
		var sum time.Duration
		const n = 20000
		hi := time.Duration(maxWaitFactor / rate * float64(time.Second))
		for range n {
			d := p.next()
			if d < time.Microsecond || d > hi {
				t.Fatalf("rate %g: wait %v outside [1µs, %v]", rate, d, hi)
			}
			sum += d
		}
		mean := sum.Seconds() / n
		if want := 1 / rate; mean < 0.95*want || mean > 1.05*want {
			t.Errorf("rate %g: mean wait %.4gs, want about %.4gs", rate, mean, want)
		}
	}
	if d := (poisson{rng, 0}).next(); d != never {
		t.Errorf("rate 0: wait %v, want never", d)
	}
	if later(time.Second, never) != never || later(time.Second, time.Second) != 2*time.Second {
		t.Error("later does not saturate")
	}
	s := DefaultScenario()
	if n := maxActions(s, 30*time.Second); n < int(30*(s.ChatRate+s.StateRate)) || n > 1000 {
		t.Errorf("maxActions %d out of bounds", n)
	}
}

func TestHistogramMerge(t *testing.T) {
	a, b := newHist(), newHist()
	for i := 1; i <= 1000; i++ {
		recordDur(a, time.Duration(i)*time.Microsecond)
		recordDur(b, time.Duration(i)*time.Millisecond)
	}
	recordDur(b, time.Hour) // clamped to the top
	recordDur(b, 0)         // clamped to the bottom
	merged := newHist()
	for _, h := range []*hdrhistogram.Histogram{a, b, newHist()} {
		s := exportHist(h)
		if h.TotalCount() == 0 && s != nil {
			t.Fatal("empty histogram exported")
		}
		mergeSnap(merged, s)
	}
	if merged.TotalCount() != 2002 {
		t.Fatalf("merged count %d, want 2002", merged.TotalCount())
	}
	if got := merged.ValueAtPercentile(50); !merged.ValuesAreEquivalent(got, 1000) {
		t.Errorf("p50 %dµs, want about 1000µs", got)
	}
	if merged.Max() < histHighest*99/100 {
		t.Errorf("max %d, want the clamp %d", merged.Max(), histHighest)
	}
	if s := exportHist(a); len(s.Counts) >= len(a.Export().Counts) {
		t.Errorf("export keeps %d counts; want trailing zeros cut", len(s.Counts))
	}
}

func TestVerifyRoom(t *testing.T) {
	pubs := [][]uint64{{2, 5, 9}, {3, 7, 12}}
	tests := []struct {
		name    string
		members [][]interval
		want    VerifyResult
	}{
		{"all delivered", [][]interval{{{Lo: 1, Hi: 13, Got: []uint64{2, 3, 5, 7, 9, 12}}}},
			VerifyResult{Expected: 6, Delivered: 6, Intervals: 1, InWindow: 6}},
		{"bounds are exclusive", [][]interval{{{Lo: 3, Hi: 9, Got: []uint64{5, 7}}}},
			VerifyResult{Expected: 2, Delivered: 2, Intervals: 1, InWindow: 2}},
		{"missing and duplicated", [][]interval{{{Lo: 1, Hi: 13, Got: []uint64{2, 3, 3, 7, 9}}}},
			VerifyResult{Expected: 6, Delivered: 3, Missing: 2, Duplicated: 1, Intervals: 1, InWindow: 5}},
		{"untracked and outside", [][]interval{{{Lo: 4, Hi: 8, Got: []uint64{2, 5, 6, 7}}}},
			VerifyResult{Expected: 2, Delivered: 2, Untracked: 1, Intervals: 1, InWindow: 3}},
		{"two members, churn", [][]interval{
			{{Lo: 1, Hi: 6, Got: []uint64{2, 3, 5}}, {Lo: 8, Hi: 13, Got: []uint64{9, 12}}},
			{{Lo: 6, Hi: 10, Got: []uint64{7}}}},
			VerifyResult{Expected: 7, Delivered: 6, Missing: 1, Intervals: 3, InWindow: 6}},
		// The closing update (13) did not come back: the receiver got up to
		// 5, so 2 and 3 are lost only if skipped; 7, 9 and 12 are in
		// flight, not missing.
		{"in flight at the end", [][]interval{{{Lo: 1, Hi: 6, Want: 13, Got: []uint64{3, 5}}}},
			VerifyResult{Expected: 3, Delivered: 2, Missing: 1, Intervals: 1, InFlight: 3, Unconfirmed: 1, InWindow: 2}},
		// Nothing arrived after the join's own update (4): every later
		// publish before the closing update is in flight.
		{"nothing arrived", [][]interval{{{Lo: 4, Hi: 4, Want: 10}}},
			VerifyResult{InFlight: 3, Unconfirmed: 1}},
		{"empty and unknown bounds", [][]interval{{{Lo: 5, Hi: 6}, {Lo: ^uint64(0), Hi: 3}}}, VerifyResult{}},
	}
	for _, tt := range tests {
		if got := verifyRoom(pubs, tt.members); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: got %+v, want %+v", tt.name, got, tt.want)
		}
	}
}

func TestDurationJSON(t *testing.T) {
	var d Duration
	if err := d.UnmarshalJSON([]byte(`"250ms"`)); err != nil || time.Duration(d) != 250*time.Millisecond {
		t.Fatalf("%v %v", d, err)
	}
	b, _ := d.MarshalJSON()
	if string(b) != `"250ms"` {
		t.Errorf("marshal %s", b)
	}
}

func TestNiceTicks(t *testing.T) {
	tests := []struct {
		ymax    float64
		integer bool
		want    []float64
	}{
		{9070, false, []float64{0, 2000, 4000, 6000, 8000, 10000}},
		{1.69, false, []float64{0, 0.5, 1, 1.5, 2}},
		{0.3, false, []float64{0, 0.1, 0.2, 0.3}},
		{100, false, []float64{0, 20, 40, 60, 80, 100}},
		{3, true, []float64{0, 1, 2, 3}},
		{0.4, true, []float64{0, 1}},
		{7, true, []float64{0, 2, 4, 6, 8}},
		{12, true, []float64{0, 5, 10, 15}},
		{0, true, []float64{0, 1}},
		{0, false, []float64{0, 1}},
	}
	for _, tt := range tests {
		if got := niceTicks(tt.ymax, tt.integer); !slices.Equal(got, tt.want) {
			t.Errorf("niceTicks(%g, %v) = %v; want %v", tt.ymax, tt.integer, got, tt.want)
		}
	}
	// Any scale: steps of 1, 2 or 5 × 10^n, 3 to 7 ticks, the top covering
	// ymax by less than a step; whole numbers for counts.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 10000 {
		ymax := math.Pow(10, rng.Float64()*11-3) // 0.001 (1 µs in ms) to 10^8
		integer := rng.IntN(2) == 0
		ticks := niceTicks(ymax, integer)
		step := ticks[1]
		mant := step / math.Pow(10, math.Floor(math.Log10(step)+1e-9))
		top := ticks[len(ticks)-1]
		if !slices.ContainsFunc([]float64{1, 2, 5}, func(m float64) bool { return math.Abs(m-mant) < 1e-6 }) ||
			len(ticks) < 2 || len(ticks) > 7 || top < ymax*(1-1e-9) || top-step >= ymax ||
			(ymax >= 10 && len(ticks) < 3) {
			t.Fatalf("niceTicks(%g, %v) = %v", ymax, integer, ticks)
		}
		seen := map[string]bool{}
		for _, v := range ticks {
			if integer && v != math.Trunc(v) {
				t.Fatalf("niceTicks(%g, integer) = %v: not whole numbers", ymax, ticks)
			}
			if l := tickLabel(v); len(l) > 6 || seen[l] {
				t.Fatalf("niceTicks(%g): tick %v labelled %q", ymax, v, l)
			} else {
				seen[l] = true
			}
		}
	}
}

func TestTimeTicks(t *testing.T) {
	tests := []struct {
		tmax   float64
		want   []float64
		labels string
	}{
		{3.2, []float64{0, 1, 2, 3}, "0s 1s 2s 3s"},
		{30.4, []float64{0, 5, 10, 15, 20, 25, 30}, "0s 5s 10s 15s 20s 25s 30s"},
		{95, []float64{0, 15, 30, 45, 60, 75, 90}, "0s 15s 30s 45s 1m 1m15s 1m30s"},
		{600, []float64{0, 120, 240, 360, 480, 600}, "0s 2m 4m 6m 8m 10m"},
		{5400, []float64{0, 900, 1800, 2700, 3600, 4500, 5400}, "0s 15m 30m 45m 1h 1h15m 1h30m"},
	}
	for _, tt := range tests {
		got := timeTicks(tt.tmax)
		var labels []string
		for _, v := range got {
			labels = append(labels, timeLabel(v))
		}
		if !slices.Equal(got, tt.want) || strings.Join(labels, " ") != tt.labels {
			t.Errorf("timeTicks(%g) = %v %q; want %v %q", tt.tmax, got, labels, tt.want, tt.labels)
		}
	}
	// Every few seconds: never only 0 and the end for a run of 10 s or
	// more, never more than maxTimeTicks intervals.
	for tmax := 1.0; tmax < 20000; tmax *= 1.07 {
		got := timeTicks(tmax)
		if len(got) > maxTimeTicks+1 || (tmax >= 10 && len(got) < 4) || got[len(got)-1] > tmax {
			t.Fatalf("timeTicks(%g) = %v", tmax, got)
		}
	}
}

// chartOf returns the chart holding the series named name, and the series.
func chartOf(t *testing.T, cs []chart, name string) (chart, series) {
	t.Helper()
	for _, c := range cs {
		for _, s := range c.series {
			if s.name == name {
				return c, s
			}
		}
	}
	t.Fatalf("no series %q", name)
	return chart{}, series{}
}

func TestChartData(t *testing.T) {
	// Three seconds: the first without deliveries; then p99 well under max,
	// then a second of one delivery where p99 equals max.
	r := &Report{Series: []Point{
		{T: 1, Connected: 10},
		{T: 2, Connected: 10, LatencySamples: 500, P50Ms: 1, P99Ms: 4, MaxMs: 400, DeliveriesPerSec: 9070, PublishesPerSec: 900, Failed: 3},
		{T: 3, Connected: 7, LatencySamples: 1, P50Ms: 2, P99Ms: 2, MaxMs: 2, DeliveriesPerSec: 10, PublishesPerSec: 1},
	}}
	cs := r.charts()
	for _, name := range []string{"p50", "p99", "max"} {
		_, s := chartOf(t, cs, name)
		if !math.IsNaN(s.ys[0]) {
			t.Errorf("%s: a second without deliveries is drawn as %v; want a gap", name, s.ys[0])
		}
	}
	// p99 is on a scale of its own, not flattened under max: its peak is
	// drawn at least half way up, and max is in another chart.
	c99, s99 := chartOf(t, cs, "p99")
	cmax, _ := chartOf(t, cs, "max")
	if yt := c99.yAxis(); s99.ys[1] < yt[len(yt)-1]/2 {
		t.Errorf("p99 peak %v on an axis up to %v", s99.ys[1], yt[len(yt)-1])
	}
	if c99.title == cmax.title {
		t.Error("p99 and max share a chart")
	}
	// Series of one chart are told apart by colour and dash.
	for _, c := range cs {
		for i, a := range c.series {
			for _, b := range c.series[i+1:] {
				if a.color == b.color || a.dash == b.dash {
					t.Errorf("%s: %s and %s look alike", c.title, a.name, b.name)
				}
			}
		}
	}
	for _, name := range []string{"connected", "failed"} {
		if c, _ := chartOf(t, cs, name); !c.integer {
			t.Errorf("%s: want integer ticks", name)
		}
	}
	// The SVG: a gap starts the latency lines at t=2s; the time axis is
	// labelled each second; no NaN leaks into coordinates.
	svg := string(c99.svg())
	if strings.Contains(svg, "NaN") || !strings.Contains(svg, ">1s<") || !strings.Contains(svg, ">2s<") || !strings.Contains(svg, ">3s<") {
		t.Errorf("svg: %s", svg)
	}
	if n := strings.Count(svg, "<polyline"); n != 2 {
		t.Errorf("svg has %d polylines; want p50 and p99 from t=2s on", n)
	}
}

func TestStatePairs(t *testing.T) {
	var s StateResult
	v1, v2 := []byte(`{"n":1}`), []byte(`{"n":2}`)
	for _, tt := range []struct {
		have, want       []byte
		reached, version uint64
		out              pairOutcome
	}{
		{v2, v2, 10, 10, pairConverged},
		{v2, v2, 3, 10, pairConverged}, // in the join's snapshot
		{v1, v2, 9, 10, pairBehind},    // the update is not here yet
		{nil, v2, 9, 10, pairBehind},
		{v1, v2, 10, 10, pairDiverged}, // the bot is past it: skipped
		{nil, v2, 12, 10, pairDiverged},
	} {
		if got := s.addPair(tt.have, tt.want, tt.reached, tt.version); got != tt.out {
			t.Errorf("have %s, want %s, reached %d, version %d: %v; want %v", tt.have, tt.want, tt.reached, tt.version, got, tt.out)
		}
	}
	if s != (StateResult{Checked: 6, Converged: 2, Behind: 2, Diverged: 2}) {
		t.Errorf("counts %+v", s)
	}
}

// TestSourceAddrsFor: the automatic --source-addrs keeps each address
// within 200 bots/s of ramp, 50 bots of a burst and 20,000 bots, so that
// a gateway's default --max-pending-per-ip 64 does not refuse the ramp.
func TestSourceAddrsFor(t *testing.T) {
	for _, tt := range []struct {
		bots int
		ramp float64
		want int
	}{
		{100, 200, 1},       // the default scenario
		{2000, 1000, 5},     // 200 bots/s each
		{2000, 0, 40},       // a burst: 50 bots each
		{100, 10_000, 2},    // a ramp faster than the bots: no more than a burst needs
		{40, 0, 1},          // a small burst
		{100_000, 100, 6},   // ports: 20,000 bots each
		{1_000_000, 0, 254}, // capped at 127.0.0.254
		{10_000, 201, 2},
	} {
		got := sourceAddrsFor(tt.bots, tt.ramp)
		if got != tt.want {
			t.Errorf("sourceAddrsFor(%d bots, %g/s) = %d, want %d", tt.bots, tt.ramp, got, tt.want)
		}
		if tt.want < maxAddrs && (float64(tt.bots)/float64(got) > addrBots ||
			(tt.ramp == 0 && tt.bots > got*addrBurst) || (tt.ramp > 0 && tt.ramp/float64(got) > addrRampRate && tt.bots > got*addrBurst)) {
			t.Errorf("sourceAddrsFor(%d bots, %g/s) = %d: an address carries too much", tt.bots, tt.ramp, got)
		}
	}
	c := DefaultConfig()
	c.Scenario.Rooms, c.Scenario.BotsPerRoom, c.Scenario.RampRate = 20, 100, 1000
	if err := c.validate(); err != nil || c.SourceAddrs != 5 {
		t.Errorf("2,000 bots at 1000/s: source addrs %d (%v), want 5", c.SourceAddrs, err)
	}
}

// TestRequestShareFailsRun: a run whose requests failed beyond
// --abort-errors over the whole run fails, and with --abort-errors off
// (0) one in which most failed does too; the retryable failures of a
// failover, a small share, do not. Connect failures are judged apart.
func TestRequestShareFailsRun(t *testing.T) {
	for _, tt := range []struct {
		abortErrors             float64
		requests, failed, conns int64
		fails                   bool
	}{
		{0, 100, 100, 0, true},   // every request failed: not "completed"
		{0, 100, 51, 0, true},    // most
		{0, 100, 10, 0, false},   // a failover's UNAVAILABLEs
		{0.05, 100, 10, 0, true}, // beyond --abort-errors
		{0.2, 100, 10, 0, false},
		{0.5, 110, 60, 10, false}, // 50 of 100 requests; the 10 connect failures (9%) are within 50% too
	} {
		r := &Report{AbortErrors: tt.abortErrors, Errors: map[string]int64{"UNAVAILABLE": tt.failed - tt.conns},
			Counters: Counters{Requests: tt.requests, Failed: tt.failed, Connects: 100, ConnectFailed: tt.conns}}
		err := r.Err()
		if got := errors.Is(err, ErrRequests); got != tt.fails {
			t.Errorf("--abort-errors %g, %d of %d requests failed: Err() = %v; want failure %v", tt.abortErrors, tt.failed, tt.requests, err, tt.fails)
		}
		var b strings.Builder
		if err := r.WriteSummary(&b); err != nil {
			t.Fatal(err)
		}
		if tt.fails == strings.Contains(b.String(), "completed") {
			t.Errorf("--abort-errors %g, %d of %d requests failed: summary\n%s", tt.abortErrors, tt.failed, tt.requests, b.String())
		}
	}
}

// TestIsRefusal: only a server's refusal proves a state update was not
// applied; TIMEOUT (the gateway stopped waiting for the node),
// UNAVAILABLE (also a link lost with the request on it), INTERNAL and the
// client's own errors leave it unknown, so converge skips that bot's pairs
// rather than count a divergence.
func TestIsRefusal(t *testing.T) {
	for _, tt := range []struct {
		err     error
		refusal bool
	}{
		{&client.Error{Code: imqpb.Code_LIMIT_EXCEEDED}, true},
		{&client.Error{Code: imqpb.Code_FORBIDDEN}, true},
		{fmt.Errorf("set: %w", &client.Error{Code: imqpb.Code_NOT_JOINED}), true},
		{&client.Error{Code: imqpb.Code_TIMEOUT, Message: "queue node qn-1 did not answer in time; the outcome is unknown"}, false},
		{&client.Error{Code: imqpb.Code_UNAVAILABLE, Message: "link to queue node qn-1 lost; the outcome is unknown"}, false},
		{&client.Error{Code: imqpb.Code_INTERNAL}, false},
		{client.ErrTimeout, false},
		{client.ErrConnectionLost, false},
	} {
		if got := isRefusal(tt.err); got != tt.refusal {
			t.Errorf("isRefusal(%v) = %v, want %v", tt.err, got, tt.refusal)
		}
	}
}

// TestVerifyAddLostRooms: merging the engines' results (workers) keeps
// every lost room's name beside the count, so a test can tell which rooms
// a paused or moved node took with it.
func TestVerifyAddLostRooms(t *testing.T) {
	var v VerifyResult
	v.add(VerifyResult{RoomsLost: 1, LostRooms: []string{"/a/room/3"}})
	v.add(VerifyResult{Expected: 2})
	v.add(VerifyResult{RoomsLost: 1, LostRooms: []string{"/a/room/7"}})
	if want := []string{"/a/room/3", "/a/room/7"}; v.RoomsLost != 2 || !slices.Equal(v.LostRooms, want) {
		t.Fatalf("got %d lost rooms %v, want 2 %v", v.RoomsLost, v.LostRooms, want)
	}
}
