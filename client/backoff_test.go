package client

import (
	"math/rand/v2"
	"testing"
	"time"
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
