package clusterauth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"
)

func signed(t *testing.T, body string, key []byte, at time.Time) *http.Request {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/v1/handoff", nil)
	if err := Sign(req, []byte(body), key, at); err != nil {
		t.Fatal(err)
	}
	return req
}

func TestVerify(t *testing.T) {
	now := time.Unix(1_735_830_245, 0)
	old, cur := []byte("old-key"), []byte("current-key")
	v, err := NewVerifier([][]byte{cur, old}, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	body := `{"bucket":3}`
	if err := v.Verify(signed(t, body, cur, now), []byte(body), now); err != nil {
		t.Fatalf("good request: %v", err)
	}
	if err := v.Verify(signed(t, body, old, now.Add(-20*time.Second)), []byte(body), now); err != nil {
		t.Fatalf("second key, 20 s old: %v", err)
	}

	replay := signed(t, body, cur, now)
	if err := v.Verify(replay, []byte(body), now); err != nil {
		t.Fatal(err)
	}
	if err := v.Verify(replay, []byte(body), now.Add(time.Second)); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay: %v", err)
	}

	moved := signed(t, body, cur, now)
	moved.URL.Path = "/v1/nodes/qn-1/drain"
	for name, c := range map[string]struct {
		req  *http.Request
		body string
		want error
	}{
		"unsigned":        {httptest.NewRequest(http.MethodPost, "/v1/handoff", nil), body, ErrMissing},
		"other key":       {signed(t, body, []byte("stranger"), now), body, ErrInvalid},
		"body altered":    {signed(t, body, cur, now), `{"bucket":4}`, ErrInvalid},
		"path altered":    {moved, body, ErrInvalid},
		"too old":         {signed(t, body, cur, now.Add(-31*time.Second)), body, ErrStale},
		"from the future": {signed(t, body, cur, now.Add(31*time.Second)), body, ErrStale},
	} {
		if err := v.Verify(c.req, []byte(c.body), now); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
	}
	bad := httptest.NewRequest(http.MethodPost, "/v1/handoff", nil)
	bad.Header.Set(Header, "v1 t=1,n=zz,s=00")
	if err := v.Verify(bad, nil, now); !errors.Is(err, ErrInvalid) {
		t.Errorf("malformed: %v", err)
	}
}

// TestNoncesBounded: the nonce memory stays within MaxNonces; expired
// nonces make room, and while none has expired requests are refused.
func TestNoncesBounded(t *testing.T) {
	now := time.Unix(1_735_830_245, 0)
	key := []byte("k")
	v, _ := NewVerifier([][]byte{key}, time.Second)
	for i := range MaxNonces {
		v.seen[strconv.Itoa(i)] = now.Add(time.Second)
	}
	if err := v.Verify(signed(t, "", key, now), nil, now); !errors.Is(err, ErrBusy) {
		t.Fatalf("full: %v", err)
	}
	later := now.Add(2 * time.Second)
	if err := v.Verify(signed(t, "", key, later), nil, later); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
	if len(v.seen) != 1 {
		t.Fatalf("%d nonces kept", len(v.seen))
	}
}
