package gateway

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestCtxErr: a call's end is TIMEOUT once its deadline has passed, even
// when the request's own context (net/http's) was cancelled first; before
// the deadline a cancellation is UNAVAILABLE.
func TestCtxErr(t *testing.T) {
	parent, cancelParent := context.WithCancel(context.Background())
	cancelParent()
	past, cancelPast := context.WithDeadline(parent, time.Now().Add(-time.Millisecond))
	defer cancelPast()
	if !errors.Is(past.Err(), context.Canceled) {
		t.Fatalf("the test's context ended with %v, want Canceled", past.Err())
	}
	if got := imqerr.From(ctxErr(past, time.Second)).Code; got != imqpb.Code_TIMEOUT {
		t.Fatalf("past the deadline after a cancel: %v, want TIMEOUT", got)
	}
	future, cancelFuture := context.WithDeadline(parent, time.Now().Add(time.Hour))
	defer cancelFuture()
	if got := imqerr.From(ctxErr(future, time.Second)).Code; got != imqpb.Code_UNAVAILABLE {
		t.Fatalf("cancelled before the deadline: %v, want UNAVAILABLE", got)
	}
}
