package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
)

func startDev(t testing.TB) *launch.Dev {
	t.Helper()
	return startDevWith(t, nil)
}

// startDevWith starts a development server configured by mod (which may be
// nil), with the tests' JWT secret.
func startDevWith(t testing.TB, mod func(*launch.DevConfig)) *launch.Dev {
	t.Helper()
	return launchtest.StartDev(t, func(c *launch.DevConfig) {
		if mod != nil {
			mod(c)
		}
		c.Gateway.JWTSecret = []byte("loadtest-secret-0123456789")
	})
}

func smallConfig(url string) Config {
	cfg := DefaultConfig()
	cfg.URL = url
	cfg.Scenario = Scenario{
		Rooms: 3, BotsPerRoom: 4, ChatRate: 5, StateRate: 2, ChurnRate: 10,
		MessageSize: 32, RampRate: 0, Duration: Duration(3 * time.Second), Namespace: "/lt",
	}
	return cfg
}

// observer joins every room before the load and counts each chat offset it
// receives: an account of what was published that does not rely on the
// bots' own bookkeeping.
type observer struct {
	mu   sync.Mutex
	seen map[string]map[uint64]int // room → offset → times received
	wg   sync.WaitGroup
}

func observe(t *testing.T, url string, s Scenario) *observer {
	t.Helper()
	c, err := client.Dial(context.Background(), url, client.WithUser("observer"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	o := &observer{seen: map[string]map[uint64]int{}}
	for i := range s.Rooms {
		q := s.Room(i)
		sub, err := c.Join(context.Background(), q, client.Messages(chatMount))
		if err != nil {
			t.Fatal(err)
		}
		o.seen[q] = map[uint64]int{}
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			for u := range sub.Updates() {
				if u.Kind == client.KindEvent {
					o.mu.Lock()
					o.seen[q][u.Offset]++
					o.mu.Unlock()
				}
			}
		}()
	}
	return o
}

func (o *observer) counts() (events, dups int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, m := range o.seen {
		for _, n := range m {
			events++
			if n > 1 {
				dups++
			}
		}
	}
	return events, dups
}

func TestRunInvariants(t *testing.T) {
	d := startDev(t)
	cfg := smallConfig(d.URL())
	obs := observe(t, d.URL(), cfg.Scenario)
	var out bytes.Buffer
	cfg.Out = &out
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("summary:\n%s", summaryText(t, r))
	if r.AbortReason != "" {
		t.Fatalf("aborted: %s", r.AbortReason)
	}
	if n := r.TotalViolations(); n != 0 {
		t.Fatalf("%d violations: %v", n, r.Violations)
	}
	c := r.Counters
	if r.BotsStarted != 12 || c.Connects != 12 {
		t.Errorf("bots started %d, connected %d; want 12", r.BotsStarted, c.Connects)
	}
	if c.Failed != 0 {
		t.Errorf("%d failed requests: %v", c.Failed, r.Errors)
	}
	if c.Publishes == 0 || c.Leaves == 0 {
		t.Errorf("publishes %d, leaves %d: want both > 0", c.Publishes, c.Leaves)
	}
	v := r.Verify
	if v.Expected == 0 || v.Delivered != v.Expected || v.Missing != 0 || v.Duplicated != 0 {
		t.Errorf("verify %+v: want every expected message delivered exactly once", v)
	}
	if v.InFlight != 0 || r.State.Behind != 0 {
		t.Errorf("verify %+v, state %+v: want nothing in flight at the end of an unloaded run", v, r.State)
	}
	// Every delivery inside a checked interval is accounted for, and the
	// summary gives the split.
	if v.InWindow < v.Delivered || v.InWindow > c.Deliveries {
		t.Errorf("in window %d: want between delivered once %d and deliveries %d", v.InWindow, v.Delivered, c.Deliveries)
	}
	if want := fmt.Sprintf("%d inside the exactly-once intervals, %d outside", v.InWindow, c.Deliveries-v.InWindow); !strings.Contains(summaryText(t, r), want) {
		t.Errorf("summary lacks %q", want)
	}
	// Each member can receive a message at most once, so deliveries are
	// bounded by publishes × room size, and the checked ones by all.
	if c.Deliveries < v.Delivered || c.Deliveries > c.Publishes*int64(cfg.Scenario.BotsPerRoom) {
		t.Errorf("deliveries %d: want between %d and %d", c.Deliveries, v.Delivered, c.Publishes*int64(cfg.Scenario.BotsPerRoom))
	}
	// The observer, joined throughout, saw every publish exactly once.
	testutil.WaitFor(t, 5*time.Second, "the observer to see every publish", func() bool { n, _ := obs.counts(); return n >= c.Publishes })
	if n, dups := obs.counts(); n != c.Publishes || dups != 0 {
		t.Errorf("observer saw %d distinct events (%d duplicated); bots published %d", n, dups, c.Publishes)
	}
	if want := int64(3 * 4 * 3); r.State.Checked != want || r.State.Converged != want {
		t.Errorf("state %+v: want %d pairs checked and converged", r.State, want)
	}
	for _, name := range []string{"deliver", "join", "connect"} {
		if r.Latency[name].Count == 0 {
			t.Errorf("latency %s: no samples", name)
		}
	}
	if len(r.Series) < 2 {
		t.Errorf("series has %d points; want at least 2", len(r.Series))
	}
	// The first point holds the engine's first second (every bot connects
	// at once), not an empty window drawn as 0 before it.
	if p := r.Series[0]; p.Connected != 12 || p.T < 0.5 || p.T > 1.5 {
		t.Errorf("first point %+v: want t≈1s and the 12 bots connected", p)
	}
	if !strings.Contains(out.String(), "deliv/s") {
		t.Errorf("no progress lines in output %q", out.String())
	}

	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"scenario", "counters", "errors", "disconnects", "violations", "verify", "state", "latency", "series", "elapsed_seconds"} {
		if _, ok := back[k]; !ok {
			t.Errorf("JSON report lacks %q", k)
		}
	}
	var typed Report
	if err := json.Unmarshal(js.Bytes(), &typed); err != nil {
		t.Fatal(err)
	}
	if typed.Counters != r.Counters || len(typed.Latency["deliver"].Percentiles) == 0 {
		t.Errorf("JSON round trip lost figures")
	}
	path := filepath.Join(t.TempDir(), "report.html")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WriteHTML(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	page, _ := os.ReadFile(path)
	if !bytes.Contains(page, []byte("<svg")) || bytes.Contains(page, []byte("<script")) {
		t.Errorf("HTML report: want inline <svg and no script")
	}
}

func summaryText(t *testing.T, r *Report) string {
	var b strings.Builder
	if err := r.WriteSummary(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestRunAbortsOnP99(t *testing.T) {
	d := startDev(t)
	cfg := smallConfig(d.URL())
	cfg.Scenario.Duration = Duration(20 * time.Second)
	cfg.Scenario.ChurnRate = 0
	cfg.AbortP99 = time.Microsecond
	cfg.AbortGrace = 500 * time.Millisecond
	start := time.Now()
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.AbortReason == "" || !strings.Contains(r.AbortReason, "p99") {
		t.Fatalf("abort reason %q: want the p99 threshold", r.AbortReason)
	}
	if took := time.Since(start); took > 12*time.Second {
		t.Errorf("run took %v after aborting; want it to stop early", took)
	}
	if !strings.Contains(summaryText(t, r), "ABORTED") {
		t.Errorf("summary does not say it aborted")
	}
}

func TestRunWithTokens(t *testing.T) {
	d := startDev(t)
	cfg := smallConfig(d.URL())
	cfg.Scenario.Rooms, cfg.Scenario.ChurnRate = 1, 0
	cfg.Scenario.Duration = Duration(time.Second)
	cfg.Secret = []byte("loadtest-secret-0123456789")
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Counters.Connects != 4 || r.TotalViolations() != 0 {
		t.Fatalf("connects %d, violations %v", r.Counters.Connects, r.Violations)
	}
}

func TestRunWorkers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := launchtest.Binary(t)
	d := startDev(t)
	cfg := smallConfig(d.URL())
	cfg.Workers, cfg.Executable = 2, bin
	cfg.Scenario.Rooms, cfg.Scenario.BotsPerRoom = 2, 3
	cfg.Scenario.Duration = Duration(2 * time.Second)
	cfg.SourceAddrs = 2
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("summary:\n%s", summaryText(t, r))
	if r.BotsStarted != 6 || r.Counters.Connects != 6 {
		t.Errorf("bots started %d, connected %d; want 6", r.BotsStarted, r.Counters.Connects)
	}
	if r.TotalViolations() != 0 || r.Verify.Expected == 0 || r.Verify.Delivered != r.Verify.Expected {
		t.Errorf("violations %v, verify %+v", r.Violations, r.Verify)
	}
	if r.Latency["deliver"].Count == 0 || r.State.Converged != 6*2 {
		t.Errorf("deliver samples %d, state %+v", r.Latency["deliver"].Count, r.State)
	}
}

// A run where nothing listens stops soon after the first connect timeouts,
// rather than ramping its bots (10 s here) and running its whole duration,
// and fails saying why.
func TestRunNobodyListening(t *testing.T) {
	cfg := smallConfig(testutil.ClosedURL(t))
	cfg.Scenario.Rooms, cfg.Scenario.BotsPerRoom, cfg.Scenario.RampRate = 20, 10, 20
	cfg.Scenario.Duration = Duration(30 * time.Second)
	cfg.ConnectTimeout = 500 * time.Millisecond
	start := time.Now()
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 6*time.Second {
		t.Errorf("run took %v; want it to stop soon after the connect timeout", took)
	}
	err = r.Err()
	if !errors.Is(err, ErrAborted) || !strings.Contains(err.Error(), "no bot could connect") ||
		!strings.Contains(err.Error(), cfg.URL) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Err() = %v; want an abort saying no bot could connect to %s: connection refused", err, cfg.URL)
	}
	if r.Counters.Connects != 0 || r.Counters.ConnectFailed < minAbortRequests {
		t.Errorf("connects %d, failed %d; want 0 and at least %d", r.Counters.Connects, r.Counters.ConnectFailed, minAbortRequests)
	}
	if s := summaryText(t, r); !strings.Contains(s, "connection refused") {
		t.Errorf("summary does not give the connect error:\n%s", s)
	}
}

// A gateway that refuses every bot (here: tokens signed with the wrong
// secret) fails the run at once.
func TestRunGatewayRefusesEveryone(t *testing.T) {
	d := startDev(t)
	cfg := smallConfig(d.URL())
	cfg.Scenario.Duration = Duration(30 * time.Second)
	cfg.Secret = []byte("not-the-gateway-secret-0123456789")
	start := time.Now()
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("run took %v; want it to stop at once", took)
	}
	if err := r.Err(); err == nil || !strings.Contains(err.Error(), "no bot could connect") || !strings.Contains(err.Error(), "UNAUTHORIZED") {
		t.Fatalf("Err() = %v; want no bot could connect: UNAUTHORIZED", err)
	}
}

