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

// BenchmarkPublishBudget measures the server's publish path around the core's
// append: reserving room in the node's memory budget and settling it after,
// on a queue whose history is full (every publish evicts one event).
func BenchmarkPublishBudget(b *testing.B) {
	cfg := DefaultConfig()
	cfg.LinkAddr = "127.0.0.1:0"
	s, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.ln.Close() })
	const name = "/room/bench"
	now := time.Unix(1_700_000_000, 0)
	sh := s.shardFor(name)
	sh.mu.Lock()
	q, _, _ := s.queueLocked(sh, name, true, "")
	sh.mu.Unlock()
	payload := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		reserved, err := s.lockWithRoom(sh, name, func() int64 { return s.needLocked(sh, name, "chat") + int64(len(payload)+5+entryOverhead) })
		if err != nil {
			b.Fatal(err)
		}
		if _, err := q.Publish("chat", "bench", payload, now); err != nil {
			b.Fatal(err)
		}
		s.settleLocked(q, reserved)
		sh.mu.Unlock()
	}
}
