package queuenode

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

func TestParseCallout(t *testing.T) {
	good := []struct {
		spec string
		want Callout
	}{
		{"/room/=http://127.0.0.1:9000/imq/room", Callout{Prefix: "/room/", URL: "http://127.0.0.1:9000/imq/room"}},
		{"/=https://backend.example/hooks/ hooks=join", Callout{Prefix: "/", URL: "https://backend.example/hooks/", Hooks: HookJoin}},
		{"  /game/eu-1=http://h hooks=leave,publish,join  ", Callout{Prefix: "/game/eu-1", URL: "http://h", Hooks: HookJoin | HookPublish | HookLeave}},
		{"/g/=http://h hooks=set_state,leave,publish,join", Callout{Prefix: "/g/", URL: "http://h", Hooks: AllHooks}},
		{"/a=b/=http://h hooks=publish,publish", Callout{Prefix: "/a=b/", URL: "http://h", Hooks: HookPublish}},
		{"/r=HTTP://h", Callout{Prefix: "/r", URL: "HTTP://h"}},
	}
	for _, c := range good {
		got, err := ParseCallout(c.spec)
		if err != nil || got != c.want {
			t.Errorf("ParseCallout(%q) = %+v, %v; want %+v", c.spec, got, err, c.want)
		}
	}
	if s := (Callout{Prefix: "/r/", URL: "http://u:secret@h/x"}).String(); s != "/r/=http://u:xxxxx@h/x hooks=join,publish,set_state,leave" {
		t.Errorf("String() = %q", s)
	}
	bad := []string{
		"",
		"/room/",
		"http://h",
		"=http://h",
		"room/=http://h",
		"/room//=http://h",
		"/room/../=http://h/",
		"/ro om/=http://h",
		"/r!/=http://h",
		"/" + strings.Repeat("a", 255) + "=http://h",
		"/room/=ftp://h",
		"/room/=http://",
		"/room/=http://h?x=1",
		"/room/=http://h#f",
		"/room/=http://h hooks=",
		"/room/=http://h hooks=join,kick",
		"/room/=http://h hooks=join hooks=leave",
		"/room/=http://h timeout=1s",
		"/room/=http://h join",
	}
	for _, spec := range bad {
		if c, err := ParseCallout(spec); err == nil {
			t.Errorf("ParseCallout(%q) = %+v, want an error", spec, c)
		}
	}

	cfg := DefaultConfig()
	cfg.Callouts = []Callout{{Prefix: "/r/", URL: "http://a"}, {Prefix: "/r/", URL: "http://b"}}
	if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("duplicate prefixes: %v", err)
	}
	cfg.Callouts = []Callout{{Prefix: "/r/", URL: "http://a", Hooks: 16}}
	if err := cfg.validate(); err == nil {
		t.Error("unknown hook bits accepted")
	}
}

func TestCalloutRouteMatch(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Callouts = []Callout{
		{Prefix: "/", URL: "http://all"},
		{Prefix: "/room/", URL: "http://rooms"},
		{Prefix: "/room/vip", URL: "http://vip"},
		{Prefix: "/lobby/", URL: "http://lobby"},
	}
	co := newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler))
	for queue, want := range map[string]string{
		"/room/1": "http://rooms", "/room/vip-1": "http://vip", "/room/vip/2": "http://vip", "/lobby/x": "http://lobby",
		"/user/x": "http://all", "/room": "http://all",
	} {
		if got := co.match(queue); got == nil || got.URL != want {
			t.Errorf("match(%q) = %v, want %s", queue, got, want)
		}
	}
	cfg.Callouts = cfg.Callouts[1:]
	if rt := newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler)).match("/user/x"); rt != nil {
		t.Errorf("a queue under no prefix matched %v", rt)
	}
}

// backendCall is one call-out a fake backend received.
type backendCall struct {
	Hook string
	Body map[string]any
}

// fakeBackend is a backend's call-out endpoint, answering with answer.
type fakeBackend struct {
	srv    *httptest.Server
	answer func(r *http.Request, c backendCall) (status int, body string)

	mu    sync.Mutex
	calls []backendCall // Guarded by mu.

	cur, peak atomic.Int32
}

// newBackend starts a fake backend; answer (nil: allow everything) runs
// concurrently for concurrent calls.
func newBackend(t *testing.T, answer func(r *http.Request, c backendCall) (int, string)) *fakeBackend {
	t.Helper()
	if answer == nil {
		answer = func(*http.Request, backendCall) (int, string) { return 200, `{"allow":true}` }
	}
	b := &fakeBackend{answer: answer}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := b.cur.Add(1)
		defer b.cur.Add(-1)
		for p := b.peak.Load(); n > p && !b.peak.CompareAndSwap(p, n); p = b.peak.Load() {
		}
		c := backendCall{Hook: r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]}
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" || !strings.HasPrefix(r.URL.Path, "/imq/") {
			t.Errorf("call-out %s %s (%s)", r.Method, r.URL.Path, r.Header.Get("Content-Type"))
		}
		if err := json.NewDecoder(r.Body).Decode(&c.Body); err != nil {
			t.Errorf("call-out body: %v", err)
		}
		if c.Body["hook"] != c.Hook {
			t.Errorf("call-out to %s with hook %v", r.URL.Path, c.Body["hook"])
		}
		b.mu.Lock()
		b.calls = append(b.calls, c)
		b.mu.Unlock()
		status, body := b.answer(r, c)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		w.Write([]byte(body))
	}))
	t.Cleanup(b.srv.Close)
	return b
}