// When some bots connect and others cannot, the run stops as soon as
// enough bots have tried, saying so in its outcome, unless --abort-errors
// allows that share.
func TestRunSomeConnectsFail(t *testing.T) {
	d := startDev(t)
	cfg := smallConfig(d.URL() + "," + testutil.ClosedURL(t)) // bot i uses URL i mod 2
	cfg.Scenario.Rooms, cfg.Scenario.BotsPerRoom, cfg.Scenario.ChurnRate = 2, 2, 0
	cfg.Scenario.Duration = Duration(30 * time.Second)
	cfg.ConnectTimeout = 300 * time.Millisecond
	start := time.Now()
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 6*time.Second {
		t.Errorf("run took %v; want it to stop soon after the connects failed, well before its 30s", took)
	}
	if r.Counters.Connects != 2 || r.Counters.ConnectFailed != 2 {
		t.Fatalf("connects %d, failed %d; want 2 and 2", r.Counters.Connects, r.Counters.ConnectFailed)
	}
	if err := r.Err(); !errors.Is(err, ErrAborted) || !strings.Contains(err.Error(), "2 of 4 bots could not connect") {
		t.Errorf("Err() = %v; want an abort: 2 of 4 bots could not connect", err)
	}
	if s := summaryText(t, r); !strings.Contains(s, "ABORTED: 2 of 4 bots could not connect") {
		t.Errorf("summary's outcome does not say the run aborted and why:\n%s", s)
	}

	cfg.AbortErrors = 0.6
	cfg.Scenario.Duration = Duration(2 * time.Second)
	r, err = Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Err(); err != nil {
		t.Errorf("with --abort-errors 60%%: Err() = %v; want nil", err)
	}
	if r.AbortReason != "" || r.ElapsedSecs < 2 {
		t.Errorf("with --abort-errors 60%%: aborted %q after %.1fs; want the whole 2s", r.AbortReason, r.ElapsedSecs)
	}
	if s := summaryText(t, r); !strings.Contains(s, "completed after") {
		t.Errorf("summary's outcome does not say completed:\n%s", s)
	}
}

