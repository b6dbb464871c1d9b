package gateway

import (
	"slices"
	"testing"
)

// laneOps returns n operations and two links, as identities only.
func laneOps(n int) ([]*routed, *nodeLink, *nodeLink) {
	ops := make([]*routed, n)
	for i := range ops {
		ops[i] = &routed{}
	}
	return ops, &nodeLink{}, &nodeLink{}
}

func heldSeqs(ln *lane) []uint64 {
	var s []uint64
	for _, rt := range ln.held {
		s = append(s, rt.laneSeq)
	}
	return s
}

func expectStep(t *testing.T, ln *lane, want laneStep) {
	t.Helper()
	if got := ln.next(); got != want {
		t.Fatalf("next() = %d, want %d (lane %+v)", got, want, ln)
	}
}

// TestLaneSteadyPipelines: while the route stays put every operation goes at
// once, however many are in flight.
func TestLaneSteadyPipelines(t *testing.T) {
	ops, a, _ := laneOps(3)
	var ln lane
	for _, rt := range ops {
		if !ln.admit(rt, a) {
			t.Fatal("held on an unchanged route")
		}
	}
	if ln.inflight != 3 || len(ln.held) != 0 {
		t.Fatalf("lane %+v", ln)
	}
	for i, rt := range ops {
		ln.answered(rt, false, false)
		if i < 2 {
			expectStep(t, &ln, laneBusy)
		}
	}
	expectStep(t, &ln, laneIdle)
}

// TestLaneRouteChangeWaits: an operation for another link waits until those
// in flight are answered, and so does every later one, even for the old
// link; the first to the new link goes alone.
func TestLaneRouteChangeWaits(t *testing.T) {
	ops, a, b := laneOps(4)
	var ln lane
	if !ln.admit(ops[0], a) || ln.admit(ops[1], b) || ln.admit(ops[2], a) || ln.admit(ops[3], b) {
		t.Fatal("admitted past a route change")
	}
	expectStep(t, &ln, laneBusy)
	ln.answered(ops[0], false, false)
	expectStep(t, &ln, lanePump)
	if !ln.take(b) || !ln.probing {
		t.Fatal("the first operation to the new link did not go alone")
	}
	if ln.take(b) {
		t.Fatal("a second operation went before the probe was answered")
	}
	ln.answered(ops[1], false, false)
	if ln.probing || !ln.take(b) || !ln.take(b) {
		t.Fatal("no pipelining once the new node answered")
	}
	if ln.take(a) {
		t.Fatal("went back to the old link with operations in flight on the new one")
	}
}

// TestLaneMovedResendsInOrder: MOVED operations are held in their original
// order, ahead of later ones, and nothing is sent until every operation in
// flight is answered and the resender resumes the lane.
func TestLaneMovedResendsInOrder(t *testing.T) {
	ops, a, b := laneOps(5)
	var ln lane
	for _, rt := range ops[:3] {
		ln.admit(rt, a)
	}
	ln.answered(ops[1], true, true) // answered before ops[0]: a node's replies need not be in order
	if ln.admit(ops[3], a) {
		t.Fatal("sent after a MOVED")
	}
	ln.answered(ops[0], false, false)
	expectStep(t, &ln, laneBusy) // ops[2] in flight
	ln.answered(ops[2], true, true)
	if got := heldSeqs(&ln); !slices.Equal(got, []uint64{2, 3, 4}) {
		t.Fatalf("held %v, want 2 3 4", got)
	}
	expectStep(t, &ln, laneResend)
	expectStep(t, &ln, laneBusy) // one resender
	if ln.admit(ops[4], b) {
		t.Fatal("sent while the resender waits")
	}
	ln.resume()
	expectStep(t, &ln, lanePump)
	if !ln.take(b) || ln.take(b) {
		t.Fatal("a resend does not go alone first")
	}
	// The resent one is MOVED again with its attempts spent: final, and the
	// probe goes on, since the node did not show it serves the queue.
	ln.answered(ln.held[0], true, false)
	if !ln.probing {
		t.Fatal("a MOVED answer ended the probe")
	}
}