// callsTo returns the bodies of the calls to hook so far.
func (b *fakeBackend) callsTo(hook string) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, c := range b.calls {
		if c.Hook == hook {
			out = append(out, c.Body)
		}
	}
	return out
}

// startCalloutNode runs a node whose queues under /room/ call url/imq (and
// under /hooked/ the hooks named in hooked, if set), with cfg changed by
// edit.
func startCalloutNode(t *testing.T, url string, edit func(*Config)) *Server {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Callouts = []Callout{{Prefix: "/room/", URL: url + "/imq"}}
	if edit != nil {
		edit(&cfg)
	}
	return startNode(t, cfg)
}

func userPublish(user, queue, mount, payload string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: user, Session: "s-" + user, Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: mount, Payload: []byte(payload),
	}}}
}

func calloutCount(t *testing.T, s *Server, hook, outcome string) float64 {
	t.Helper()
	return counterValue(t, s.m.callouts.WithLabelValues(hook, outcome))
}

func TestCalloutJoinDenied(t *testing.T) {
	b := newBackend(t, func(_ *http.Request, c backendCall) (int, string) {
		if c.Body["user"] == "u-s2" {
			return 200, `{"allow": false}`
		}
		return 200, `{"allow": false, "reason": "room is full"}`
	})
	s := startCalloutNode(t, b.srv.URL, nil)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	req := joinReq("/room/1", "s1", "chat", "input")
	j := req.GetJoin()
	j.Mounts = append(j.Mounts, stateSpec("score"))
	if r := l.do(req); r.GetCode() != imqpb.Code_DENIED || r.GetMessage() != "room is full" {
		t.Fatalf("denied join: %v %q, want DENIED \"room is full\"", r.GetCode(), r.GetMessage())
	}
	if r := l.do(joinReq("/room/1", "s2", "chat")); r.GetCode() != imqpb.Code_DENIED || r.GetMessage() != deniedMessage {
		t.Fatalf("denied join without a reason: %v %q", r.GetCode(), r.GetMessage())
	}
	calls := b.callsTo("join")
	if len(calls) != 2 {
		t.Fatalf("%d join call-outs, want 2", len(calls))
	}
	body, _, _ := stamped(t, s, calls[0])
	want := map[string]any{"hook": "join", "user": "u-s1", "session": "s1", "queue": "/room/1", "mounts": []any{"chat", "input", "score"}}
	if got, _ := json.Marshal(body); string(got) != mustJSON(t, want) {
		t.Fatalf("join call-out body %s, want %s", got, mustJSON(t, want))
	}
	if s.hasQueue("/room/1") {
		t.Fatal("a denied join created the queue")
	}
	if got := calloutCount(t, s, "join", outcomeDenied); got != 2 {
		t.Fatalf("denied joins counted %v, want 2", got)
	}
	// Queues under no prefix make no call-outs.
	l.ok(joinReq("/lobby/1", "s1", "chat"))
	if n := len(b.callsTo("join")); n != 2 {
		t.Fatalf("%d join call-outs after a join outside the prefix, want 2", n)
	}
}

// stamped checks the seq, time_ms and node of a hook body (see Callout) and
// returns them and a copy of the body without them.
func stamped(t *testing.T, s *Server, body map[string]any) (rest map[string]any, seq uint64, timeMs int64) {
	t.Helper()
	// Decoded as float64, exact for these values (below 2^53).
	fseq, ok1 := body["seq"].(float64)
	ftime, ok2 := body["time_ms"].(float64)
	if !ok1 || !ok2 || fseq <= 0 || fseq != float64(uint64(fseq)) || body["node"] != s.NodeID() {
		t.Fatalf("hook body %v: want a positive integer seq, a time_ms and node %q", body, s.NodeID())
	}
	if now := time.Now().UnixMilli(); int64(ftime) > now || int64(ftime) < now-int64(waitFor/time.Millisecond) {
		t.Fatalf("hook body time_ms %v, now is %d", ftime, now)
	}
	rest = maps.Clone(body)
	delete(rest, "seq")
	delete(rest, "time_ms")
	delete(rest, "node")
	return rest, uint64(fseq), int64(ftime)
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestCalloutJoinSeedsState(t *testing.T) {
	b := newBackend(t, func(*http.Request, backendCall) (int, string) {
		return 200, `{"allow": true, "state": {"score": {"alice": 1, "bob": {"x": [1, 2]}}, "chat": {"k": 1}, "extra": {"e": "v"}}}`
	})
	s := startCalloutNode(t, b.srv.URL, nil)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(backendSetState("/room/1", "score", "alice", `"set before"`, false))
	req := joinReq("/room/1", "s1", "chat")
	j := req.GetJoin()
	j.Mounts = append(j.Mounts, stateSpec("score"))
	joined := l.ok(req).GetJoined()
	got := map[string]string{}
	for _, e := range joined.GetMounts()[1].GetState() {
		got[e.GetKey()] = string(e.GetValue())
	}
	if want := map[string]string{"alice": `"set before"`, "bob": `{"x":[1,2]}`}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("joiner's snapshot %v, want %v (seeded where unset)", got, want)
	}
	// The seed for "chat", which the join names as a message mount, was
	// skipped; "extra", which it does not name, was set.
	snap := l.ok(getStateReq("/room/1", "extra")).GetState()
	if len(snap.GetEntries()) != 1 || string(snap.GetEntries()[0].GetValue()) != `"v"` || joined.GetHead() != 3 {
		t.Fatalf("extra seed: %v, head %d", snap, joined.GetHead())
	}
	if h := l.ok(historyReq("/room/1", "chat", 0, 0)).GetHistory(); len(h.GetEvents()) != 0 {
		t.Fatalf("chat history %v", h)
	}
	// A second joiner's seeds change nothing: every key is set; s1 got no
	// state change.
	l.ok(joinReq("/room/1", "s2", "chat"))
	if m := delivered(t, l.sync()); len(m) != 0 {
		t.Fatalf("second join delivered %v", m)
	}
	if got := calloutCount(t, s, "join", outcomeAllowed); got != 2 {
		t.Fatalf("allowed joins counted %v, want 2", got)
	}
}