// A run that failed without aborting says so, and why, in the summary's
// outcome line rather than "completed".
func TestSummaryOutcomeSaysFailed(t *testing.T) {
	r := &Report{Counters: Counters{Connects: 9, ConnectFailed: 1}, ConnectError: "dial: connection refused", ElapsedSecs: 30}
	if s := summaryText(t, r); !strings.Contains(s, "FAILED: 1 of 10 bots could not connect") || strings.Contains(s, "completed") {
		t.Errorf("outcome of a failed run:\n%s", s)
	}
	r.AbortErrors = 0.1
	if s := summaryText(t, r); !strings.Contains(s, "completed after 30.0s") {
		t.Errorf("outcome of a passing run:\n%s", s)
	}
}

// Minted tokens always expire, and carry aud only when asked.
func TestMintToken(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	for _, aud := range []string{"", "game"} {
		tok, err := mintToken(secret, "u1", aud, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		var claims jwt.RegisteredClaims
		if _, err := jwt.ParseWithClaims(tok, &claims, func(*jwt.Token) (any, error) { return secret, nil },
			jwt.WithExpirationRequired(), jwt.WithValidMethods([]string{"HS256"})); err != nil {
			t.Fatalf("aud %q: %v", aud, err)
		}
		if claims.Subject != "u1" || claims.ExpiresAt == nil || time.Until(claims.ExpiresAt.Time) > time.Minute {
			t.Errorf("aud %q: claims %+v", aud, claims)
		}
		if aud == "" && len(claims.Audience) != 0 || aud != "" && (len(claims.Audience) != 1 || claims.Audience[0] != aud) {
			t.Errorf("aud %q: token carries aud %v", aud, claims.Audience)
		}
	}
}

// startGateway starts another gateway of d's cluster (standalone: wired to
// its queue node) and returns its URL.
func startGateway(t *testing.T, d *launch.Dev) string {
	t.Helper()
	gc := launch.LocalDevConfig().Gateway
	gc.JWTSecret = []byte("loadtest-secret-0123456789")
	gc.QueueNode = d.Node.LinkAddr()
	gw, err := gateway.New(gc)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- gw.Run(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		gw.Shutdown(ctx)
		<-done
	})
	return "ws://" + gw.Addr() + "/ws"
}

