package gateway_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
	imqpb "github.com/imq-dev/imq/proto"
)

// Hostile clients, from an outside review: each test is an attack that once
// worked.

// TestUnfinishedRequestsStayPending: one host sends GET /healthz with a body
// it never finishes. Serving a request does not take a connection out of
// the pending pool, so the host holds its --max-pending-per-ip and no more;
// a real client from another host gets in.
func TestUnfinishedRequestsStayPending(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.MaxConnections, c.MaxPending, c.MaxPendingPerIP = 8, 8, 2
	})
	held := 0
	for _, code := range openTCP(t, d.Gateway, "127.0.0.2", 8+8+64+4, // more than the listener admits
		"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nx") {
		if code == 0 {
			held++
		}
	}
	if held > 2 || d.Gateway.PendingFrom("127.0.0.2") != held {
		t.Fatalf("one host holds %d connections with unfinished requests (%d pending); --max-pending-per-ip is 2", held, d.Gateway.PendingFrom("127.0.0.2"))
	}
	c, resp, err := dialFrom(t, d, "127.0.0.3", "?user=legit")
	if err != nil {
		t.Fatalf("a real client from another host is refused (%v) while one host drips bodies: %v", resp, err)
	}
	expectCode(t, c.join("/room/drip", chat()), imqpb.Code_OK)
}

// TestClientPortTimeouts: on the client port a request must arrive within
// the server's read timeout: a dripped body is cut off. A WebSocket,
// hijacked, lives on past the read and write timeouts.
func TestClientPortTimeouts(t *testing.T) {
	const timeout = 300 * time.Millisecond
	d := startDev(t, func(c *gateway.Config) { gateway.SetClientTimeouts(c, timeout, timeout) })
	addr := d.Gateway.Addr()
	ws := mustDial(t, d, "lives", false)
	start := time.Now()
	expectCode(t, ws.join("/room/timeouts", chat()), imqpb.Code_OK)

	// A body dripped a byte at a time: the connection is closed.
	drip, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer drip.Close()
	fmt.Fprintf(drip, "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\nx")
	closed := make(chan struct{})
	go func() { // ends when the server closes the connection, or at the deadline
		defer close(closed)
		drip.SetReadDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, drip)
	}()
	for i := 0; ; i++ {
		select {
		case <-closed:
		case <-time.After(100 * time.Millisecond):
			drip.Write([]byte("x"))
			if i > 50 {
				t.Fatal("a dripped body still held the connection after 5s")
			}
			continue
		}
		break
	}

	// Pipelined requests whose answers are never read: once the socket
	// buffers are full the server's write blocks, and is cut off at the
	// write timeout, which closes the connection.
	testutil.WaitFor(t, 5*time.Second, "no pending connections", func() bool { return d.Gateway.Pending() == 0 })
	pipe, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer pipe.Close()
	pipe.(*net.TCPConn).SetReadBuffer(4096)
	go pipe.Write([]byte(strings.Repeat("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 100000))) // ends when the connection does
	testutil.WaitFor(t, 5*time.Second, "one pending connection", func() bool { return d.Gateway.Pending() == 1 })
	testutil.WaitFor(t, 15*time.Second, "no pending connections", func() bool { return d.Gateway.Pending() == 0 })

	// The WebSocket outlives both timeouts.
	time.Sleep(time.Until(start.Add(2 * timeout)))
	expectCode(t, ws.publish("/room/timeouts", "chat", []byte("still here")), imqpb.Code_OK)
}

// TestMaxHeaderBytes: a handshake with 64 KiB of headers is refused 431,
// not buffered (net/http's default allows 1 MB per pending connection).
func TestMaxHeaderBytes(t *testing.T) {
	d := startDev(t, nil)
	c, err := net.Dial("tcp", d.Gateway.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go fmt.Fprintf(c, "GET /ws?user=a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: imq.v1\r\nX-Big: %s\r\n\r\n", strings.Repeat("a", 64<<10))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("a 64 KiB handshake header is answered %d, want 431", resp.StatusCode)
	}
}

// TestAuthBudgetAcrossConnections: connections upgraded together from one
// address, each sending a bad token, get no more tokens checked than the
// address's failed-auth budget.
func TestAuthBudgetAcrossConnections(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.AuthFailuresPerIP, c.MaxPendingPerIP = 3, 10
	})
	var cs []*rawClient
	for range 10 {
		c, _, err := dialFrom(t, d, "127.0.0.4", "")
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	bad := token(t, []byte("wrong-secret-wrong-secret-000000"), "mallory", time.Now().Add(time.Minute))
	checked, limited := 0, 0
	for _, c := range cs {
		switch r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: bad}}}); r.GetCode() {
		case imqpb.Code_UNAUTHORIZED:
			checked++
		case imqpb.Code_LIMIT_EXCEEDED:
			limited++
		}
	}
	if checked != 3 || limited != 7 {
		t.Fatalf("%d bad tokens checked and %d refused unchecked from one address; the budget is 3 (want 3 and 7)", checked, limited)
	}
	// A good token from another address is unaffected.
	c, _, err := dialFrom(t, d, "127.0.0.5", "")
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "ok", time.Now().Add(time.Hour))}}}), imqpb.Code_OK)
}