func TestCalloutPublishRewrite(t *testing.T) {
	b := newBackend(t, func(_ *http.Request, c backendCall) (int, string) {
		if c.Hook != "publish" {
			return 200, `{"allow": true}`
		}
		switch {
		case c.Body["data"] != nil && strings.Contains(fmt.Sprint(c.Body["data"]), "darn"):
			return 200, `{"allow": true, "data": {"text": "****", "by": "filter"}}`
		case c.Body["data_base64"] != nil:
			return 200, `{"allow": true, "data_base64": "AAEC"}`
		case c.Body["data"] == "forbidden":
			return 200, `{"allow": false, "reason": "no such words"}`
		}
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, nil)
	sub, pub := dialLink(t, s.LinkAddr(), "gw-1"), dialLink(t, s.LinkAddr(), "gw-2")
	sub.ok(joinReq("/room/1", "s1", "chat"))

	payloads := []string{`{"text": "darn"}`, "\x00binary\xff", `"fine"`, `"forbidden"`}
	for _, p := range payloads {
		r := pub.do(userPublish("bob", "/room/1", "chat", p))
		if p == `"forbidden"` {
			if r.GetCode() != imqpb.Code_DENIED || r.GetMessage() != "no such words" {
				t.Fatalf("denied publish: %v %q", r.GetCode(), r.GetMessage())
			}
			continue
		}
		if r.GetCode() != imqpb.Code_OK {
			t.Fatalf("publish %q: %v %q", p, r.GetCode(), r.GetMessage())
		}
	}
	var got []string
	for _, m := range delivered(t, sub.sync()) {
		if m.GetEvent().GetSender() != "bob" {
			t.Fatalf("event sender %q, want bob", m.GetEvent().GetSender())
		}
		got = append(got, string(m.GetEvent().GetPayload()))
	}
	if want := []string{`{"text":"****","by":"filter"}`, "\x00\x01\x02", `"fine"`}; !slices.Equal(got, want) {
		t.Fatalf("subscriber got %q, want %q", got, want)
	}
	calls := b.callsTo("publish")
	if len(calls) != 4 || calls[1]["data_base64"] != "AGJpbmFyef8=" || calls[1]["data"] != nil ||
		calls[0]["user"] != "bob" || calls[0]["session"] != "s-bob" || calls[0]["queue"] != "/room/1" || calls[0]["mount"] != "chat" {
		t.Fatalf("publish call-outs %v", calls)
	}
	if page := pub.ok(historyReq("/room/1", "chat", 0, 0)).GetHistory(); len(page.GetEvents()) != 3 {
		t.Fatalf("history holds %d events, want 3: the denied publish was appended", len(page.GetEvents()))
	}
	if calloutCount(t, s, "publish", outcomeRewritten) != 2 || calloutCount(t, s, "publish", outcomeAllowed) != 1 ||
		calloutCount(t, s, "publish", outcomeDenied) != 1 {
		t.Fatal("publish outcomes miscounted")
	}

	// Backend requests skip call-outs.
	pub.ok(backendPublish("/room/1", "chat", `"darn"`))
	if n := len(b.callsTo("publish")); n != 4 {
		t.Fatalf("a backend publish made a call-out (%d calls)", n)
	}
}

// TestCalloutFailurePolicy: a backend that does not answer properly means
// what CalloutFailOpen says.
func TestCalloutFailurePolicy(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	answers := map[string]func(r *http.Request) (int, string){
		"slow": func(r *http.Request) (int, string) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return 200, `{"allow": true}`
		},
		"error":   func(*http.Request) (int, string) { return 503, `{"allow": true}` },
		"badjson": func(*http.Request) (int, string) { return 200, `{"allow": tru` },
		"noallow": func(*http.Request) (int, string) { return 200, `{"reason": "?"}` },
		"huge": func(*http.Request) (int, string) {
			return 200, `{"allow": true, "x": "` + strings.Repeat("x", maxCalloutBody) + `"}`
		},
	}
	b := newBackend(t, func(r *http.Request, c backendCall) (int, string) {
		return answers[strings.TrimPrefix(c.Body["queue"].(string), "/room/")](r)
	})
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()

	for _, failOpen := range []bool{false, true} {
		t.Run(fmt.Sprint("fail open ", failOpen), func(t *testing.T) {
			s := startCalloutNode(t, b.srv.URL, func(c *Config) {
				c.CalloutTimeout = 300 * time.Millisecond
				c.CalloutFailOpen = failOpen
				c.Callouts = append(c.Callouts, Callout{Prefix: "/room/down", URL: downURL})
			})
			l := dialLink(t, s.LinkAddr(), "gw-1")
			for _, queue := range []string{"slow", "error", "badjson", "noallow", "huge", "down"} {
				for _, req := range []*imqpb.NodeRequest{joinReq("/room/"+queue, "s1", "chat"), userPublish("bob", "/room/"+queue, "chat", `1`)} {
					start := time.Now()
					r := l.do(req)
					if failOpen && r.GetCode() != imqpb.Code_OK {
						t.Fatalf("%s %v failing open: %v %q", queue, req.GetOp(), r.GetCode(), r.GetMessage())
					}
					if !failOpen && (r.GetCode() != imqpb.Code_UNAVAILABLE || !strings.HasPrefix(r.GetMessage(), "the backend did not answer: ")) {
						t.Fatalf("%s %v failing closed: %v %q", queue, req.GetOp(), r.GetCode(), r.GetMessage())
					}
					if strings.Contains(r.GetMessage(), "127.0.0.1") {
						t.Fatalf("the message %q shows the backend's address", r.GetMessage())
					}
					if d := time.Since(start); queue == "slow" && (d < 250*time.Millisecond || d > 3*time.Second) {
						t.Fatalf("slow call-out answered after %s, want about the 300ms timeout", d)
					}
				}
			}
			outcome := outcomeFailedDenied
			if failOpen {
				outcome = outcomeFailedAllowed
			}
			for _, hook := range []string{"join", "publish"} {
				if got := calloutCount(t, s, hook, outcome); got != 6 {
					t.Fatalf("%s %s counted %v, want 6", hook, outcome, got)
				}
			}
		})
	}
}

