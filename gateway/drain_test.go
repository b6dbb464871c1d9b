package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// startStandaloneGateway starts a gateway in development mode wired to the
// queue node at nodeAddr, and waits until it is ready.
func startStandaloneGateway(t *testing.T, nodeAddr string, mod func(*gateway.Config)) *gateway.Server {
	t.Helper()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.Dev, cfg.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, nodeAddr
	cfg.MaxPendingPerIP = -1 // every test client comes from 127.0.0.1
	if mod != nil {
		mod(&cfg)
	}
	gw, err := gateway.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go gw.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		gw.Shutdown(ctx)
	})
	testutil.WaitFor(t, 5*time.Second, "the gateway to turn healthy", func() bool { return healthy(gw) })
	return gw
}

// healthy reports whether gw's internal /healthz answers 200, as a load
// balancer checks it.
func healthy(gw *gateway.Server) bool {
	resp, err := http.Get("http://" + gw.InternalAddr() + "/healthz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// goodbyeLog records, per user, when the client logged losing its
// connection to a goodbye SHUTDOWN (the SDK's "connection lost" warning,
// whose err is the *GoodbyeError).
type goodbyeLog struct {
	mu    sync.Mutex
	at    map[string]time.Time
	other []error // connections lost for another cause
}

func (g *goodbyeLog) handler(user string) slog.Handler {
	return goodbyeHandler{g: g, user: user}
}

type goodbyeHandler struct {
	g    *goodbyeLog
	user string
}

func (h goodbyeHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h goodbyeHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h goodbyeHandler) WithGroup(string) slog.Handler            { return h }
func (h goodbyeHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "imq client: connection lost" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != "err" {
			return true
		}
		err, _ := a.Value.Any().(error)
		h.g.mu.Lock()
		defer h.g.mu.Unlock()
		if g, ok := errors.AsType[*client.GoodbyeError](err); ok && g.Reason == imqpb.Reason_REASON_SHUTDOWN && g.Reconnect {
			h.g.at[h.user] = r.Time
		} else {
			h.g.other = append(h.g.other, err)
		}
		return false
	})
	return nil
}

