package client

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// refusingServer answers every WebSocket upgrade with status and body, as
// the gateway refuses a connection over its admission limits.
func refusingServer(t *testing.T, status int, body string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

// TestHandshakeRefusalExplained: a refused upgrade's error carries the
// JSON body's code and message, so that a 429 says which limit was hit.
func TestHandshakeRefusalExplained(t *testing.T) {
	url := refusingServer(t, http.StatusTooManyRequests,
		`{"error":{"code":"LIMIT_EXCEEDED","message":"too many unauthenticated connections from your address; authenticate or close them","retryable":true}}`+"\n")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // room for the one answer on a busy machine
	defer cancel()
	_, err := Dial(ctx, url, WithUser("u"), WithBackoff(time.Minute, time.Minute)) // one attempt: the wait for a second outlasts ctx
	if err == nil {
		t.Fatal("Dial succeeded against a refusing server")
	}
	for _, want := range []string{"429", "LIMIT_EXCEEDED", "too many unauthenticated connections from your address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestHandshakeUnauthorizedExplained: a 401 stays a final *Error, now with
// the server's reason.
func TestHandshakeUnauthorizedExplained(t *testing.T) {
	url := refusingServer(t, http.StatusUnauthorized, `{"error":{"code":"UNAUTHORIZED","message":"token expired"}}`)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Dial(ctx, url, WithUser("u"))
	var e *Error
	if !errors.As(err, &e) || e.Code != imqpb.Code_UNAUTHORIZED || !strings.Contains(e.Message, "token expired") {
		t.Fatalf("Dial error = %v, want UNAUTHORIZED saying token expired", err)
	}
}

// TestHandshakeRefusalBodyBounded: a body that is not the gateway's JSON,
// or too long, or with control characters, does not end up in the error
// as is.
func TestHandshakeRefusalBodyBounded(t *testing.T) {
	for _, tc := range []struct{ body, want, notWant string }{
		{"<html>nope</html>", "503 Service Unavailable", "nope"},
		{`{"error":{"code":"X","message":"a` + strings.Repeat("b", 4000) + `"}}`, "503 Service Unavailable", ""}, // past 1 KiB: not parsed
		{`{"error":{"code":"X","message":"line\nforged"}}`, "X: lineforged", "\n"},
	} {
		url := refusingServer(t, http.StatusServiceUnavailable, tc.body)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := Dial(ctx, url, WithUser("u"), WithBackoff(time.Minute, time.Minute)) // one attempt: the wait for a second outlasts ctx
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.notWant != "" && strings.Contains(err.Error(), tc.notWant)) {
			t.Errorf("body %.40q: error %q, want it to say %q and not %q", tc.body, err, tc.want, tc.notWant)
		}
		if len(err.Error()) > 2000 {
			t.Errorf("body %.40q: error is %d bytes long", tc.body, len(err.Error()))
		}
	}
}
