package gateway_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
)

// authBackend is a game backend's token endpoint for the auth call-out.
type authBackend struct {
	srv      *httptest.Server
	calls    atomic.Int64
	inflight atomic.Int64
	maxSeen  atomic.Int64
	mu       sync.Mutex
	remotes  map[string]bool // Guarded by mu: client addresses seen (keep-alive reuses one).
}

func startAuthBackend(t *testing.T) *authBackend {
	t.Helper()
	b := &authBackend{remotes: map[string]bool{}}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.calls.Add(1)
		n := b.inflight.Add(1)
		defer b.inflight.Add(-1)
		for m := b.maxSeen.Load(); n > m && !b.maxSeen.CompareAndSwap(m, n); m = b.maxSeen.Load() {
		}
		b.mu.Lock()
		b.remotes[r.RemoteAddr] = true
		b.mu.Unlock()
		var req struct {
			Token string `json:"token"`
		}
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" || json.NewDecoder(r.Body).Decode(&req) != nil {
			http.Error(w, "bad call-out", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		switch {
		case strings.HasPrefix(req.Token, "good-"):
			io.WriteString(w, `{"user":"`+strings.TrimPrefix(req.Token, "good-")+`","extra":"ignored"}`)
		case req.Token == "pause":
			time.Sleep(100 * time.Millisecond)
			io.WriteString(w, `{"user":"paused"}`)
		case req.Token == "refuse":
			io.WriteString(w, `{"allow":false,"reason":"account suspended"}`)
		case req.Token == "forbidden":
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"reason":"banned until tomorrow"}`)
		case req.Token == "error":
			w.WriteHeader(http.StatusInternalServerError)
		case req.Token == "maintenance":
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"allow":false,"reason":"down for maintenance"}`)
		case req.Token == "rate-limited":
			w.WriteHeader(http.StatusTooManyRequests)
		case req.Token == "slow":
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		case req.Token == "bad-user":
			io.WriteString(w, `{"user":"a/b"}`)
		case req.Token == "huge":
			io.WriteString(w, `{"user":"alice","pad":"`+strings.Repeat("x", 70<<10)+`"}`)
		case req.Token == "not-json":
			io.WriteString(w, `<html>`)
		default:
			w.WriteHeader(http.StatusUnauthorized)
		}
	}))
	t.Cleanup(b.srv.Close)
	return b
}

// connectToken connects with token on a new connection and returns the
// reply; a refused one is followed by the goodbye AUTH_FAILED, which says
// reconnect exactly when the refusal is retryable (the backend failed).
func connectToken(t *testing.T, d *launch.Dev, token string) *imqpb.Reply {
	t.Helper()
	c, _, err := dialRaw(t, d, "", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token}}})
	if r.GetCode() != imqpb.Code_OK {
		g := c.expectGoodbye(imqpb.Reason_REASON_AUTH_FAILED)
		if g.GetReconnect() != r.GetRetryable() || g.GetMessage() != r.GetMessage() {
			t.Fatalf("goodbye %v after %v", g, r)
		}
	}
	return r
}

func TestAuthCallout(t *testing.T) {
	b := startAuthBackend(t)
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Gateway.AuthURL = b.srv.URL + "/imq/auth"
		c.Gateway.AuthCalloutTimeout = 300 * time.Millisecond
	})
	// The backend's refusals are UNAUTHORIZED; its failures (no usable
	// answer) a retryable UNAVAILABLE.
	unavailable := imqpb.Code_UNAVAILABLE
	for _, c := range []struct {
		token, user, msg string
		code             imqpb.Code
	}{
		{token: "good-alice", user: "alice"},
		{token: "refuse", msg: "account suspended"},
		{token: "forbidden", msg: "banned until tomorrow"},
		{token: "error", msg: "HTTP 500", code: unavailable},
		// A failing backend's reason is passed on, but refuses nothing.
		{token: "maintenance", msg: "down for maintenance", code: unavailable},
		{token: "rate-limited", msg: "HTTP 429", code: unavailable},
		{token: "unknown", msg: "HTTP 401"},
		{token: "slow", msg: "did not answer within 300ms", code: unavailable},
		{token: "bad-user", msg: "invalid user", code: unavailable},
		{token: "huge", msg: "larger than", code: unavailable},
		{token: "not-json", msg: "not a JSON object", code: unavailable},
		{token: "", msg: "no token"},
	} {
		t.Run(c.token, func(t *testing.T) {
			start := time.Now()
			r := connectToken(t, d, c.token)
			if c.user != "" {
				expectCode(t, r, imqpb.Code_OK)
				if r.GetConnected().GetUser() != c.user {
					t.Fatalf("connected as %q, want %q", r.GetConnected().GetUser(), c.user)
				}
				return
			}
			want := imqpb.Code_UNAUTHORIZED
			if c.code != imqpb.Code_OK {
				want = c.code
			}
			expectCode(t, r, want)
			if !strings.Contains(r.GetMessage(), c.msg) {
				t.Fatalf("message %q, want it to mention %q", r.GetMessage(), c.msg)
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("refused after %s", time.Since(start))
			}
		})
	}

	t.Run("JWT accepted locally", func(t *testing.T) {
		before := b.calls.Load()
		r := connectToken(t, d, token(t, testSecret, "jwt-user", time.Now().Add(time.Hour)))
		expectCode(t, r, imqpb.Code_OK)
		if r.GetConnected().GetUser() != "jwt-user" || b.calls.Load() != before {
			t.Fatalf("connected as %q after %d call-outs", r.GetConnected().GetUser(), b.calls.Load()-before)
		}
		// An expired JWT does not verify: the backend decides (no).
		r = connectToken(t, d, token(t, testSecret, "jwt-user", time.Now().Add(-time.Hour)))
		expectCode(t, r, imqpb.Code_UNAUTHORIZED)
		if b.calls.Load() != before+1 {
			t.Fatalf("%d call-outs for an expired JWT, want 1", b.calls.Load()-before)
		}
	})

	t.Run("keep-alive", func(t *testing.T) {
		b.mu.Lock()
		clear(b.remotes)
		b.mu.Unlock()
		for range 3 {
			expectCode(t, connectToken(t, d, "good-bob"), imqpb.Code_OK)
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		if len(b.remotes) != 1 {
			t.Fatalf("3 call-outs in a row came from %d connections", len(b.remotes))
		}
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + d.Gateway.InternalAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`imq_gateway_auth_callouts_total{outcome="accepted"}`, `imq_gateway_auth_callouts_total{outcome="refused"}`, `imq_gateway_auth_callouts_total{outcome="failed"}`, `imq_gateway_auth_callout_seconds_count`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("/metrics lacks %s", want)
			}
		}
	})
}

