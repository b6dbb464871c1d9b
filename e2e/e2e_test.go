package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

func dialClient(t *testing.T, url, user string, opts ...client.Option) *client.Client {
	t.Helper()
	opts = append([]client.Option{client.WithUser(user), client.WithBackoff(20*time.Millisecond, 200*time.Millisecond)}, opts...)
	c, err := client.Dial(testutil.Context(t, 10*time.Second), url, opts...)
	if err != nil {
		t.Fatalf("dial as %s: %v", user, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// collect gathers a subscription's updates until stop is closed.
type collector struct {
	mu      sync.Mutex
	updates []client.Update
}

func collect(sub *client.Subscription) *collector {
	col := &collector{}
	go func() {
		for u := range sub.Updates() {
			col.mu.Lock()
			col.updates = append(col.updates, u)
			col.mu.Unlock()
		}
	}()
	return col
}

func (col *collector) snapshot() []client.Update {
	col.mu.Lock()
	defer col.mu.Unlock()
	return slices.Clone(col.updates)
}

func (col *collector) events() []client.Update {
	var out []client.Update
	for _, u := range col.snapshot() {
		if u.Kind == client.KindEvent {
			out = append(out, u)
		}
	}
	return out
}

// TestRoomAcrossProcesses: several clients, on both subprotocols, chat and
// update state in one room; everyone sees the same order and the same state.
func TestRoomAcrossProcesses(t *testing.T) {
	cl := startCluster(t)
	const room, perClient = "/room/e2e", 25
	users := []string{"ann", "ben", "cat", "dan"}
	clients := make([]*client.Client, len(users))
	cols := make([]*collector, len(users))
	subs := make([]*client.Subscription, len(users))
	for i, u := range users {
		var opts []client.Option
		if i%2 == 1 {
			opts = append(opts, client.WithJSON())
		}
		clients[i] = dialClient(t, cl.url(), u, opts...)
		sub, err := clients[i].Join(testutil.Context(t, 5*time.Second), room, client.Messages("chat"), client.State("scores"))
		if err != nil {
			t.Fatal(err)
		}
		subs[i] = sub
		cols[i] = collect(sub)
	}
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < perClient; n++ {
				if _, err := c.Publish(context.Background(), room, "chat", []byte(fmt.Sprintf(`{"from":%q,"n":%d}`, users[i], n))); err != nil {
					t.Error(err)
					return
				}
				if _, err := c.SetState(context.Background(), room, "scores", users[i], []byte(fmt.Sprint(n))); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := len(users) * perClient
	// Each client published want/len(users) events and as many state changes.
	testutil.WaitFor(t, 10*time.Second, "every client to see every update", func() bool {
		for _, col := range cols {
			if len(col.snapshot()) < 2*want {
				return false
			}
		}
		return true
	})
	ref := cols[0].snapshot()
	for i, col := range cols {
		got := col.snapshot()
		if len(got) != len(ref) {
			t.Fatalf("%s saw %d updates, %s saw %d", users[i], len(got), users[0], len(ref))
		}
		for j := range got {
			if got[j].Offset != ref[j].Offset || got[j].Kind != ref[j].Kind || string(got[j].Payload) != string(ref[j].Payload) {
				t.Fatalf("%s's update %d is %v, %s's is %v", users[i], j, got[j], users[0], ref[j])
			}
		}
		for k := 1; k < len(got); k++ {
			if got[k].Offset <= got[k-1].Offset {
				t.Fatalf("%s: offset %d after %d", users[i], got[k].Offset, got[k-1].Offset)
			}
		}
		state := subs[i].State("scores")
		for _, u := range users {
			if string(state[u]) != fmt.Sprint(perClient-1) {
				t.Fatalf("%s sees %s's score %q, want %d", users[i], u, state[u], perClient-1)
			}
		}
	}
}

// TestGatewayKilledClientResumes: a client's gateway is SIGKILLed under
// traffic and restarted; the client reconnects and resumes, and sees every
// message exactly once and in order.
func TestGatewayKilledClientResumes(t *testing.T) {
	cl := startCluster(t)
	// The publisher uses a second gateway, which stays up.
	pubURL := wsURL(cl.startGateway("gateway-2", nil))

	const room = "/room/resume"
	recv := dialClient(t, cl.url(), "receiver")
	sub, err := recv.Join(testutil.Context(t, 5*time.Second), room, client.Messages("chat"))
	if err != nil {
		t.Fatal(err)
	}
	col := collect(sub)
	pub := dialClient(t, pubURL, "publisher")

	var offsets []uint64
	publish := func(n int) {
		for i := 0; i < n; i++ {
			off, err := pub.Publish(testutil.Context(t, 5*time.Second), room, "chat", []byte(fmt.Sprint(len(offsets))))
			if err != nil {
				t.Fatal(err)
			}
			offsets = append(offsets, off)
			time.Sleep(2 * time.Millisecond)
		}
	}
	publish(50)
	cl.killGateway()
	publish(100) // while the receiver's gateway is dead
	cl.restartGateway()
	publish(50)

	testutil.WaitFor(t, 15*time.Second, "the receiver to catch up", func() bool { return len(col.events()) >= len(offsets) })
	time.Sleep(100 * time.Millisecond) // anything extra would show up now
	var got []uint64
	for _, u := range col.snapshot() {
		switch u.Kind {
		case client.KindEvent:
			got = append(got, u.Offset)
		case client.KindGap, client.KindClosed:
			t.Fatalf("unexpected %s update: %s", u.Kind, u.Message)
		}
	}
	if !slices.Equal(got, offsets) {
		t.Fatalf("receiver saw %d events %v,\nwant %d %v", len(got), got, len(offsets), offsets)
	}
}

// TestGatewaySIGTERM: `imq gateway --shutdown-spread 1s` told to stop says
// goodbye (SHUTDOWN, reconnect) to each of its clients, spread over about the
// second rather than in one instant, and exits 0 within the spread and a
// margin.
func TestGatewaySIGTERM(t *testing.T) {
	const spread, clients = time.Second, 10
	cl := startCluster(t, "--shutdown-spread", spread.String())
	var conns []*websocket.Conn
	for i := range clients {
		ws, _, err := (&websocket.Dialer{Subprotocols: []string{"imq.v1"}}).Dial(cl.url()+fmt.Sprintf("?user=term%d", i), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		conns = append(conns, ws)
	}
	start := time.Now()
	exited := make(chan time.Duration, 1)
	go func() { // ends when the gateway has exited (or was killed after 15 s)
		cl.gw.Stop(syscall.SIGTERM, 15*time.Second)
		exited <- time.Since(start)
	}()
	arrived := make([]time.Time, clients)
	for _, ws := range conns {
		ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i, ws := range conns {
		wg.Go(func() {
			for {
				_, b, err := ws.ReadMessage()
				if err != nil {
					errs <- fmt.Errorf("client %d: connection ended without a goodbye: %w", i, err)
					return
				}
				var m imqpb.ServerMessage
				if err := proto.Unmarshal(b, &m); err != nil {
					errs <- err
					return
				}
				if g := m.GetGoodbye(); g != nil {
					arrived[i] = time.Now()
					if g.GetReason() != imqpb.Reason_REASON_SHUTDOWN || !g.GetReconnect() {
						errs <- fmt.Errorf("client %d: goodbye %v", i, g)
					}
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	took := <-exited
	if code := cl.gw.ExitCode(); code != 0 {
		t.Fatalf("gateway exited with %d after SIGTERM", code)
	}
	if took > spread+5*time.Second {
		t.Errorf("the gateway took %v to exit after SIGTERM; want about the spread, %v", took, spread)
	}
	first, last := slices.MinFunc(arrived, time.Time.Compare), slices.MaxFunc(arrived, time.Time.Compare)
	// The last goodbye is due at 9/10 of the spread; at once they would
	// arrive within milliseconds.
	if d := last.Sub(first); d < spread/2 {
		t.Errorf("the goodbyes arrived within %v of one another; want them spread over about %v", d, spread)
	}
}

// TestTokenRefusedOnReconnect: a client whose token the restarted gateway
// refuses closes for good, and every subscription ends with KindClosed.
func TestTokenRefusedOnReconnect(t *testing.T) {
	cl := startCluster(t)
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{Subject: "eve", ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour))}).SignedString([]byte(e2eSecret))
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Dial(testutil.Context(t, 10*time.Second), cl.url(), client.WithToken(tok),
		client.WithBackoff(20*time.Millisecond, 200*time.Millisecond), client.WithBufferSize(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var subs []*client.Subscription
	for _, q := range []string{"/room/a", "/room/b"} {
		sub, err := c.Join(testutil.Context(t, 5*time.Second), q, client.Messages("chat"))
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub)
	}
	// Fill the first subscription's one-slot channel and never read it.
	if _, err := c.Publish(testutil.Context(t, 5*time.Second), "/room/a", "chat", []byte("unread")); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, "the first channel to fill", func() bool { return len(subs[0].Updates()) == 1 })

	addr := cl.gw.Addr("http")
	cl.killGateway()
	cl.gw = cl.startGateway("gateway-new-secret", []string{"IMQ_JWT_SECRET=a-different-secret-0123456789"}, "--addr", addr)

	// Read only the second subscription: the first one's unread channel
	// must not hold up the second's last update.
	var last client.Update
	timeout := time.After(10 * time.Second)
	for open := true; open; {
		select {
		case u, ok := <-subs[1].Updates():
			if ok {
				last = u
			}
			open = ok
		case <-timeout:
			t.Fatal("the subscription did not end")
		}
	}
	if last.Kind != client.KindClosed || last.Reason != imqpb.Reason_REASON_AUTH_FAILED && !strings.Contains(last.Message, "UNAUTHORIZED") {
		t.Fatalf("last update %+v, want KindClosed for the refused token", last)
	}
	var e *client.Error
	if !errors.As(c.Err(), &e) || e.Code != imqpb.Code_UNAUTHORIZED {
		t.Fatalf("client error %v, want UNAUTHORIZED", c.Err())
	}
}
