package gateway_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestSignedKick: a kick one gateway passes on is signed with the key, which
// never travels; the receiving gateway takes only a fresh, matching, local
// kick with it.
func TestSignedKick(t *testing.T) {
	d := startRPC(t, nil)
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
		{"not kick", "publish", `{"queue":"/room/1","mount":"chat","data":1}`, signed(`{"queue":"/room/1","mount":"chat","data":1}`, testAPIKey, now), 403, "FORBIDDEN"},
		{"garbage", "kick", local, http.Header{"Authorization": {"IMQ-Kick id=zz"}}, 401, "UNAUTHORIZED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, tc.method, "", tc.body, tc.header)
			expectRPCError(t, a, tc.status, tc.code)
		})
	}
	body := `{"user":"target","reason":"signed","local":true}`
	a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, "kick", "", body, signed(body, testAPIKey, now))
	if a.status != http.StatusOK {
		t.Fatalf("a good signed kick: %v", a)
	}
	if g := c.expectGoodbye(imqpb.Reason_REASON_KICKED); g.GetMessage() != "signed" || g.GetReconnect() {
		t.Fatalf("goodbye %v", g)
	}
}