// Every scenario shipped in examples/loadtest parses, and runs (shorter
// and smaller, its rates and namespace kept) against an in-process cluster
// with as many gateways as its url names, without a violation.
func TestExampleScenarios(t *testing.T) {
	files, err := filepath.Glob("../examples/loadtest/*.json")
	if err != nil || len(files) < 3 {
		t.Fatalf("example scenarios: %v, %v; want at least 3", files, err)
	}
	d := startDev(t)
	urls := []string{d.URL()}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			fromFile, err := LoadScenario(f, DefaultScenario())
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			cfg := DefaultConfig()
			if fromFile.URL == "" {
				t.Fatalf("%s sets no url", file)
			}
			cfg.URL = fromFile.URL
			if err := cfg.validate(); err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			n := len(cfg.URLs())
			for len(urls) < n {
				urls = append(urls, startGateway(t, d))
			}
			cfg = smallConfig(strings.Join(urls[:n], ","))
			cfg.Scenario = fromFile.Scenario
			cfg.Scenario.Rooms = min(cfg.Scenario.Rooms, 2)
			cfg.Scenario.BotsPerRoom = min(cfg.Scenario.BotsPerRoom, 4)
			cfg.Scenario.Duration, cfg.Scenario.RampRate = Duration(1500*time.Millisecond), 0
			r, err := Run(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Err(); err != nil {
				t.Fatalf("%v\n%s", err, summaryText(t, r))
			}
			bots := int64(cfg.Scenario.Bots())
			if r.Counters.Connects != bots || r.TotalViolations() != 0 || r.Scenario.Namespace != fromFile.Namespace {
				t.Errorf("connects %d of %d, violations %v, namespace %q", r.Counters.Connects, bots, r.Violations, r.Scenario.Namespace)
			}
			if fromFile.ChatRate > 0 && (r.Counters.Publishes == 0 || r.Verify.Delivered != r.Verify.Expected) {
				t.Errorf("publishes %d, verify %+v", r.Counters.Publishes, r.Verify)
			}
		})
	}
}

