package client

import (
	"bytes"
	"errors"
	"runtime"
	"testing"

	"google.golang.org/protobuf/proto"

	imqpb "github.com/imq-dev/imq/proto"
)

func joinedSub(t *testing.T, buffer int) *Subscription {
	t.Helper()
	s := newSubscription(nil, "/q", []Mount{Messages("chat"), State("seats")}, buffer)
	j := joined(1, 10, msgs("chat", false), snap("seats", entry("a", "1", 4)))
	plan, ok := s.begin(j, 0)
	if !ok {
		t.Fatal("begin refused")
	}
	first := make(chan Update, 1)
	go func() { first <- <-s.Updates() }()
	s.apply(j, plan, func(u Update) bool { return s.deliver(u, nil) })
	if u := <-first; u.Kind != KindStateSet || u.Key != "a" {
		t.Fatalf("snapshot update = %+v", u)
	}
	t.Cleanup(s.finish)
	return s
}

func TestSubscriptionDedupe(t *testing.T) {
	s := joinedSub(t, 8)
	for _, off := range []uint64{9, 10, 11, 11, 12, 11} {
		s.onEvent(ev("chat", off), nil)
	}
	s.onEvent(ev("other", 13), nil)
	s.onState(&imqpb.StateChange{Queue: "/q", Mount: "seats", Key: "a", Deleted: true, Version: 13}, nil)
	s.finish()
	var got []Update
	for u := range s.Updates() {
		got = append(got, u)
	}
	want := []string{"E chat 11", "E chat 12", "D seats a"}
	if b := brief(got); !equalStrings(b, want) {
		t.Fatalf("delivered %q, want %q", b, want)
	}
	if st := s.State("seats"); len(st) != 0 {
		t.Fatalf("mirror = %v, want empty", st)
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// An update that could not be delivered because the connection died is not
// recorded, so that the resume asks for it again.
func TestSubscriptionAbortedDeliveryNotRecorded(t *testing.T) {
	s := joinedSub(t, 0) // unbuffered, and nobody reads
	stop := make(chan struct{})
	close(stop)
	s.onEvent(ev("chat", 11), stop)
	s.onState(&imqpb.StateChange{Mount: "seats", Key: "b", Value: []byte("2"), Version: 12}, stop)
	if got := s.t.specs()[0].Resume.GetOffset(); got != 10 {
		t.Errorf("chat resumes from %d, want 10", got)
	}
	if _, ok := s.State("seats")["b"]; ok {
		t.Error("undelivered state change in the mirror")
	}
}

func TestSubscriptionFinishUnblocksDelivery(t *testing.T) {
	s := joinedSub(t, 0)
	delivered := make(chan bool)
	go func() {
		ok := s.deliver(Update{Kind: KindEvent}, nil)
		delivered <- ok
	}()
	for s.sendMu.TryLock() { // until deliver holds it, waiting in its select
		s.sendMu.Unlock()
		runtime.Gosched()
	}
	s.finish()
	if <-delivered {
		t.Fatal("delivered to a subscription nobody read")
	}
	if _, open := <-s.Updates(); open {
		t.Fatal("Updates still open after finish")
	}
	s.finish() // idempotent
	if s.deliver(Update{Kind: KindEvent}, nil) {
		t.Fatal("delivered after finish")
	}
	if _, ok := s.begin(joined(1, 20), 0); ok {
		t.Fatal("join applied after finish")
	}
}

func TestSubscriptionStateIsACopy(t *testing.T) {
	s := joinedSub(t, 1)
	st := s.State("seats")
	st["a"][0] = 'x'
	st["z"] = nil
	if got := s.State("seats"); len(got) != 1 || !bytes.Equal(got["a"], []byte("1")) {
		t.Fatalf("mirror changed through a copy: %q", got)
	}
	if s.State("chat") != nil || s.State("nope") != nil {
		t.Fatal("State of a message mount or unknown mount is not nil")
	}
}

func TestCheckMounts(t *testing.T) {
	for _, tc := range []struct {
		mounts []Mount
		ok     bool
	}{
		{[]Mount{Messages("chat"), State("seats")}, true},
		{nil, false},
		{[]Mount{{Name: "x"}}, false},
		{[]Mount{Messages("chat"), State("chat")}, false},
	} {
		err := checkMounts(tc.mounts)
		if (err == nil) != tc.ok {
			t.Errorf("checkMounts(%v) = %v", tc.mounts, err)
		}
		if e, ok := errors.AsType[*Error](err); err != nil && (!ok || e.Code != imqpb.Code_INVALID_MOUNT) {
			t.Errorf("checkMounts(%v) = %v, want INVALID_MOUNT", tc.mounts, err)
		}
	}
}

// The reader decodes every frame from one reused buffer and hands payloads
// to the application: decoding must copy bytes fields.
func TestUnmarshalCopiesBytes(t *testing.T) {
	b, err := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: ev("chat", 7)}})
	if err != nil {
		t.Fatal(err)
	}
	var m imqpb.ServerMessage
	if err := proto.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	clear(b)
	if got := m.GetEvent().GetPayload(); !bytes.Equal(got, []byte{7}) {
		t.Fatalf("payload %v changed with the buffer", got)
	}
}

// A join's first updates go in before Join returns as far as the buffer
// allows; the rest follows once the application reads.
func TestSubscriptionApplyFillsBufferFirst(t *testing.T) {
	s := newSubscription(nil, "/q", []Mount{State("seats")}, 2)
	t.Cleanup(s.finish)
	j := joined(1, 9, snap("seats", entry("a", "1", 1), entry("b", "2", 2), entry("c", "3", 3)))
	plan, _ := s.begin(j, 0)
	rest := s.apply(j, plan, s.offer)
	if len(rest) != 1 || rest[0].Key != "c" {
		t.Fatalf("rest = %+v, want the update for c", rest)
	}
	if got := stringMap(s.State("seats")); len(got) != 2 {
		t.Fatalf("mirror = %v, want what was delivered", got)
	}
	if s.t.live("seats", imqpb.MountKind_STATE, 5) == nil {
		t.Fatal("join not begun")
	}
	if s.t.mounts[0].last == 9 {
		t.Fatal("head recorded before every update was delivered")
	}
	go func() {
		for range s.Updates() {
		}
	}()
	if rest := s.apply(j, rest, func(u Update) bool { return s.deliver(u, nil) }); rest != nil {
		t.Fatalf("rest = %+v after a blocking apply", rest)
	}
	if got := s.State("seats"); len(got) != 3 || s.t.mounts[0].last != 9 {
		t.Fatalf("mirror = %q at %d, want 3 keys at the head 9", got, s.t.mounts[0].last)
	}
}

// BenchmarkDeliverEvent measures the per-event path after decoding: dedupe,
// delivery to the channel, bookkeeping.
func BenchmarkDeliverEvent(b *testing.B) {
	s := newSubscription(nil, "/q", []Mount{Messages("chat")}, 1024)
	j := joined(1, 0, msgs("chat", false))
	plan, _ := s.begin(j, 0)
	s.apply(j, plan, s.offer)
	go func() {
		for range s.Updates() {
		}
	}()
	e := ev("chat", 0)
	b.ReportAllocs()
	for i := range b.N {
		e.Offset = uint64(i + 1)
		s.onEvent(e, nil)
	}
	b.StopTimer()
	s.finish()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}
