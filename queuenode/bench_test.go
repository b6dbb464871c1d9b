package queuenode

import (
	"testing"
	"time"
)

// BenchmarkPublish measures the pure core's append: offset, history, eviction.
func BenchmarkPublish(b *testing.B) {
	l := DefaultLimits()
	now := time.Unix(1_700_000_000, 0)
	q := NewQueue("/room/bench", 1, &l, now)
	payload := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := q.Publish("chat", "bench", payload, now); err != nil {
			b.Fatal(err)
		}
	}
}