// refusedPendingIP returns the connections the gateway of d refused for
// --max-pending-per-ip, from its /metrics.
func refusedPendingIP(t *testing.T, d *launch.Dev) int {
	t.Helper()
	resp, err := http.Get("http://" + d.Gateway.InternalAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	const name = `imq_gateway_connections_refused_total{reason="pending_ip"} `
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /metrics", name)
	return 0
}

// A burst of bots spread over several source addresses stays under a
// gateway's per-address cap on pending connections, which refuses the
// excess with 429 (as --max-pending-per-ip 64 did 2,000 bots at 1,000/s
// from one address, pushing some past their connect timeout). From one
// address the same burst is refused (logged only: the bots' retries
// usually get in on loopback).
func TestRunBurstOverSourceAddrs(t *testing.T) {
	for _, addrs := range []int{1, 20} {
		d := startDevWith(t, func(c *launch.DevConfig) { c.Gateway.MaxPendingPerIP = 8 })
		cfg := smallConfig(d.URL())
		cfg.Scenario.Rooms, cfg.Scenario.BotsPerRoom, cfg.Scenario.RampRate = 10, 10, 0
		cfg.Scenario.ChatRate, cfg.Scenario.StateRate, cfg.Scenario.ChurnRate = 1, 0, 0
		cfg.Scenario.Duration = Duration(2 * time.Second)
		cfg.SourceAddrs = addrs // 20: 5 bots an address, under the cap of 8
		r, err := Run(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		refused := refusedPendingIP(t, d)
		t.Logf("%d source addresses: %d refused for pending_ip; %d of 100 connected", addrs, refused, r.Counters.Connects)
		if addrs > 1 && (refused != 0 || r.Counters.Connects != 100 || r.Err() != nil) {
			t.Errorf("%d source addresses: %d refused for pending_ip, %d of 100 bots connected (%v); want none refused, all connected",
				addrs, refused, r.Counters.Connects, r.Err())
		}
	}
}

// Bots still trying to connect when a run ends (here: a gateway full at
// one connection, a run shorter than the connect timeout) never connected:
// they count as failed connects and fail the run, rather than "0 failed to
// connect" and "completed".
func TestRunEndsWithBotsStillConnecting(t *testing.T) {
	d := startDevWith(t, func(c *launch.DevConfig) { c.Gateway.MaxConnections = 1 })
	cfg := smallConfig(d.URL())
	cfg.Scenario.Rooms, cfg.Scenario.BotsPerRoom = 2, 3
	cfg.Scenario.ChatRate, cfg.Scenario.StateRate, cfg.Scenario.ChurnRate = 1, 0, 0
	cfg.Scenario.Duration = Duration(1500 * time.Millisecond)
	cfg.ConnectTimeout = 5 * time.Second
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := summaryText(t, r)
	if r.Counters.Connects != 1 || r.Counters.ConnectFailed != 5 {
		t.Errorf("%d connected, %d failed to connect; want 1 and 5\n%s", r.Counters.Connects, r.Counters.ConnectFailed, s)
	}
	if err := r.Err(); !errors.Is(err, ErrConnect) || !strings.Contains(err.Error(), "still not connected when the run ended") {
		t.Errorf("Err() = %v; want ErrConnect saying the bots were still connecting", err)
	}
	if strings.Contains(s, "completed") {
		t.Errorf("summary says completed:\n%s", s)
	}
}

// A gateway that refuses the bots with 429 (its per-address limits) gets a
// run whose failure says so, the gateway's reason included, and which
// knobs let more bots in.
func TestRunRefused429Hint(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"error":{"code":"LIMIT_EXCEEDED","message":"too many unauthenticated connections from your address; authenticate or close them","retryable":true}}`)
	}))
	t.Cleanup(srv.Close)
	cfg := smallConfig("ws" + strings.TrimPrefix(srv.URL, "http") + "/ws")
	cfg.ConnectTimeout = 300 * time.Millisecond
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = r.Err()
	for _, want := range []string{"no bot could connect", "LIMIT_EXCEEDED: too many unauthenticated connections", "refused with 429", "--source-addrs", "--max-pending-per-ip"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Err() = %v; want it to say %q", err, want)
		}
	}
	if r.Counters.ConnectRefused == 0 || r.Counters.ConnectRefused != r.Counters.ConnectFailed {
		t.Errorf("%d of %d failed connects counted as refused with 429", r.Counters.ConnectRefused, r.Counters.ConnectFailed)
	}
}