// TestPendingFloodFromManyHosts: silent sockets from many addresses, each
// within --max-pending-per-ip, fill --max-pending; a real client still
// connects and authenticates, taking the place of the oldest.
func TestPendingFloodFromManyHosts(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.MaxConnections, c.MaxPending, c.MaxPendingPerIP = 100, 24, 8
		c.AuthTimeout = time.Minute
	})
	for i := range 5 {
		for _, code := range openTCP(t, d.Gateway, fmt.Sprintf("127.0.1.%d", i+1), 8, "") {
			if code != 0 {
				t.Fatalf("a silent socket within the per-address cap was answered %d", code)
			}
		}
	}
	c, _, err := dialFrom(t, d, "127.0.2.1", "")
	if err != nil {
		t.Fatalf("a real client was refused during the flood: %v", err)
	}
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "real", time.Now().Add(time.Hour))}}}), imqpb.Code_OK)
	if n := d.Gateway.Refused("pending_evicted"); n < 17 {
		t.Fatalf("refused{pending_evicted} = %v; want at least 17 (40 silent sockets and the client, 24 places)", n)
	}
}

// TestRefusalIsRead: a connection refused at accept (past
// --max-pending-per-ip) that is still sending its request can finish and
// read the 429: the gateway half-closes and drains it rather than closing
// with the request unread, which resets the connection (the client's next
// write fails, and the answer may be discarded).
func TestRefusalIsRead(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) { c.MaxPendingPerIP = 1 })
	addr := d.Gateway.Addr()
	if codes := openTCP(t, d.Gateway, "127.0.0.7", 1, ""); codes[0] != 0 { // takes the address's one place
		t.Fatalf("the address's first connection was answered %d", codes[0])
	}
	head := "POST /rpc/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
	for i := range 5 {
		c, err := fromIP("127.0.0.7")(t.Context(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, head+strings.Repeat("x", 10000))
		// The client sends its body in two parts, the refusal arriving
		// between them: its first byte is waited for (not consumed).
		br := bufio.NewReader(c)
		if _, err := br.Peek(1); err != nil {
			t.Fatalf("attempt %d: no refusal: %v", i+1, err)
		}
		if _, err := io.WriteString(c, strings.Repeat("x", 10000)); err != nil {
			t.Fatalf("attempt %d: the rest of the request could not be sent: %v", i+1, err)
		}
		resp, err := http.ReadResponse(br, nil)
		c.Close()
		if err != nil {
			t.Fatalf("attempt %d: the refusal was lost: %v", i+1, err)
		}
		if resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("attempt %d: %d, want 429", i+1, resp.StatusCode)
		}
	}
}

// TestRefusalsAreLogged: a failed authentication and a refusal are logged
// as warnings with the source address (never the token), at most one per
// reason per 10 s however many there are.
func TestRefusalsAreLogged(t *testing.T) {
	logger, logs := testutil.CaptureLogs(slog.LevelWarn)
	d := launchtest.StartDev(t, func(c *launch.DevConfig) {
		c.Logger = logger
		c.Gateway.JWTSecret = testSecret
		c.Gateway.AuthFailuresPerIP, c.Gateway.MaxPendingPerIP = 3, 10
	})
	const guess = "not-a-token-but-maybe-a-secret"
	var cs []*rawClient
	for range 5 {
		c, _, err := dialFrom(t, d, "127.0.0.8", "")
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	for _, c := range cs {
		c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: guess}}})
	}
	if _, _, err := dialFrom(t, d, "127.0.0.8", ""); err == nil { // a third refusal, at the handshake
		t.Fatal("a connection upgraded with the budget spent")
	}
	out := logs.String()
	if n := strings.Count(out, `msg="connect refused"`); n != 1 {
		t.Fatalf("%d warnings of 3 failed authentications, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, `msg="connection refused"`); n != 1 {
		t.Fatalf("%d warnings of 3 refusals for the spent budget, want 1:\n%s", n, out)
	}
	if !strings.Contains(out, "source=127.0.0.8/32") {
		t.Fatalf("the warnings do not name the source:\n%s", out)
	}
	if strings.Contains(out, guess) {
		t.Fatalf("a warning repeats the token:\n%s", out)
	}
}

