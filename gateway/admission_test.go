package gateway_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
)

// fromIP dials from source address ip (any of 127.0.0.0/8 reaches a
// gateway on 127.0.0.1), so one test can play several hosts.
func fromIP(ip string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	return d.DialContext
}

// dialFrom opens a WebSocket to d from ip, with ?query; it returns the
// handshake's answer when refused.
func dialFrom(t testing.TB, d *launch.Dev, ip, query string) (*rawClient, *http.Response, error) {
	t.Helper()
	dialer := websocket.Dialer{Subprotocols: []string{gateway.SubprotocolBinary}, HandshakeTimeout: 5 * time.Second, NetDialContext: fromIP(ip)}
	ws, resp, err := dialer.Dial(d.URL()+query, nil)
	if err != nil {
		return nil, resp, err
	}
	t.Cleanup(func() { ws.Close() })
	return &rawClient{t: t, ws: ws}, resp, nil
}

// openTCP opens n TCP connections from ip to gw, each sending send (which
// may be empty), and sorts them by the gateway's answer: codes[i] is the
// HTTP status connection i was answered, 0 if it is held open (pending,
// as the gateway's own count says), -1 if it was closed unanswered. It
// waits for every connection to be one or the other, however slow the
// gateway: silence within a moment proves nothing on a busy machine.
func openTCP(t testing.TB, gw *gateway.Server, ip string, n int, send string) []int {
	t.Helper()
	before := gw.PendingFrom(ip)
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := fromIP(ip)(context.Background(), "tcp", gw.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetReadDeadline(time.Now().Add(time.Minute)) // before the readers start: the deadline that stops them must come after
		if send != "" {
			io.WriteString(c, send) // a refused connection may be reset: no matter
		}
		conns[i] = c
	}
	codes := make([]int, n)
	var answered atomic.Int64
	var stopping atomic.Bool
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() { // ends at an answer, a close, or the read deadline set below
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			switch {
			case err == nil:
				resp.Body.Close()
				codes[i] = resp.StatusCode
			case stopping.Load():
				return // held: codes[i] stays 0
			default:
				codes[i] = -1
			}
			answered.Add(1)
		})
	}
	testutil.WaitFor(t, 30*time.Second, "every connection answered or pending", func() bool {
		return int(answered.Load())+gw.PendingFrom(ip)-before == n
	})
	stopping.Store(true)
	for _, c := range conns {
		c.SetReadDeadline(time.Now()) // the held ones' readers return
	}
	wg.Wait()
	return codes
}

// TestSilentSocketFlood: at a low --max-connections, a flood of sockets
// that never authenticate (raw TCP that sends nothing, and WebSockets that
// never send connect) from one host does not keep a real client out: it
// gets in at once, long before the auth timeout would free a place.
func TestSilentSocketFlood(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.MaxConnections, c.MaxPending, c.MaxPendingPerIP = 20, 10, 4
		c.AuthTimeout = time.Minute
	})
	const attacker = "127.0.0.2"
	// Two WebSockets that never authenticate take two of the attacker's
	// four pending places...
	for range 2 {
		if _, _, err := dialFrom(t, d, attacker, ""); err != nil {
			t.Fatalf("silent WebSocket: %v", err)
		}
	}
	// ...silent TCP sockets the other two; of 100 (more than every place
	// the gateway has: 20 + 10 + 64 for /metrics) the rest are answered 429
	// at once rather than held.
	held, refused := 0, 0
	for _, code := range openTCP(t, d.Gateway, attacker, 100, "") {
		switch code {
		case 0:
			held++
		case http.StatusTooManyRequests:
			refused++
		}
	}

	// The real client, from another address, gets in at once.
	start := time.Now()
	c, _, err := dialFrom(t, d, "127.0.0.1", "")
	if err != nil {
		t.Fatalf("a real client was refused during the flood: %v", err)
	}
	r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "real", time.Now().Add(time.Hour))}}})
	expectCode(t, r, imqpb.Code_OK)
	expectCode(t, c.join("/room/flood", chat()), imqpb.Code_OK)
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("the real client took %s to get in", el)
	}
	if held != 2 || refused != 98 || d.Gateway.PendingFrom(attacker) != 4 {
		t.Fatalf("of 100 silent sockets %d were held and %d answered 429, %d pending from the attacker; want 2, 98 and 4", held, refused, d.Gateway.PendingFrom(attacker))
	}
	// A further WebSocket from the attacker is refused at the handshake.
	if _, resp, err := dialFrom(t, d, attacker, ""); err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("a fifth pending connection from one address: err %v, resp %v; want 429", err, resp)
	}
	if n := d.Gateway.Refused("pending_ip"); n < 99 {
		t.Fatalf("refused{pending_ip} = %v, want at least 99", n)
	}
	// Each refusal counts once, in refused_total{reason}: not again in
	// connections_total.
	for _, r := range []string{"full", "refused", "limit_exceeded"} {
		if n := d.Gateway.Accepted(r); n != 0 {
			t.Fatalf("connections_total{result=%q} = %v; refusals count in refused_total only", r, n)
		}
	}

	// Hosts enough to fill the pending pool in total: the next connection,
	// from any host, takes the place of the oldest pending one (the first
	// silent WebSocket); the authenticated ones go on.
	for ip, n := range map[string]int{"127.0.0.3": 4, "127.0.0.4": 2} {
		for range n {
			if _, _, err := dialFrom(t, d, ip, ""); err != nil {
				t.Fatalf("silent WebSocket from %s: %v", ip, err)
			}
		}
	}
	// 4 from the first attacker, 4 + 2 more: 10 pending, the cap.
	late, _, err := dialFrom(t, d, "127.0.0.5", "")
	if err != nil {
		t.Fatalf("past --max-pending: %v; want the oldest pending evicted instead", err)
	}
	expectCode(t, late.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "late", time.Now().Add(time.Hour))}}}), imqpb.Code_OK)
	if d.Gateway.Refused("pending_evicted") < 1 {
		t.Fatal("refused{pending_evicted} not counted")
	}
	expectCode(t, c.publish("/room/flood", "chat", []byte("still here")), imqpb.Code_OK)
}

