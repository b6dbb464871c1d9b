package client

import (
	"bytes"
	"errors"
	"testing"
	"time"

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
	s.apply(j, plan, nil)
	if u := <-s.Updates(); u.Kind != KindStateSet || u.Key != "a" {
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
	time.Sleep(10 * time.Millisecond) // let it block; the test passes either way
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
