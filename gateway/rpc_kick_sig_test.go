package gateway_test

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestSignedKick: a kick one gateway passes on is signed with the key, which
// never travels; the receiving gateway takes only a fresh, matching, local
// kick with it, on its internal listener only, and only once.
func TestSignedKick(t *testing.T) {
	d := startRPC(t, nil)
	internal := d.Gateway.InternalAddr()
	c := mustDial(t, d, "target", false)
	signed := func(body string, secret string, at time.Time) http.Header {
		return http.Header{"Authorization": {gateway.SignKick(secret, []byte(body), at)}}
	}
	local := `{"user":"someone","reason":"r","local":true}`
	now := time.Now()
	for _, tc := range []struct {
		name, method, body string
		header             http.Header
		status             int
		code               string
	}{
		{"other key", "kick", local, signed(local, "not-a-key-of-this-gateway", now), 401, "UNAUTHORIZED"},
		{"stale", "kick", local, signed(local, testAPIKey, now.Add(-2*time.Minute)), 401, "UNAUTHORIZED"},
		{"body changed", "kick", `{"user":"other","local":true}`, signed(local, testAPIKey, now), 401, "UNAUTHORIZED"},
		{"not local", "kick", `{"user":"someone"}`, signed(`{"user":"someone"}`, testAPIKey, now), 403, "FORBIDDEN"},
		{"garbage", "kick", local, http.Header{"Authorization": {"IMQ-Kick id=zz"}}, 401, "UNAUTHORIZED"},
		{"too large", "kick", strings.Repeat(" ", 5000) + local, signed(strings.Repeat(" ", 5000)+local, testAPIKey, now), 413, "PAYLOAD_TOO_LARGE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := rpcDo(t, internal, http.MethodPost, tc.method, "", tc.body, tc.header)
			expectRPCError(t, a, tc.status, tc.code)
		})
	}
	// An unknown key id and a bad signature get the same answer: which key
	// ids exist is not told.
	unknown := rpcDo(t, internal, http.MethodPost, "kick", "", local, signed(local, "not-a-key-of-this-gateway", now))
	badMAC := rpcDo(t, internal, http.MethodPost, "kick", "", `{"user":"x","local":true}`, signed(local, testAPIKey, now))
	if unknown.status != badMAC.status || string(unknown.body) != string(badMAC.body) {
		t.Fatalf("unknown key id answered %v, bad signature %v: an oracle", unknown, badMAC)
	}

	body := `{"user":"target","reason":"signed","local":true}`
	good := signed(body, testAPIKey, now)
	// On the client port a signature is no credential.
	a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, "kick", "", body, good)
	expectRPCError(t, a, 401, "UNAUTHORIZED")
	a = rpcDo(t, internal, http.MethodPost, "kick", "", body, good)
	if a.status != http.StatusOK {
		t.Fatalf("a good signed kick: %v", a)
	}
	if g := c.expectGoodbye(imqpb.Reason_REASON_KICKED); g.GetMessage() != "signed" || g.GetReconnect() {
		t.Fatalf("goodbye %v", g)
	}
	// Played again within its freshness, it is refused.
	a = rpcDo(t, internal, http.MethodPost, "kick", "", body, good)
	expectRPCError(t, a, 401, "UNAUTHORIZED")
	// The same kick signed again (another nonce) is taken.
	if a := rpcDo(t, internal, http.MethodPost, "kick", "", body, signed(body, testAPIKey, now)); a.status != http.StatusOK {
		t.Fatalf("the same kick signed anew: %v", a)
	}
}

// TestSignedKickHoldsNoSlotWhileItsBodyArrives: a signed kick whose body
// trickles in (from anyone who knows a key id, which is no secret) takes no
// admin RPC slot before its signature is checked: a backend's call still
// gets the only one.
func TestSignedKickHoldsNoSlotWhileItsBodyArrives(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) { c.Gateway.RPCMaxInflight = 1 })
	body := `{"user":"nobody","local":true}`
	slow, err := net.Dial("tcp", d.Gateway.InternalAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	fmt.Fprintf(slow, "POST %skick HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nContent-Length: %d\r\n\r\n%s",
		gateway.RPCPath, gateway.SignKick(testAPIKey, []byte(body), time.Now()), len(body), body[:5])
	// Its handler is reading the body (holding no slot)...
	testutil.WaitFor(t, 10*time.Second, "one kick read", func() bool { return d.Gateway.KickReads() == 1 })
	// ...while calls get the only slot.
	for i := range 10 {
		if a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, "kick", testAPIKey, body, nil); a.status != http.StatusOK {
			t.Fatalf("call %d, while a signed kick's body trickles in: %v, want 200", i+1, a)
		}
	}
	if d.Gateway.KickReads() != 1 {
		t.Fatal("the signed kick's body was not being read throughout")
	}
}