func TestCalloutLeaveNotified(t *testing.T) {
	b := newBackend(t, nil)
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.Callouts = append(c.Callouts, Callout{Prefix: "/room/quiet/", URL: b.srv.URL + "/imq", Hooks: HookJoin})
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(joinReq("/room/1", "s1", "chat"))
	l.ok(joinReq("/room/quiet/1", "s1", "chat"))
	l.ok(leaveReq("/room/1", "s1"))
	l.ok(leaveReq("/room/quiet/1", "s1"))
	testutil.WaitFor(t, waitFor, "the leave call-out", func() bool { return len(b.callsTo("leave")) == 1 })
	leave, _, _ := stamped(t, s, b.callsTo("leave")[0])
	if got, want := mustJSON(t, leave), mustJSON(t, map[string]any{"hook": "leave", "user": "u-s1", "session": "s1", "queue": "/room/1"}); got != want {
		t.Fatalf("leave call-out %s, want %s", got, want)
	}

	// A link that closes leaves for its subscribers.
	l2 := dialLink(t, s.LinkAddr(), "gw-2")
	l2.ok(joinReq("/room/2", "s2", "chat"))
	l2.ok(joinReq("/room/3", "s3", "chat"))
	l2.ok(joinReq("/lobby/1", "s2", "chat"))
	l2.c.Close()
	testutil.WaitFor(t, waitFor, "leave call-outs for the closed link", func() bool { return len(b.callsTo("leave")) == 3 })
	var queues []string
	for _, c := range b.callsTo("leave")[1:] {
		queues = append(queues, c["queue"].(string))
	}
	slices.Sort(queues)
	if !slices.Equal(queues, []string{"/room/2", "/room/3"}) {
		t.Fatalf("leave call-outs for %v", queues)
	}
	testutil.WaitFor(t, waitFor, "the leave outcomes counted", func() bool { return calloutCount(t, s, "leave", outcomeAllowed) == 3 })
}

// TestCalloutLeaveQueue: leave notifications wait in a bounded queue
// (overflow dropped and counted), which stop drains before the workers end.
func TestCalloutLeaveQueue(t *testing.T) {
	b := newBackend(t, nil)
	cfg := DefaultConfig()
	cfg.Callouts = []Callout{{Prefix: "/room/", URL: b.srv.URL + "/imq"}}
	co := newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler))
	dropped := co.m.callouts.WithLabelValues("leave", outcomeDropped)
	for i := range leaveQueueLen + 5 { // no workers yet: nothing drains
		co.notifyLeave(co.routes[0], "u", fmt.Sprint("s", i), "/room/1")
	}
	if got := counterValue(t, dropped); got != 5 {
		t.Fatalf("dropped %v leave notifications, want 5", got)
	}
	for len(co.leaves) > 3 { // keep the test quick
		<-co.leaves
	}
	co.start()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := co.stop(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(b.callsTo("leave")); n != 3 {
		t.Fatalf("stop sent %d queued leave notifications, want 3", n)
	}
	if err := co.stop(ctx); err != nil {
		t.Fatalf("second stop: %v", err)
	}

	// A stop that runs out of time drops what is left, at once.
	co = newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler))
	for range 100 {
		co.notifyLeave(co.routes[0], "u", "s", "/room/1")
	}
	co.start()
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	co.stop(ctx)
	sent := counterValue(t, co.m.callouts.WithLabelValues("leave", outcomeAllowed)) +
		counterValue(t, co.m.callouts.WithLabelValues("leave", outcomeFailedAllowed)) +
		counterValue(t, co.m.callouts.WithLabelValues("leave", outcomeDropped))
	if sent != 100 || len(co.leaves) != 0 {
		t.Fatalf("%v of 100 notifications accounted for, %d left queued", sent, len(co.leaves))
	}
}

