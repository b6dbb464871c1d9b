package client

import (
	"maps"
	"slices"
	"strconv"
	"testing"

	"google.golang.org/protobuf/proto"

	imqpb "github.com/imq-dev/imq/proto"
)

func ev(mount string, offset uint64) *imqpb.Event {
	return &imqpb.Event{Queue: "/q", Mount: mount, Offset: offset, Payload: []byte{byte(offset)}}
}

func entry(key, value string, version uint64) *imqpb.StateEntry {
	return &imqpb.StateEntry{Key: key, Value: []byte(value), Version: version}
}

func msgs(name string, missed bool, history ...*imqpb.Event) *imqpb.MountState {
	return &imqpb.MountState{Name: name, Kind: imqpb.MountKind_MESSAGE, Missed: missed, History: history}
}

func snap(name string, entries ...*imqpb.StateEntry) *imqpb.MountState {
	return &imqpb.MountState{Name: name, Kind: imqpb.MountKind_STATE, State: entries}
}

func joined(epoch, head uint64, mounts ...*imqpb.MountState) *imqpb.Joined {
	return &imqpb.Joined{Queue: "/q", Epoch: epoch, Head: head, Mounts: mounts}
}

// applyAll plays a Joined as a subscription does when nothing interrupts it.
func applyAll(tr *tracker, j *imqpb.Joined, reason imqpb.Reason) []Update {
	plan := tr.begin(j, reason)
	for i := range plan {
		tr.commit(&plan[i])
	}
	tr.settle(j)
	return plan
}

// brief renders updates compactly: "E chat 5", "G chat", "S seats k=v", "D seats k".
func brief(ups []Update) []string {
	var out []string
	for _, u := range ups {
		switch u.Kind {
		case KindEvent:
			out = append(out, "E "+u.Mount+" "+strconv.FormatUint(u.Offset, 10))
		case KindGap:
			out = append(out, "G "+u.Mount)
		case KindStateSet:
			out = append(out, "S "+u.Mount+" "+u.Key+"="+string(u.Payload))
		case KindStateDeleted:
			out = append(out, "D "+u.Mount+" "+u.Key)
		default:
			out = append(out, u.Kind.String())
		}
	}
	return out
}

func newTestTracker() tracker {
	return newTracker("/q", []Mount{Messages("chat").WithRecent(20), Messages("input"), State("seats")})
}

func TestTrackerSpecs(t *testing.T) {
	tr := newTestTracker()
	first := []*imqpb.MountSpec{
		{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Recent: 20},
		{Name: "input", Kind: imqpb.MountKind_MESSAGE},
		{Name: "seats", Kind: imqpb.MountKind_STATE},
	}
	if got := tr.specs(); !specsEqual(got, first) {
		t.Fatalf("first join specs = %v, want %v", got, first)
	}

	// Nothing delivered since the join: resume from its head.
	applyAll(&tr, joined(7, 40, msgs("chat", false), msgs("input", false), snap("seats")), 0)
	// Delivered beyond the head on one mount: resume from there.
	tr.commit(&Update{Kind: KindEvent, Mount: "chat", Offset: 43})
	want := []*imqpb.MountSpec{
		{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: 7, Offset: 43}},
		{Name: "input", Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: 7, Offset: 40}},
		{Name: "seats", Kind: imqpb.MountKind_STATE},
	}
	if got := tr.specs(); !specsEqual(got, want) {
		t.Fatalf("rejoin specs = %v, want %v", got, want)
	}
}

func specsEqual(a, b []*imqpb.MountSpec) bool {
	return slices.EqualFunc(a, b, func(x, y *imqpb.MountSpec) bool { return proto.Equal(x, y) })
}