// TestAuthCalloutConcurrency: at most AuthCalloutConcurrency call-outs are
// in flight; the others wait for a slot (within the timeout).
func TestAuthCalloutConcurrency(t *testing.T) {
	b := startAuthBackend(t)
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Gateway.AuthURL = b.srv.URL
		c.Gateway.JWTSecret = nil // every token goes to the backend
		c.Gateway.AuthCalloutConcurrency = 2
		c.Gateway.AuthCalloutTimeout = 5 * time.Second
	})
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			c, _, err := dialRaw(t, d, "", false, nil)
			if err != nil {
				t.Error(err)
				return
			}
			c.send(&imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "pause"}}})
			m, err := c.read()
			if err != nil || m.GetReply().GetCode() != imqpb.Code_OK {
				t.Errorf("connect: %v %v", m, err)
			}
		})
	}
	wg.Wait()
	if got := b.maxSeen.Load(); got != 2 {
		t.Fatalf("%d call-outs in flight at most, want 2", got)
	}
}

// TestAuthWithoutCallout: without AuthURL nothing changes: a JWT verifies
// and anything else is refused at once.
func TestAuthWithoutCallout(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {})
	expectCode(t, connectToken(t, d, token(t, testSecret, "alice", time.Now().Add(time.Hour))), imqpb.Code_OK)
	expectCode(t, connectToken(t, d, "good-alice"), imqpb.Code_UNAUTHORIZED)
}

// TestSlowChecksSpendNoBudget: many players behind one address (a NAT)
// connect at once with valid tokens while the auth backend is slow. The
// failed-auth budget counts failures, not checks in flight: all of them get
// in, though there are more than the budget.
func TestSlowChecksSpendNoBudget(t *testing.T) {
	const n, budget = 10, 3
	var arrived atomic.Int64
	all := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Token string `json:"token"`
		}
		json.NewDecoder(r.Body).Decode(&req)
		if arrived.Add(1) == n {
			close(all)
		}
		select { // slow: answers once every check is in flight (or gives up)
		case <-all:
		case <-time.After(2 * time.Second):
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"user":"`+req.Token+`"}`)
	}))
	t.Cleanup(backend.Close)
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Gateway.AuthURL = backend.URL
		c.Gateway.AuthCalloutTimeout = 5 * time.Second
		c.Gateway.AuthFailuresPerIP, c.Gateway.MaxPendingPerIP = budget, n
	})
	cs := make([]*rawClient, n)
	for i := range cs {
		c, _, err := dialFrom(t, d, "127.0.0.9", "")
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c
	}
	ids := make([]uint64, n)
	for i, c := range cs { // all sent before any answer is read: the checks run at once
		ids[i] = c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: fmt.Sprintf("player%d", i)}}})
	}
	for i, c := range cs {
		if code := c.reply(ids[i]).GetCode(); code != imqpb.Code_OK {
			t.Fatalf("player %d of %d connecting at once from one address, budget %d: %v; want all OK", i+1, n, budget, code)
		}
	}
	if got := arrived.Load(); got != n {
		t.Fatalf("%d tokens checked, want %d", got, n)
	}
	// No check was refused for want of budget, and none spent any: the
	// address is not locked out afterwards.
	if got := d.Gateway.Refused("auth_failures"); got != 0 {
		t.Fatalf("refused_total{reason=auth_failures} = %v after %d valid connects; want 0", got, n)
	}
	c, _, err := dialFrom(t, d, "127.0.0.9", "")
	if err != nil {
		t.Fatal(err)
	}
	if code := c.reply(c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "late"}}})).GetCode(); code != imqpb.Code_OK {
		t.Fatalf("a connect after %d valid ones from the address: %v; want OK", n, code)
	}
}