// TestCalloutSlowUserBlocksNoOne: while one user's call-out waits, other
// users of the same queue, other queues and the link go on.
func TestCalloutSlowUserBlocksNoOne(t *testing.T) {
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	b := newBackend(t, func(r *http.Request, c backendCall) (int, string) {
		if c.Body["user"] == "slow" || c.Body["user"] == "u-slow" {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, nil)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(joinReq("/room/1", "s1", "chat"))
	slowPub := l.send(userPublish("slow", "/room/1", "chat", `"slow"`))
	slowJoin := l.send(joinReq("/room/2", "slow", "chat"))
	testutil.WaitFor(t, waitFor, "the slow call-outs to start", func() bool { return b.cur.Load() == 2 })

	// Same queue, another user; another queue with call-outs; a queue
	// without; a backend request: all answered while the slow ones wait.
	l.ok(userPublish("fast", "/room/1", "chat", `"fast"`))
	l.ok(joinReq("/room/2", "s2", "chat"))
	l.ok(userPublish("fast", "/lobby/1", "chat", `"x"`))
	l.ok(backendPublish("/room/1", "chat", `"backend"`))
	var got []string
	for _, m := range delivered(t, l.sync()) {
		if m.GetEvent().GetQueue() == "/room/1" {
			got = append(got, string(m.GetEvent().GetPayload()))
		}
	}
	if !slices.Equal(got, []string{`"fast"`, `"backend"`}) {
		t.Fatalf("delivered %v while the slow call-out waits", got)
	}

	releaseOnce.Do(func() { close(release) })
	if r := l.await(slowPub); r.GetCode() != imqpb.Code_OK || r.GetPublished().GetOffset() != 3 {
		t.Fatalf("slow publish: %v", r)
	}
	if r := l.await(slowJoin); r.GetCode() != imqpb.Code_OK || r.GetJoined() == nil {
		t.Fatalf("slow join: %v", r)
	}
}

// TestCalloutKeepsSessionOrder: a session's publishes, joins and leaves on
// a queue with call-outs run in the order sent, whatever the call-outs
// take; a request that needs no call-out waits behind one that does.
func TestCalloutKeepsSessionOrder(t *testing.T) {
	b := newBackend(t, func(*http.Request, backendCall) (int, string) {
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, nil)
	sub, pub := dialLink(t, s.LinkAddr(), "gw-1"), dialLink(t, s.LinkAddr(), "gw-2")
	sub.ok(joinReq("/room/1", "s1", "chat", "score"))

	const n = 30
	var ids []uint64
	for i := range n {
		ids = append(ids, pub.send(userPublish("alice", "/room/1", "chat", fmt.Sprint(i))))
		if i%10 == 5 { // set_state needs no call-out, but follows the publishes
			st := setStateReq("/room/1", "state", "k")
			st.Session = "s-alice"
			st.GetSetState().Value = []byte(fmt.Sprint(i))
			ids = append(ids, pub.send(st))
		}
	}
	for _, id := range ids {
		if r := pub.await(id); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("request %d: %v %q", id, r.GetCode(), r.GetMessage())
		}
	}
	var got []string
	for _, m := range delivered(t, sub.sync()) {
		got = append(got, string(m.GetEvent().GetPayload()))
	}
	want := []string{}
	for i := range n {
		want = append(want, fmt.Sprint(i))
	}
	if !slices.Equal(got, want) {
		t.Fatalf("delivered %v, want %v", got, want)
	}
	page := pub.ok(historyReq("/room/1", "chat", 0, 0)).GetHistory()
	var offsets []uint64
	for _, ev := range page.GetEvents() {
		offsets = append(offsets, ev.GetOffset())
	}
	// The state changes took offsets 7, 18 and 29, between the publishes.
	if !slices.Contains(offsets, 6) || slices.Contains(offsets, 7) || slices.Contains(offsets, 18) || !slices.IsSorted(offsets) {
		t.Fatalf("publish offsets %v", offsets)
	}

	// A join waiting for its call-out, then a leave at once: the leave
	// does not overtake the join.
	for i := range 5 {
		session := fmt.Sprint("j", i)
		join := pub.send(joinReq("/room/1", session, "chat"))
		leave := pub.send(leaveReq("/room/1", session))
		if r := pub.await(join); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("join: %v %q", r.GetCode(), r.GetMessage())
		}
		if r := pub.await(leave); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("leave right after a join: %v %q (it overtook the join)", r.GetCode(), r.GetMessage())
		}
	}
	info := pub.ok(queueInfoReq("/room/1")).GetQueueInfo()
	if len(info.GetSubscribers()) != 1 {
		t.Fatalf("subscribers %v, want s1 alone", info.GetSubscribers())
	}
	testutil.WaitFor(t, waitFor, "chains forgotten", func() bool {
		for _, l := range s.linksForTest() {
			l.chainMu.Lock()
			n, c := len(l.chains), l.chained
			l.chainMu.Unlock()
			if n != 0 || c != 0 {
				return false
			}
		}
		return true
	})
}

func (s *Server) linksForTest() []*link {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*link
	for _, l := range s.links {
		out = append(out, l)
	}
	return out
}