// TestRPCKeyGuessesAreLimited: wrong API keys on the admin RPC spend the
// address's failed-auth budget like bad connect tokens; past it every call
// from that address is answered 429 before its key is looked at, and
// another address is unaffected.
func TestRPCKeyGuessesAreLimited(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) { c.Gateway.AuthFailuresPerIP = 3 })
	addr := d.Gateway.Addr()
	body := `{"user":"nobody"}`
	for i := range 3 {
		a := rpcDo(t, addr, http.MethodPost, "kick", "guess-"+fmt.Sprint(i), body, nil)
		expectRPCError(t, a, http.StatusUnauthorized, "UNAUTHORIZED")
	}
	expectRPCError(t, rpcDo(t, addr, http.MethodPost, "kick", "guess-4", body, nil), http.StatusTooManyRequests, "LIMIT_EXCEEDED")
	// The right key is not even tried: a guess that happens to be right
	// tells nothing.
	expectRPCError(t, rpcDo(t, addr, http.MethodPost, "kick", testAPIKey, body, nil), http.StatusTooManyRequests, "LIMIT_EXCEEDED")
	if n := d.Gateway.Refused("auth_failures"); n != 2 {
		t.Fatalf("refused{auth_failures} = %v, want 2", n)
	}
	other := &http.Client{Transport: &http.Transport{DialContext: fromIP("127.0.0.2")}}
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+gateway.RPCPath+"kick", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := other.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	other.CloseIdleConnections()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the right key from another address: %d, want 200", resp.StatusCode)
	}
}

// TestShutdownWaitsForDrains: a connection refused at accept is drained on
// a goroutine of its own (so the client reads the refusal); Shutdown waits
// for those goroutines rather than leaving them behind.
func TestShutdownWaitsForDrains(t *testing.T) {
	cfg := launch.LocalDevConfig()
	cfg.Gateway.MaxPendingPerIP = 1
	d, err := launch.StartDev(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	addr := d.Gateway.Addr()
	held, err := net.Dial("tcp", addr) // takes the address's one pending place
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	testutil.WaitFor(t, 5*time.Second, "one pending connection", func() bool { return d.Gateway.Pending() == 1 })
	refused, err := net.Dial("tcp", addr) // refused and drained: it sends nothing, so its drain lasts
	if err != nil {
		t.Fatal(err)
	}
	defer refused.Close()
	testutil.WaitFor(t, 5*time.Second, "one drain", func() bool { return d.Gateway.Drains() == 1 })
	// The held one goes, so that nothing else holds Shutdown up.
	held.Close()
	testutil.WaitFor(t, 5*time.Second, "no pending connections", func() bool { return d.Gateway.Pending() == 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if n := d.Gateway.Drains(); n != 0 {
		t.Fatalf("%d refused connections still being drained after Shutdown", n)
	}
}

// TestFailedAuthLogIsBounded: a token's error message can carry the
// client's own text (an aud of kilobytes); the warning cuts it short.
func TestFailedAuthLogIsBounded(t *testing.T) {
	logger, logs := testutil.CaptureLogs(slog.LevelWarn)
	d := launchtest.StartDev(t, func(c *launch.DevConfig) {
		c.Logger = logger
		c.Gateway.JWTSecret = testSecret
	})
	aud := strings.Repeat("A", 8000)
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Subject: "mallory", Audience: jwt.ClaimStrings{aud}, ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour)),
	}).SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	c, _, err := dialFrom(t, d, "127.0.0.10", "")
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: tok}}}), imqpb.Code_UNAUTHORIZED)
	out := logs.String()
	if !strings.Contains(out, `msg="connect refused"`) {
		t.Fatalf("no warning of the failed authentication:\n%s", out)
	}
	if strings.Contains(out, strings.Repeat("A", 300)) {
		t.Fatalf("the warning repeats %d bytes of the client's text", strings.Count(out, "A"))
	}
}