func TestTrackerJoins(t *testing.T) {
	// Every case starts from a first join at epoch 7, head 10, chat and
	// input delivered up to 12 and 11, seats {a:1 b:2 c:3}.
	setup := func() tracker {
		tr := newTestTracker()
		applyAll(&tr, joined(7, 10, msgs("chat", false), msgs("input", false),
			snap("seats", entry("a", "1", 3), entry("b", "2", 4), entry("c", "3", 5))), 0)
		tr.commit(&Update{Kind: KindEvent, Mount: "input", Offset: 11})
		tr.commit(&Update{Kind: KindEvent, Mount: "chat", Offset: 12})
		return tr
	}
	tests := []struct {
		name      string
		j         *imqpb.Joined
		want      []string
		wantEpoch uint64
		wantState map[string]string
	}{{
		name: "resume replays only what was not delivered, in queue order",
		j: joined(7, 16,
			msgs("chat", false, ev("chat", 12), ev("chat", 14), ev("chat", 16)),
			msgs("input", false, ev("input", 11), ev("input", 13), ev("input", 15)),
			snap("seats", entry("a", "1", 3), entry("b", "2", 4), entry("c", "3", 5))),
		want:      []string{"E input 13", "E chat 14", "E input 15", "E chat 16"},
		wantEpoch: 7,
		wantState: map[string]string{"a": "1", "b": "2", "c": "3"},
	}, {
		name: "history passed: gap before the replay",
		j: joined(7, 30,
			msgs("chat", true, ev("chat", 25)),
			msgs("input", false),
			snap("seats", entry("a", "1", 3), entry("b", "2", 4), entry("c", "3", 5))),
		want:      []string{"G chat", "E chat 25"},
		wantEpoch: 7,
		wantState: map[string]string{"a": "1", "b": "2", "c": "3"},
	}, {
		name: "queue recreated: gaps, offsets restart, state brought level",
		j: joined(8, 3,
			msgs("chat", true, ev("chat", 1), ev("chat", 3)),
			msgs("input", true),
			snap("seats", entry("a", "9", 2), entry("c", "3", 1), entry("d", "4", 2))),
		// Queue order: keys set carry the offset of their last change.
		want:      []string{"G chat", "G input", "E chat 1", "S seats a=9", "S seats d=4", "E chat 3", "D seats b"},
		wantEpoch: 8,
		wantState: map[string]string{"a": "9", "c": "3", "d": "4"},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := setup()
			got := brief(applyAll(&tr, tc.j, imqpb.Reason_REASON_NODE_LOST))
			if !slices.Equal(got, tc.want) {
				t.Errorf("updates = %q, want %q", got, tc.want)
			}
			if tr.epoch != tc.wantEpoch {
				t.Errorf("epoch = %d, want %d", tr.epoch, tc.wantEpoch)
			}
			if got := stringMap(tr.mount("seats").state); !maps.Equal(got, tc.wantState) {
				t.Errorf("mirror = %v, want %v", got, tc.wantState)
			}
			for _, m := range tr.mounts {
				if m.epoch != tc.j.Epoch || m.last != tc.j.Head {
					t.Errorf("mount %s at %d/%d, want the join's head %d/%d", m.name, m.epoch, m.last, tc.j.Epoch, tc.j.Head)
				}
			}
		})
	}
}

func stringMap(m map[string][]byte) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = string(v)
	}
	return out
}

func TestTrackerFirstJoin(t *testing.T) {
	tr := newTestTracker()
	// missed means nothing on a first join: there was nothing to miss.
	got := brief(applyAll(&tr, joined(7, 9,
		msgs("chat", true, ev("chat", 4), ev("chat", 8)),
		msgs("input", false, ev("input", 5)),
		snap("seats", entry("a", "1", 2), entry("b", "2", 9))), 0))
	want := []string{"S seats a=1", "E chat 4", "E input 5", "E chat 8", "S seats b=2"} // queue order
	if !slices.Equal(got, want) {
		t.Fatalf("updates = %q, want %q", got, want)
	}
}

func TestTrackerReasonOnGap(t *testing.T) {
	tr := newTestTracker()
	applyAll(&tr, joined(1, 5, msgs("chat", false)), 0)
	plan := tr.begin(joined(2, 1, msgs("chat", true)), imqpb.Reason_REASON_NODE_LOST)
	if len(plan) != 1 || plan[0].Kind != KindGap || plan[0].Reason != imqpb.Reason_REASON_NODE_LOST || plan[0].Message == "" {
		t.Fatalf("plan = %+v, want one gap with reason and message", plan)
	}
}

