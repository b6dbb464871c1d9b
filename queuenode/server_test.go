package queuenode

import (
	"strings"
	"testing"

	imqpb "github.com/imq-dev/imq/proto"
)

// TestOwnedState: under an OwnedState prefix a client writes (and deletes)
// only its own key and keys under "<user>/", on queues with or without
// call-outs (refused before the backend is asked); the backend writes any
// key; elsewhere any client writes any key.
func TestOwnedState(t *testing.T) {
	b := newBackend(t, nil)
	s := startCalloutNode(t, b.srv.URL, func(c *Config) {
		c.OwnedState = []string{"/game/", "/room/owned/"}
	})
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for _, q := range []string{"/game/1", "/room/owned/1"} {
		l.ok(userSetState("alice", q, "eq", "alice", `1`, false))
		l.ok(userSetState("alice", q, "eq", "alice/sword", `1`, false))
		l.ok(userSetState("alice", q, "eq", "alice/sword", ``, true))
		calls := len(b.callsTo("set_state"))
		for _, key := range []string{"bob", "bob/sword", "alice2", "alicex/y", "x/alice", "ALICE"} {
			for _, del := range []bool{false, true} {
				r := l.do(userSetState("alice", q, "eq", key, `2`, del))
				if r.GetCode() != imqpb.Code_FORBIDDEN || !strings.Contains(r.GetMessage(), "belongs to another user") {
					t.Fatalf("alice writing %q of %s (delete %v): %v %q, want FORBIDDEN", key, q, del, r.GetCode(), r.GetMessage())
				}
			}
		}
		if n := len(b.callsTo("set_state")); n != calls {
			t.Fatalf("the backend was asked about %d refused writes", n-calls)
		}
		// The backend writes anyone's key; alice still cannot delete it.
		l.ok(backendSetState(q, "eq", "bob", `3`, false))
		if r := l.do(userSetState("alice", q, "eq", "bob", ``, true)); r.GetCode() != imqpb.Code_FORBIDDEN {
			t.Fatalf("alice deleting bob's key: %v", r.GetCode())
		}
		var keys []string
		for _, e := range l.ok(getStateReq(q, "eq")).GetState().GetEntries() {
			keys = append(keys, e.GetKey()+"="+string(e.GetValue()))
		}
		if got := strings.Join(keys, " "); got != "alice=1 bob=3" {
			t.Fatalf("state of %s: %s, want alice=1 bob=3", q, got)
		}
	}
	// Outside the prefixes, keys are anyone's.
	l.ok(userSetState("alice", "/room/2", "eq", "bob", `1`, false))
	l.ok(userSetState("alice", "/lobby/1", "eq", "bob", `1`, false))

	cfg := DefaultConfig()
	cfg.OwnedState = []string{"game/"}
	if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), "owned-state") {
		t.Fatalf("a bad owned-state prefix: %v", err)
	}
}
