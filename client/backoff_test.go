package client

import (
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

func TestBackoffBounds(t *testing.T) {
	const lo, hi = 50 * time.Millisecond, 5 * time.Second
	top := func(n int64) int64 { return n - 1 } // the largest draw
	for _, tc := range []struct {
		attempt int
		ceil    time.Duration
	}{
		{0, lo},
		{1, 2 * lo},
		{3, 8 * lo},
		{6, 64 * lo},
		{7, hi}, // 128·50ms is past the cap
		{100, hi},
		{1 << 30, hi},
	} {
		if got := backoff(lo, hi, tc.attempt, top); got != tc.ceil {
			t.Errorf("attempt %d: largest wait %v, want %v", tc.attempt, got, tc.ceil)
		}
		if got := backoff(lo, hi, tc.attempt, func(int64) int64 { return 0 }); got != 0 {
			t.Errorf("attempt %d: smallest wait %v, want 0", tc.attempt, got)
		}
		for range 100 {
			if got := backoff(lo, hi, tc.attempt, rand.Int64N); got < 0 || got > tc.ceil {
				t.Fatalf("attempt %d: wait %v outside [0, %v]", tc.attempt, got, tc.ceil)
			}
		}
	}
}

func TestBackoffHugeMax(t *testing.T) {
	const hi = time.Duration(1<<63 - 1)
	if got := backoff(time.Second, hi, 80, func(n int64) int64 { return n - 1 }); got != hi {
		t.Fatalf("largest wait %v, want %v", got, hi)
	}
}

// TestReconnectWait: a gateway's goodbye SHUTDOWN (reconnect) is answered at
// once, within a little jitter, however many attempts came before, and the
// count starts over; any other cause, a goodbye that says not to reconnect
// included, backs off by the attempts made.
func TestReconnectWait(t *testing.T) {
	const lo, hi = time.Second, time.Minute
	top := func(n int64) int64 { return n - 1 } // the largest draw
	shutdown := &GoodbyeError{Reason: imqpb.Reason_REASON_SHUTDOWN, Reconnect: true}
	for _, tc := range []struct {
		name    string
		cause   error
		attempt int
		want    time.Duration
		next    int
	}{
		{"shutdown", shutdown, 0, goAwayJitter, 0},
		{"shutdown after failures", shutdown, 5, goAwayJitter, 0},
		{"wrapped shutdown", fmt.Errorf("read: %w", shutdown), 3, goAwayJitter, 0},
		{"shutdown, no reconnect", &GoodbyeError{Reason: imqpb.Reason_REASON_SHUTDOWN}, 2, 4 * lo, 3},
		{"slow consumer", &GoodbyeError{Reason: imqpb.Reason_REASON_SLOW_CONSUMER, Reconnect: true}, 0, lo, 1},
		{"lost connection", io.ErrUnexpectedEOF, 1, 2 * lo, 2},
	} {
		attempt := tc.attempt
		if got := reconnectWait(tc.cause, lo, hi, &attempt, top); got != tc.want || attempt != tc.next {
			t.Errorf("%s: waits at most %v, attempt %d; want %v, %d", tc.name, got, attempt, tc.want, tc.next)
		}
	}
	attempt := 0 // the jitter never exceeds the configured minimum backoff
	if got := reconnectWait(shutdown, time.Millisecond, hi, &attempt, top); got != time.Millisecond {
		t.Errorf("shutdown with a 1ms minimum backoff: waits at most %v", got)
	}
}