func TestCalloutConcurrencyLimit(t *testing.T) {
	b := newBackend(t, func(*http.Request, backendCall) (int, string) {
		time.Sleep(30 * time.Millisecond)
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.CalloutConcurrency = 3
		// A second prefix on the same host shares its limit.
		c.Callouts = append(c.Callouts, Callout{Prefix: "/game/", URL: b.srv.URL + "/imq/game"})
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	var ids []uint64
	for i := range 12 {
		queue := "/room/1"
		if i%2 == 1 {
			queue = "/game/1"
		}
		ids = append(ids, l.send(userPublish(fmt.Sprint("u", i), queue, "chat", `1`)))
	}
	for _, id := range ids {
		if r := l.await(id); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("publish: %v %q", r.GetCode(), r.GetMessage())
		}
	}
	if p := b.peak.Load(); p != 3 {
		t.Fatalf("peak concurrent call-outs %d, want 3 (the limit, reached)", p)
	}

	// Beyond the waiting bound (16 per slot), call-outs fail at once.
	h := s.co.routes[0].host
	for range cap(h.slots) {
		h.slots <- struct{}{}
	}
	h.waiting.Store(h.maxWaiting)
	r := l.do(userPublish("late", "/room/1", "chat", `1`))
	if r.GetCode() != imqpb.Code_UNAVAILABLE || !strings.Contains(r.GetMessage(), "too many call-outs waiting") {
		t.Fatalf("publish beyond the waiting bound: %v %q", r.GetCode(), r.GetMessage())
	}
	h.waiting.Store(0)
	for range cap(h.slots) {
		<-h.slots
	}
}

// TestCalloutLinkBound: a link's requests waiting for call-outs are
// bounded; beyond that they are answered LIMIT_EXCEEDED at once.
func TestCalloutLinkBound(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	b := newBackend(t, func(r *http.Request, _ backendCall) (int, string) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.Limits.MaxPayload = 1000
		c.LinkBuffer = 4000 // three chained publishes of ~1000 bytes fit
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	big := strings.Repeat("x", 900)
	for i := range 3 {
		l.send(userPublish(fmt.Sprint("u", i), "/room/1", "chat", `"`+big+`"`))
	}
	r := l.do(userPublish("u4", "/room/1", "chat", `"`+big+`"`))
	if r.GetCode() != imqpb.Code_LIMIT_EXCEEDED {
		t.Fatalf("publish beyond the link's bound: %v %q, want LIMIT_EXCEEDED", r.GetCode(), r.GetMessage())
	}
	// Requests without call-outs still run.
	l.ok(userPublish("u5", "/lobby/1", "chat", `"`+big+`"`))
}

// TestCalloutShutdownCancels: Shutdown does not wait for call-outs that
// hang, and a closed link's chains run nothing more.
func TestCalloutShutdownCancels(t *testing.T) {
	b := newBackend(t, func(r *http.Request, _ backendCall) (int, string) {
		<-r.Context().Done()
		return 200, `{"allow": true}`
	})
	cfg := DefaultConfig()
	cfg.LinkAddr = "127.0.0.1:0"
	cfg.Callouts = []Callout{{Prefix: "/room/", URL: b.srv.URL + "/imq"}}
	cfg.CalloutTimeout = time.Minute
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.send(joinReq("/room/1", "s1", "chat"))
	l.send(userPublish("bob", "/room/1", "chat", `1`))
	testutil.WaitFor(t, waitFor, "the call-outs to start", func() bool { return b.cur.Load() == 2 })

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	start := time.Now()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("shutdown took %s with call-outs hanging", d)
	}
	if s.hasQueue("/room/1") {
		t.Fatal("a request whose call-out was cancelled ran")
	}
}

// TestCalloutLinkBoundKeepsLeaves: a leave without a reply (what a gateway
// sends for a closed connection or a timed-out join) is never refused by
// the link's bound: dropped behind its chain's join, it would leave a
// subscriber that no session has.
func TestCalloutLinkBoundKeepsLeaves(t *testing.T) {
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	b := newBackend(t, func(r *http.Request, _ backendCall) (int, string) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.Limits.MaxPayload = 1000
		c.LinkBuffer = 4000
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	join := l.send(joinReq("/room/1", "s1", "chat"))
	big := strings.Repeat("x", 948)
	var pubs []uint64
	for i := range 3 { // the link's bound is reached: not even a leave fits
		pubs = append(pubs, l.send(userPublish(fmt.Sprint("u", i), "/room/1", "chat", `"`+big+`"`)))
	}
	if r := l.do(userPublish("u9", "/room/1", "chat", `"`+big+`"`)); r.GetCode() != imqpb.Code_LIMIT_EXCEEDED {
		t.Fatalf("publish beyond the link's bound: %v, want LIMIT_EXCEEDED", r.GetCode())
	}
	l.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: leaveReq("/room/1", "s1")}}) // id 0: no reply
	l.sync()
	releaseOnce.Do(func() { close(release) })
	if r := l.await(join); r.GetCode() != imqpb.Code_OK {
		t.Fatalf("join: %v %q", r.GetCode(), r.GetMessage())
	}
	for _, id := range pubs {
		if r := l.await(id); r.GetCode() != imqpb.Code_OK {
			t.Fatalf("publish: %v %q", r.GetCode(), r.GetMessage())
		}
	}
	testutil.WaitFor(t, waitFor, "the leave to run after the join", func() bool {
		return len(l.ok(queueInfoReq("/room/1")).GetQueueInfo().GetSubscribers()) == 0
	})
}

// TestCalloutPublishNotUTF8: a payload that is JSON but for bytes that are
// not UTF-8 reaches the backend as data_base64, never as invalid JSON text.
func TestCalloutPublishNotUTF8(t *testing.T) {
	var raw []string
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		raw = append(raw, string(b))
		mu.Unlock()
		w.Write([]byte(`{"allow": true}`))
	}))
	t.Cleanup(srv.Close)
	s := startCalloutNode(t, srv.URL, nil)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(userPublish("bob", "/room/1", "chat", "\"caf\xe9\""))
	l.ok(userPublish("bob", "/room/1", "chat", `"café"`))
	mu.Lock()
	defer mu.Unlock()
	if len(raw) != 2 || !utf8.ValidString(raw[0]) || !strings.Contains(raw[0], `"data_base64":"ImNhZuki"`) ||
		!strings.Contains(raw[1], `"data":"café"`) {
		t.Fatalf("publish call-outs %q", raw)
	}
}