// A join cut short by a lost connection must leave the tracker where the
// next join plans again whatever was not delivered.
func TestTrackerInterruptedJoin(t *testing.T) {
	recreated := joined(8, 2, msgs("chat", true, ev("chat", 1), ev("chat", 2)), msgs("input", true))
	tests := []struct {
		name      string
		delivered int // updates of the plan delivered before the connection died
		wantSpec  *imqpb.Position
	}{
		{"nothing delivered: still the old position, so the gap comes again", 0, &imqpb.Position{Epoch: 7, Offset: 10}},
		{"gap delivered: the new epoch from its start", 1, &imqpb.Position{Epoch: 8, Offset: 0}},
		{"gap and an event delivered", 3, &imqpb.Position{Epoch: 8, Offset: 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTestTracker()
			applyAll(&tr, joined(7, 10, msgs("chat", false), msgs("input", false), snap("seats")), 0)
			plan := tr.begin(recreated, 0)
			if got := brief(plan); !slices.Equal(got, []string{"G chat", "G input", "E chat 1", "E chat 2"}) {
				t.Fatalf("plan = %q", got)
			}
			for i := range plan[:tc.delivered] {
				tr.commit(&plan[i])
			}
			if got := tr.specs()[0].Resume; !proto.Equal(got, tc.wantSpec) {
				t.Fatalf("chat resumes from %v, want %v", got, tc.wantSpec)
			}
		})
	}
}

func TestTrackerLive(t *testing.T) {
	tr := newTestTracker()
	if tr.live("chat", imqpb.MountKind_MESSAGE, 1) != nil {
		t.Fatal("live update accepted before any join")
	}
	applyAll(&tr, joined(7, 10, msgs("chat", false), msgs("input", false), snap("seats", entry("a", "1", 3))), 0)
	for _, tc := range []struct {
		mount  string
		kind   imqpb.MountKind
		offset uint64
		want   bool
	}{
		{"chat", imqpb.MountKind_MESSAGE, 10, false}, // covered by the join
		{"chat", imqpb.MountKind_MESSAGE, 11, true},
		{"seats", imqpb.MountKind_STATE, 9, false},
		{"seats", imqpb.MountKind_STATE, 11, true},
		{"seats", imqpb.MountKind_MESSAGE, 11, false}, // wrong kind
		{"other", imqpb.MountKind_MESSAGE, 11, false}, // not joined
	} {
		if got := tr.live(tc.mount, tc.kind, tc.offset) != nil; got != tc.want {
			t.Errorf("live(%s, %v, %d) = %v, want %v", tc.mount, tc.kind, tc.offset, got, tc.want)
		}
	}

	// Delivered updates move the position and the mirror; duplicates are then refused.
	for _, sc := range []*imqpb.StateChange{
		{Mount: "seats", Key: "b", Value: []byte("2"), Version: 11},
		{Mount: "seats", Key: "a", Deleted: true, Version: 12},
	} {
		u := stateUpdate("/q", "seats", sc)
		tr.commit(&u)
	}
	u := eventUpdate("/q", "chat", ev("chat", 13))
	tr.commit(&u)
	if got := stringMap(tr.mount("seats").state); !maps.Equal(got, map[string]string{"b": "2"}) {
		t.Errorf("mirror = %v, want b=2", got)
	}
	if tr.live("seats", imqpb.MountKind_STATE, 12) != nil || tr.live("chat", imqpb.MountKind_MESSAGE, 13) != nil {
		t.Error("duplicate accepted after commit")
	}
}

// A first join cut off before its plan was delivered resumes from just
// before what it replayed, not from the start of the history.
func TestTrackerFirstJoinInterrupted(t *testing.T) {
	tr := newTestTracker()
	j := joined(7, 9, msgs("chat", false, ev("chat", 4), ev("chat", 8)), msgs("input", false))
	plan := tr.begin(j, 0)
	if len(plan) == 0 {
		t.Fatal("empty plan")
	}
	// Nothing delivered; the connection drops.
	for _, spec := range tr.specs() {
		switch spec.GetName() {
		case "chat":
			if got := spec.GetResume().GetOffset(); got != 3 {
				t.Fatalf("chat resumes after %d, want 3 (just before the replay)", got)
			}
		case "input":
			if got := spec.GetResume().GetOffset(); got != 9 {
				t.Fatalf("input resumes after %d, want 9 (the head)", got)
			}
		}
	}
}