// TestShutdownSpreadsGoodbyes: a gateway with 200 SDK clients, shut down
// with a spread of 1 s, turns not ready at once (a load balancer, here the
// clients' dialer, sends them to the other gateway), says goodbye SHUTDOWN
// to every client over the spread rather than in one instant, and each
// client reconnects at once, through the other gateway of the same queue
// node, and resumes its queue: the events published before, during and after
// the move arrive once each, in order, without a gap. The clients' backoff
// is 10 s: they are back within the test's time only because a goodbye
// SHUTDOWN is answered without one.
func TestShutdownSpreadsGoodbyes(t *testing.T) {
	const clients = 200
	const spread = time.Second
	node := startNode(t, "node-1", nil)
	gwA := startStandaloneGateway(t, node.LinkAddr(), func(c *gateway.Config) { c.ShutdownSpread = spread })
	gwB := startStandaloneGateway(t, node.LinkAddr(), func(c *gateway.Config) { c.ShutdownSpread = 0 }) // the test's end need not wait

	// The load balancer: a new connection goes to A while A's health
	// check passes, else to B.
	lb := &websocket.Dialer{NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		addr := gwB.Addr()
		if healthy(gwA) {
			addr = gwA.Addr()
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	log := &goodbyeLog{at: map[string]time.Time{}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	pub, err := client.Dial(ctx, "ws://"+gwB.Addr()+"/ws", client.WithUser("publisher"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pub.Close() })
	type player struct {
		c   *client.Client
		sub *client.Subscription
		mu  sync.Mutex
		got []client.Update
	}
	players := make([]*player, clients)
	queue := func(i int) string { return fmt.Sprintf("/room/drain-%d", i) }
	for i := range players {
		user := fmt.Sprintf("p%d", i)
		c, err := client.Dial(ctx, "ws://lb/ws", client.WithUser(user), client.WithDialer(lb),
			client.WithBackoff(10*time.Second, 20*time.Second), client.WithLogger(slog.New(log.handler(user))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		sub, err := c.Join(ctx, queue(i), client.Messages("chat"))
		if err != nil {
			t.Fatal(err)
		}
		p := &player{c: c, sub: sub}
		players[i] = p
		go func() { // ends when the client closes
			for u := range sub.Updates() {
				p.mu.Lock()
				p.got = append(p.got, u)
				p.mu.Unlock()
			}
		}()
	}
	publishAll := func(payload string) {
		t.Helper()
		for i := range players {
			if _, err := pub.Publish(ctx, queue(i), "chat", []byte(payload)); err != nil {
				t.Fatal(err)
			}
		}
	}
	received := func(n int) func() bool {
		return func() bool {
			for _, p := range players {
				p.mu.Lock()
				k := len(p.got)
				p.mu.Unlock()
				if k < n {
					return false
				}
			}
			return true
		}
	}
	publishAll(`"before"`)
	testutil.WaitFor(t, 5*time.Second, "every client to receive the first event", received(1))
	var va gateway.Varz
	if getJSON(t, "http://"+gwA.InternalAddr()+"/varz", &va); va.Connections != clients || va.Draining {
		t.Fatalf("before the shutdown A has %d connections (draining %v), want %d", va.Connections, va.Draining, clients)
	}

	shut := make(chan error, 1)
	start := time.Now()
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- gwA.Shutdown(sctx)
	}()
	testutil.WaitFor(t, time.Second, "gateway A to report draining", func() bool {
		var v gateway.Varz
		return getJSON(t, "http://"+gwA.InternalAddr()+"/varz", &v) == http.StatusOK && v.Draining
	})
	if healthy(gwA) {
		t.Fatal("a draining gateway's /healthz still answers 200")
	}
	publishAll(`"during"`) // some players are on A still, some on B already
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	took := time.Since(start)
	testutil.WaitFor(t, 5*time.Second, "every client back through gateway B", func() bool {
		var v gateway.Varz
		getJSON(t, "http://"+gwB.InternalAddr()+"/varz", &v)
		return v.Connections == clients+1 // the publisher too
	})
	publishAll(`"after"`)
	testutil.WaitFor(t, 5*time.Second, "every client to receive the third event", received(3))

	log.mu.Lock()
	if len(log.other) > 0 {
		t.Errorf("connections lost for another cause than the goodbye: %v", log.other[:min(3, len(log.other))])
	}
	var times []time.Time
	for _, at := range log.at {
		times = append(times, at)
	}
	log.mu.Unlock()
	if len(times) != clients {
		t.Fatalf("%d clients logged a goodbye SHUTDOWN, want %d", len(times), clients)
	}
	first, last := slices.MinFunc(times, time.Time.Compare), slices.MaxFunc(times, time.Time.Compare)
	// The last goodbye is due at 199/200 of the spread; a generous bound
	// that one instant's goodbyes (a few ms apart) cannot meet.
	if d := last.Sub(first); d < spread/2 {
		t.Errorf("the goodbyes arrived within %v of one another; want them spread over about %v", d, spread)
	}
	t.Logf("goodbyes spread over %v; shutdown took %v", last.Sub(first), took)
	for i, p := range players {
		p.mu.Lock()
		got := slices.Clone(p.got)
		p.mu.Unlock()
		var payloads []string
		for _, u := range got {
			if u.Kind != client.KindEvent {
				t.Fatalf("%s: update %v (%s), want only events", queue(i), u.Kind, u.Message)
			}
			payloads = append(payloads, string(u.Payload))
		}
		if want := []string{`"before"`, `"during"`, `"after"`}; !slices.Equal(payloads, want) {
			t.Fatalf("%s: got %q, want %q", queue(i), payloads, want)
		}
		for j := 1; j < len(got); j++ {
			if got[j].Offset != got[j-1].Offset+1 {
				t.Fatalf("%s: offsets %d then %d", queue(i), got[j-1].Offset, got[j].Offset)
			}
		}
		if s := p.c.State(); s != client.Connected {
			t.Fatalf("%s: client %v", queue(i), s)
		}
	}
}