// TestAuthFailureRateLimit: a host sending bad tokens spends its budget and
// is refused 429 at the handshake; another host still gets in.
func TestAuthFailureRateLimit(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.AuthFailuresPerIP = 5
	})
	const attacker = "127.0.0.6"
	for i := range 5 {
		c, _, err := dialFrom(t, d, attacker, "")
		if err != nil {
			t.Fatalf("attempt %d refused before the budget was spent: %v", i+1, err)
		}
		r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "guess"}}})
		expectCode(t, r, imqpb.Code_UNAUTHORIZED)
	}
	_, resp, err := dialFrom(t, d, attacker, "")
	if err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("sixth attempt after 5 failures: err %v, resp %v; want 429", err, resp)
	}
	if n := d.Gateway.Refused("auth_failures"); n != 1 {
		t.Fatalf("refused{auth_failures} = %v, want 1", n)
	}
	c, _, err := dialFrom(t, d, "127.0.0.1", "")
	if err != nil {
		t.Fatalf("another host was refused: %v", err)
	}
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "ok", time.Now().Add(time.Hour))}}}), imqpb.Code_OK)
}

// TestIdleKeyHoldersKeepTheirHostIn: an admin backend's keep-alive RPC
// connections, each past its key and idle between calls, do not count
// against the host's pending cap: more of them than the cap stay open, and
// a WebSocket client from the same host still gets in.
func TestIdleKeyHoldersKeepTheirHostIn(t *testing.T) {
	const perIP, n, host = 8, 12, "127.0.0.11"
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Gateway.MaxPendingPerIP, c.Gateway.MaxPending = perIP, 100
	})
	for i := range n { // a transport each: n distinct keep-alive connections
		tr := &http.Transport{DialContext: fromIP(host)}
		t.Cleanup(tr.CloseIdleConnections)
		req, err := http.NewRequest(http.MethodPost, "http://"+d.Gateway.Addr()+gateway.RPCPath+"publish",
			strings.NewReader(`{"queue":"/room/x","mount":"chat","data":1}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatalf("call %d of %d: %v", i+1, n, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("call %d of %d from one host on its own keep-alive connection (cap %d pending per host): %d; want 200", i+1, n, perIP, resp.StatusCode)
		}
	}
	// Idle, they are pending in the total (the first evicted), not per host.
	// (The total may hold another: the readiness probe's.)
	testutil.WaitFor(t, 10*time.Second, "n pending connections", func() bool { return d.Gateway.Pending() >= n })
	if got := d.Gateway.PendingFrom(host); got != 0 {
		t.Fatalf("%d pending from the host with %d idle key holders' connections; want 0", got, n)
	}
	c, resp, err := dialFrom(t, d, host, "")
	if err != nil {
		t.Fatalf("WebSocket from a host with %d idle key holders' connections: %v (%v)", n, err, resp)
	}
	if code := c.reply(c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "alice", time.Now().Add(time.Hour))}}})).GetCode(); code != imqpb.Code_OK {
		t.Fatalf("connect: %v; want OK", code)
	}
}
