package gateway

import (
	"testing"

	"github.com/imq-dev/imq/internal/bucket"
)

// TestLinkForDoesNotAllocate: routing is on every request's path.
func TestLinkForDoesNotAllocate(t *testing.T) {
	s := &Server{}
	tb := bucket.Single(bucket.Node{ID: "a", LinkAddr: "127.0.0.1:1"})
	tb, _, _ = tb.Join(bucket.Node{ID: "b", LinkAddr: "127.0.0.1:2"})
	links := map[string]*nodeLink{}
	for _, n := range tb.Nodes() {
		links[n.ID] = newNodeLink(s, n)
	}
	s.routes.Store(&routes{table: tb, links: links})
	if n := testing.AllocsPerRun(100, func() {
		if l, v, err := s.linkFor("/room/alloc"); l == nil || v != tb.Version() || err != nil {
			t.Fatal(l, v, err)
		}
	}); n != 0 {
		t.Fatalf("linkFor allocates %v times", n)
	}
	s.routes.Store(&routes{table: bucket.Empty(), links: map[string]*nodeLink{}})
	if _, _, err := s.linkFor("/room/alloc"); err != errNoTable {
		t.Fatalf("empty table: %v", err)
	}
}