// TestCalloutBodiesOrdered: every hook body carries seq, time_ms and node.
// A leave notification is sent asynchronously and may reach the backend
// after the call-out of a later join of the same session; seq, given when
// the node decides each operation, still orders them.
func TestCalloutBodiesOrdered(t *testing.T) {
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	var mu sync.Mutex
	var answered []backendCall // Guarded by mu: in the order answered.
	b := newBackend(t, func(r *http.Request, c backendCall) (int, string) {
		if c.Hook == "leave" && c.Body["session"] == "s1" {
			select { // the leave notification is slow to go out
			case <-release:
			case <-r.Context().Done():
			}
		}
		mu.Lock()
		answered = append(answered, c)
		mu.Unlock()
		return 200, `{"allow": true}`
	})
	s := startCalloutNode(t, b.srv.URL, func(c *Config) { c.NodeID = "node-a" })
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(joinReq("/room/1", "s1", "chat"))
	l.ok(userPublish("u-s1", "/room/1", "chat", `1`))
	l.ok(leaveReq("/room/1", "s1"))
	testutil.WaitFor(t, waitFor, "the leave call-out to start", func() bool { return b.cur.Load() == 1 })
	l.ok(joinReq("/room/1", "s1", "chat"))
	releaseOnce.Do(func() { close(release) })
	testutil.WaitFor(t, waitFor, "the leave call-out", func() bool { mu.Lock(); defer mu.Unlock(); return len(answered) == 4 })

	mu.Lock()
	calls := slices.Clone(answered)
	mu.Unlock()
	var hooks []string
	var seqs []uint64
	var lastTime int64
	for _, c := range calls {
		_, seq, timeMs := stamped(t, s, c.Body)
		hooks = append(hooks, c.Hook)
		seqs = append(seqs, seq)
		if c.Hook != "leave" && timeMs < lastTime {
			t.Fatalf("%s's time_ms %d is before the previous call-out's, %d", c.Hook, timeMs, lastTime)
		}
		lastTime = max(lastTime, timeMs)
	}
	// The rejoin's call-out was answered before the leave notification;
	// by seq, the leave comes between the two joins.
	if want := []string{"join", "publish", "join", "leave"}; !slices.Equal(hooks, want) {
		t.Fatalf("call-outs answered as %v, want %v", hooks, want)
	}
	if !(seqs[0] < seqs[1] && seqs[1] < seqs[3] && seqs[3] < seqs[2]) {
		t.Fatalf("seqs %v of join, publish, rejoin, leave: want join < publish < leave < rejoin", seqs)
	}

	// A link that closes: its subscribers' leaves are stamped as the node
	// removes them, after everything before.
	l.c.Close()
	testutil.WaitFor(t, waitFor, "the closed link's leave call-out", func() bool { mu.Lock(); defer mu.Unlock(); return len(answered) == 5 })
	mu.Lock()
	last := answered[4]
	mu.Unlock()
	if _, seq, _ := stamped(t, s, last.Body); last.Hook != "leave" || seq <= seqs[2] {
		t.Fatalf("closed link's %s seq %d, want a leave after the rejoin's %d", last.Hook, seq, seqs[2])
	}
}

// TestCalloutSeqAcrossRestarts: a node's seqs start from its start time in
// Unix microseconds, so a restarted node's come after the last one's.
func TestCalloutSeqAcrossRestarts(t *testing.T) {
	start := time.Now()
	cfg := DefaultConfig()
	cfg.Callouts = []Callout{{Prefix: "/room/", URL: "http://backend"}}
	cfg.Now = func() time.Time { return start }
	co := newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler))
	var last uint64
	for range 1000 {
		seq, timeMs := co.stamp()
		if seq <= last || timeMs != start.UnixMilli() {
			t.Fatalf("stamp %d, %d after seq %d", seq, timeMs, last)
		}
		last = seq
	}
	cfg.Now = func() time.Time { return start.Add(time.Second) } // restarted a second later
	co = newCallouts(&cfg, newMetrics(prometheus.NewRegistry(), nil), slog.New(slog.DiscardHandler))
	if seq, _ := co.stamp(); seq <= last {
		t.Fatalf("restarted node's first seq %d, want after %d", seq, last)
	}
}

func userSetState(user, queue, mount, key, value string, del bool) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{User: user, Session: "s-" + user, Op: &imqpb.NodeRequest_SetState{SetState: &imqpb.SetState{
		Queue: queue, Mount: mount, Key: key, Value: []byte(value), Delete: del,
	}}}
}

// stateChanges returns the keys of the state changes among frames.
func stateChanges(t *testing.T, frames []*imqpb.LinkDown) []string {
	t.Helper()
	var keys []string
	for _, m := range delivered(t, frames) {
		if st := m.GetState(); st != nil {
			keys = append(keys, st.GetKey())
		}
	}
	return keys
}

// TestCalloutSetState: a client's state change goes through the set_state
// hook like a publish: allowed, refused (FORBIDDEN, nothing stored or
// delivered) or failed (the failure policy); the backend's own writes and
// routes without the hook ask nobody.
func TestCalloutSetState(t *testing.T) {
	b := newBackend(t, func(_ *http.Request, c backendCall) (int, string) {
		if c.Hook != "set_state" {
			return 200, `{"allow": true}`
		}
		switch c.Body["key"] {
		case "cheat":
			return 200, `{"allow": false, "reason": "no cheating"}`
		case "quiet":
			return 200, `{"allow": false}`
		case "err":
			return 503, `{"allow": true}`
		}
		return 200, `{"allow": true, "value": "ignored"}`
	})
	for _, failOpen := range []bool{false, true} {
		t.Run(fmt.Sprint("fail open ", failOpen), func(t *testing.T) {
			s := startCalloutNode(t, b.srv.URL, func(c *Config) {
				c.CalloutFailOpen = failOpen
				c.Callouts = append(c.Callouts, Callout{Prefix: "/room/nostate/", URL: b.srv.URL + "/imq", Hooks: HookJoin | HookPublish})
			})
			const q = "/room/1"
			l := dialLink(t, s.LinkAddr(), "gw-1")
			join := joinReq(q, "s-alice", "chat")
			join.User = "alice"
			join.GetJoin().Mounts = append(join.GetJoin().Mounts, stateSpec("scores"))
			l.ok(join)
			before := len(b.callsTo("set_state"))

			l.ok(userSetState("bob", q, "scores", "bob", `{"points":1}`, false))
			calls := b.callsTo("set_state")[before:]
			if len(calls) != 1 {
				t.Fatalf("%d set_state call-outs, want 1", len(calls))
			}
			body, _, _ := stamped(t, s, calls[0])
			want := map[string]any{"hook": "set_state", "user": "bob", "session": "s-bob", "queue": q, "mount": "scores",
				"key": "bob", "value": map[string]any{"points": 1}, "delete": false}
			if got := mustJSON(t, body); got != mustJSON(t, want) {
				t.Fatalf("set_state call-out body %s, want %s", got, mustJSON(t, want))
			}
			if got := stateChanges(t, l.sync()); !slices.Equal(got, []string{"bob"}) {
				t.Fatalf("delivered state changes %v, want [bob]", got)
			}

			for key, reason := range map[string]string{"cheat": "no cheating", "quiet": deniedMessage} {
				r := l.do(userSetState("bob", q, "scores", key, `1`, false))
				if r.GetCode() != imqpb.Code_FORBIDDEN || r.GetMessage() != reason {
					t.Fatalf("refused state write: %v %q, want FORBIDDEN %q", r.GetCode(), r.GetMessage(), reason)
				}
			}
			r := l.do(userSetState("bob", q, "scores", "err", "\xff", false))
			if failOpen && r.GetCode() != imqpb.Code_OK || !failOpen && r.GetCode() != imqpb.Code_UNAVAILABLE {
				t.Fatalf("state write with a failing backend, fail open %v: %v %q", failOpen, r.GetCode(), r.GetMessage())
			}
			if last := b.callsTo("set_state"); last[len(last)-1]["value_base64"] != "/w==" || last[len(last)-1]["value"] != nil {
				t.Fatalf("a non-JSON value went as %v, want value_base64", last[len(last)-1])
			}
			wantKeys := []string{"bob"}
			if failOpen {
				wantKeys = append(wantKeys, "err")
			}
			if got := stateChanges(t, l.sync()); !slices.Equal(got, wantKeys[1:]) {
				t.Fatalf("delivered state changes %v after refusals, want %v", got, wantKeys[1:])
			}
			var stored []string
			for _, e := range l.ok(getStateReq(q, "scores")).GetState().GetEntries() {
				stored = append(stored, e.GetKey())
			}
			if !slices.Equal(stored, wantKeys) {
				t.Fatalf("stored keys %v, want %v", stored, wantKeys)
			}
			if e := l.ok(getStateReq(q, "scores", "bob")).GetState().GetEntries(); string(e[0].GetValue()) != `{"points":1}` {
				t.Fatalf("bob's value %s: an answer's value must not rewrite it", e[0].GetValue())
			}

			// Deletes ask too, without a value.
			n := len(b.callsTo("set_state"))
			if r := l.do(userSetState("bob", q, "scores", "cheat", "", true)); r.GetCode() != imqpb.Code_FORBIDDEN {
				t.Fatalf("refused delete: %v", r.GetCode())
			}
			l.ok(userSetState("bob", q, "scores", "bob", "", true))
			calls = b.callsTo("set_state")[n:]
			if len(calls) != 2 || calls[1]["delete"] != true || calls[1]["value"] != nil || calls[1]["value_base64"] != nil {
				t.Fatalf("delete call-outs %v", calls)
			}

			// The backend's writes and a route without the hook ask nobody.
			n = len(b.callsTo("set_state"))
			l.ok(backendSetState(q, "scores", "cheat", `1`, false))
			l.ok(userSetState("bob", "/room/nostate/1", "scores", "cheat", `1`, false))
			if got := len(b.callsTo("set_state")); got != n {
				t.Fatalf("%d set_state call-outs for backend or unhooked writes", got-n)
			}
			outcome := outcomeFailedDenied
			if failOpen {
				outcome = outcomeFailedAllowed
			}
			if a, d, f := calloutCount(t, s, "set_state", outcomeAllowed), calloutCount(t, s, "set_state", outcomeDenied), calloutCount(t, s, "set_state", outcome); a != 2 || d != 3 || f != 1 {
				t.Fatalf("set_state outcomes allowed %v, denied %v, %s %v; want 2, 3, 1", a, d, outcome, f)
			}
		})
	}
}

// TestCalloutEmptyValue: an empty state value or payload is not JSON; it
// goes as "value_base64": "" or "data_base64": "", so that the backend
// tells a set from a delete and always finds the field it expects.
func TestCalloutEmptyValue(t *testing.T) {
	b := newBackend(t, nil)
	s := startCalloutNode(t, b.srv.URL, nil)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	l.ok(userSetState("bob", "/room/1", "scores", "bob", "", false))
	l.ok(userPublish("bob", "/room/1", "chat", ""))
	set, pub := b.callsTo("set_state"), b.callsTo("publish")
	if len(set) != 1 || len(pub) != 1 {
		t.Fatalf("%d set_state and %d publish call-outs, want 1 each", len(set), len(pub))
	}
	if v, ok := set[0]["value_base64"]; !ok || v != "" || set[0]["value"] != nil || set[0]["delete"] != false {
		t.Errorf("an empty state value went as %v, want value_base64 \"\"", set[0])
	}
	if v, ok := pub[0]["data_base64"]; !ok || v != "" || pub[0]["data"] != nil {
		t.Errorf("an empty payload went as %v, want data_base64 \"\"", pub[0])
	}
}
