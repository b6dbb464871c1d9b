package queuenode

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// t0 is the fixed time base of every test here; tests advance time by adding
// to it, never by reading the clock.
var t0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

const (
	testQueue = "/room/1"
	testEpoch = 7
)

// at returns t0 plus d.
func at(d time.Duration) time.Time { return t0.Add(d) }

// testLimits returns generous limits with a short history: HistoryLen 5 and no
// age limit. Tests tighten the one limit they exercise.
func testLimits() *Limits {
	l := DefaultLimits()
	l.HistoryLen = 5
	l.HistoryAge = 0
	return &l
}

func newTestQueue(t *testing.T, l *Limits) *Queue {
	t.Helper()
	if l == nil {
		l = testLimits()
	}
	return NewQueue(testQueue, testEpoch, l, t0)
}

func msgSpec(name string) *imqpb.MountSpec {
	return &imqpb.MountSpec{Name: name, Kind: imqpb.MountKind_MESSAGE}
}

func stateSpec(name string) *imqpb.MountSpec {
	return &imqpb.MountSpec{Name: name, Kind: imqpb.MountKind_STATE}
}

func resumeSpec(name string, epoch, offset uint64) *imqpb.MountSpec {
	return &imqpb.MountSpec{Name: name, Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: epoch, Offset: offset}}
}

func recentSpec(name string, n uint32) *imqpb.MountSpec {
	return &imqpb.MountSpec{Name: name, Kind: imqpb.MountKind_MESSAGE, Recent: n}
}

func sub(session, gateway string) Subscriber {
	return Subscriber{User: "u-" + session, Session: session, Gateway: gateway}
}

func mustPublish(t *testing.T, q *Queue, mount string, payload []byte, now time.Time) *imqpb.Event {
	t.Helper()
	ev, err := q.Publish(mount, "alice", payload, now)
	if err != nil {
		t.Fatalf("Publish(%q): %v", mount, err)
	}
	return ev
}

func mustSetState(t *testing.T, q *Queue, mount, key string, value []byte, del bool, now time.Time) *imqpb.StateChange {
	t.Helper()
	ch, err := q.SetState(mount, "alice", key, value, del, now)
	if err != nil {
		t.Fatalf("SetState(%q, %q, del=%v): %v", mount, key, del, err)
	}
	return ch
}

func mustJoin(t *testing.T, q *Queue, s Subscriber, now time.Time, specs ...*imqpb.MountSpec) *imqpb.Joined {
	t.Helper()
	j, err := q.Join(s, specs, now)
	if err != nil {
		t.Fatalf("Join(%s): %v", s.Session, err)
	}
	if len(j.GetMounts()) != len(specs) {
		t.Fatalf("Join(%s) answered %d mounts for %d specs", s.Session, len(j.GetMounts()), len(specs))
	}
	return j
}

func wantCode(t *testing.T, err error, want imqpb.Code) {
	t.Helper()
	if got := imqerr.CodeOf(err); got != want {
		t.Fatalf("error code = %v (err %v), want %v", got, err, want)
	}
}

func offsetsOf(evs []*imqpb.Event) []uint64 {
	out := []uint64{}
	for _, e := range evs {
		out = append(out, e.GetOffset())
	}
	return out
}

// gatewaysOf returns the gateways ForEachGateway yields for mount, sorted,
// failing the test if one is yielded twice.
func gatewaysOf(t *testing.T, q *Queue, mount string) []string {
	t.Helper()
	out := []string{}
	q.ForEachGateway(mount, func(gw string) {
		if slices.Contains(out, gw) {
			t.Fatalf("ForEachGateway(%q) yielded %q twice", mount, gw)
		}
		out = append(out, gw)
	})
	slices.Sort(out)
	return out
}

// queueView is everything observable about a queue, for asserting that a
// failed call changed nothing.
type queueView struct {
	Head       uint64
	LastActive time.Time
	Mounts     map[string]mountView
	Subs       map[string]string // session -> gateway and mounts
}

type mountView struct {
	Kind     imqpb.MountKind
	Hist     []uint64
	Evicted  uint64
	State    map[string]uint64 // key -> version
	Bytes    int
	Gateways map[string]int
}

func viewOf(q *Queue) queueView {
	v := queueView{Head: q.head, LastActive: q.lastActive, Mounts: map[string]mountView{}, Subs: map[string]string{}}
	for name, m := range q.mounts {
		mv := mountView{Kind: m.kind, Hist: offsetsOf(m.hist), Evicted: m.evicted, State: map[string]uint64{}, Bytes: m.stateBytes, Gateways: map[string]int{}}
		for k, e := range m.state {
			mv.State[k] = e.GetVersion()
		}
		for gw, n := range m.gateways {
			mv.Gateways[gw] = n
		}
		v.Mounts[name] = mv
	}
	for session, s := range q.subs {
		v.Subs[session] = s.Gateway + " " + strings.Join(s.mounts, ",")
	}
	return v
}

// offsetRange returns from, from+1, ..., to (empty when from > to).
func offsetRange(from, to uint64) []uint64 {
	out := []uint64{}
	for o := from; o <= to; o++ {
		out = append(out, o)
	}
	return out
}

func TestTotalOrder(t *testing.T) {
	q := newTestQueue(t, nil)
	if q.Head() != 0 {
		t.Fatalf("new queue: Head() = %d, want 0", q.Head())
	}
	now := t0
	want := uint64(0)
	check := func(what string, got uint64) {
		t.Helper()
		want++
		if got != want {
			t.Fatalf("%s: offset %d, want %d", what, got, want)
		}
		if q.Head() != got {
			t.Fatalf("%s: Head() = %d, want %d", what, q.Head(), got)
		}
	}
	for i := range 10 {
		now = now.Add(time.Millisecond)
		switch i % 4 {
		case 0:
			check("publish chat", mustPublish(t, q, "chat", []byte(`"hi"`), now).GetOffset())
		case 1:
			check("publish input", mustPublish(t, q, "input", []byte{byte(i)}, now).GetOffset())
		case 2:
			check("set score", mustSetState(t, q, "score", fmt.Sprint("p", i), []byte("1"), false, now).GetVersion())
		case 3:
			check("set dice", mustSetState(t, q, "dice", "d", []byte{byte(i)}, false, now).GetVersion())
		}
	}
	check("delete", mustSetState(t, q, "score", "p2", nil, true, now).GetVersion())

	j := mustJoin(t, q, sub("s1", "gw1"), now, msgSpec("chat"))
	if j.GetHead() != q.Head() || j.GetEpoch() != testEpoch || j.GetQueue() != testQueue {
		t.Fatalf("Joined{queue %q epoch %d head %d}, want {%q %d %d}", j.GetQueue(), j.GetEpoch(), j.GetHead(), testQueue, testEpoch, q.Head())
	}
	// A join consumes no offset.
	check("publish after join", mustPublish(t, q, "chat", nil, now).GetOffset())
}

func TestPublishEventFields(t *testing.T) {
	q := newTestQueue(t, nil)
	now := at(1500 * time.Millisecond)
	ev, err := q.Publish("chat", "bob", []byte(`{"text":"hi"}`), now)
	if err != nil {
		t.Fatal(err)
	}
	if ev.GetQueue() != testQueue || ev.GetMount() != "chat" || ev.GetOffset() != 1 || ev.GetSender() != "bob" ||
		ev.GetTimeMs() != now.UnixMilli() || string(ev.GetPayload()) != `{"text":"hi"}` {
		t.Fatalf("event = %v", ev)
	}
}

// resumeCase is one resume point and what it must yield.
type resumeCase struct {
	name   string
	from   uint64
	want   []uint64
	missed bool
}

// checkResume joins mount from each case's offset and compares the replay.
func checkResume(t *testing.T, q *Queue, mount string, now time.Time, cases []resumeCase) {
	t.Helper()
	for _, c := range cases {
		j, err := q.Join(sub("resumer", "gw1"), []*imqpb.MountSpec{resumeSpec(mount, testEpoch, c.from)}, now)
		if err != nil {
			t.Fatalf("%s: resume %s from %d: %v", c.name, mount, c.from, err)
		}
		ms := j.GetMounts()[0]
		if got := offsetsOf(ms.GetHistory()); !slices.Equal(got, c.want) {
			t.Errorf("%s: resume %s from %d: replayed %v, want %v", c.name, mount, c.from, got, c.want)
		}
		if ms.GetMissed() != c.missed {
			t.Errorf("%s: resume %s from %d: missed = %v, want %v", c.name, mount, c.from, ms.GetMissed(), c.missed)
		}
		for _, ev := range ms.GetHistory() {
			if ev.GetMount() != mount {
				t.Errorf("%s: resume %s replayed event %d of mount %q", c.name, mount, ev.GetOffset(), ev.GetMount())
			}
		}
	}
}

// everyResumePoint returns a case for every offset 0..head: the replay is the
// retained offsets after L, and missed is L < newestEvicted.
func everyResumePoint(head uint64, retained []uint64, newestEvicted uint64) []resumeCase {
	var cases []resumeCase
	for l := uint64(0); l <= head; l++ {
		want := []uint64{}
		for _, o := range retained {
			if o > l {
				want = append(want, o)
			}
		}
		cases = append(cases, resumeCase{name: fmt.Sprintf("L=%d", l), from: l, want: want, missed: l < newestEvicted})
	}
	return cases
}

func TestResumeWindowEdgesOneMount(t *testing.T) {
	q := newTestQueue(t, nil) // HistoryLen 5
	for i := range 12 {
		mustPublish(t, q, "chat", []byte{byte(i)}, at(time.Duration(i)*time.Millisecond))
	}
	// Retained 8..12; 1..7 evicted.
	now := at(time.Second)
	checkResume(t, q, "chat", now, []resumeCase{
		{"from zero", 0, offsetRange(8, 12), true},
		{"before newest evicted", 6, offsetRange(8, 12), true},
		{"at newest evicted = oldest retained - 1", 7, offsetRange(8, 12), false},
		{"at oldest retained", 8, offsetRange(9, 12), false},
		{"one before head", 11, []uint64{12}, false},
		{"at head", 12, []uint64{}, false},
	})
	checkResume(t, q, "chat", now, everyResumePoint(12, offsetRange(8, 12), 7))
}

func TestResumeWindowEdgesInterleavedMounts(t *testing.T) {
	q := newTestQueue(t, nil) // HistoryLen 5 per mount
	var chat, input []uint64
	for i := range 24 {
		mount := "chat"
		if i%2 == 1 {
			mount = "input"
		}
		ev := mustPublish(t, q, mount, []byte{byte(i)}, at(time.Duration(i)*time.Millisecond))
		if mount == "chat" {
			chat = append(chat, ev.GetOffset())
		} else {
			input = append(input, ev.GetOffset())
		}
	}
	// chat: 1,3,...,23, retained 15..23 odd, newest evicted 13.
	// input: 2,4,...,24, retained 16..24 even, newest evicted 14.
	if q.Head() != 24 {
		t.Fatalf("Head() = %d, want 24", q.Head())
	}
	now := at(time.Second)
	checkResume(t, q, "chat", now, []resumeCase{
		{"below newest evicted", 12, []uint64{15, 17, 19, 21, 23}, true},
		{"at newest evicted", 13, []uint64{15, 17, 19, 21, 23}, false},
		{"at oldest retained - 1 (an input offset)", 14, []uint64{15, 17, 19, 21, 23}, false},
		{"at oldest retained", 15, []uint64{17, 19, 21, 23}, false},
		{"at newest chat event", 23, []uint64{}, false},
		{"at head (an input offset)", 24, []uint64{}, false},
	})
	checkResume(t, q, "input", now, []resumeCase{
		{"below newest evicted", 13, []uint64{16, 18, 20, 22, 24}, true},
		{"at newest evicted", 14, []uint64{16, 18, 20, 22, 24}, false},
		{"at oldest retained - 1 (a chat offset)", 15, []uint64{16, 18, 20, 22, 24}, false},
		{"at head", 24, []uint64{}, false},
	})
	checkResume(t, q, "chat", now, everyResumePoint(24, chat[len(chat)-5:], chat[len(chat)-6]))
	checkResume(t, q, "input", now, everyResumePoint(24, input[len(input)-5:], input[len(input)-6]))

	// Both mounts in one join, each from the same queue offset.
	for l := uint64(0); l <= 24; l++ {
		j := mustJoin(t, q, sub("both", "gw1"), now, resumeSpec("chat", testEpoch, l), resumeSpec("input", testEpoch, l))
		for i, c := range []struct {
			retained []uint64
			evicted  uint64
		}{{chat[7:], chat[6]}, {input[7:], input[6]}} {
			want := everyResumePoint(24, c.retained, c.evicted)[l]
			ms := j.GetMounts()[i]
			if got := offsetsOf(ms.GetHistory()); !slices.Equal(got, want.want) || ms.GetMissed() != want.missed {
				t.Errorf("join both from %d: mount %s replayed %v missed %v, want %v missed %v", l, ms.GetName(), got, ms.GetMissed(), want.want, want.missed)
			}
		}
	}
}

func TestResumeAgeEviction(t *testing.T) {
	newAged := func(t *testing.T) *Queue {
		l := testLimits()
		l.HistoryLen = 100
		l.HistoryAge = 10 * time.Second
		q := newTestQueue(t, l)
		// Offsets 1..10 published at 0s..9s.
		for i := range 10 {
			mustPublish(t, q, "chat", []byte{byte(i)}, at(time.Duration(i)*time.Second))
		}
		return q
	}

	t.Run("join", func(t *testing.T) {
		q := newAged(t)
		// At 15.5s everything published at or before 5.5s is gone: 1..6.
		now := at(15500 * time.Millisecond)
		checkResume(t, q, "chat", now, []resumeCase{
			{"below newest evicted", 5, offsetRange(7, 10), true},
			{"at newest evicted", 6, offsetRange(7, 10), false},
			{"inside window", 8, offsetRange(9, 10), false},
			{"at head", 10, []uint64{}, false},
		})
		checkResume(t, q, "chat", now, everyResumePoint(10, offsetRange(7, 10), 6))
	})

	t.Run("young history is kept", func(t *testing.T) {
		q := newAged(t)
		// At 9.5s nothing is older than 10s.
		checkResume(t, q, "chat", at(9500*time.Millisecond), everyResumePoint(10, offsetRange(1, 10), 0))
	})

	t.Run("expire", func(t *testing.T) {
		q := newAged(t)
		q.Expire(at(15500*time.Millisecond), time.Hour)
		// Expire dropped 1..6 for good: a join with an earlier clock sees it.
		checkResume(t, q, "chat", at(10*time.Second), everyResumePoint(10, offsetRange(7, 10), 6))
	})

	t.Run("publish", func(t *testing.T) {
		q := newAged(t)
		// A publish at 20s carries its own time; a join at 20s keeps only
		// what is younger than 10s, which is that publish alone.
		ev := mustPublish(t, q, "chat", []byte("x"), at(20*time.Second))
		if ev.GetTimeMs() != at(20*time.Second).UnixMilli() {
			t.Fatalf("event time %d, want %d", ev.GetTimeMs(), at(20*time.Second).UnixMilli())
		}
		checkResume(t, q, "chat", at(20*time.Second), everyResumePoint(11, []uint64{11}, 10))
	})

	t.Run("all aged out", func(t *testing.T) {
		q := newAged(t)
		checkResume(t, q, "chat", at(time.Hour), everyResumePoint(10, nil, 10))
	})
}

func TestResumeOtherEpoch(t *testing.T) {
	q := newTestQueue(t, nil)
	for i := range 8 {
		mustPublish(t, q, "chat", []byte{byte(i)}, t0)
	}
	for _, pos := range []struct{ epoch, offset uint64 }{
		{testEpoch - 1, 0},
		{testEpoch - 1, 3},
		{testEpoch + 1, 8},
		{testEpoch + 1, 1000}, // beyond head, but in another epoch: fine
		{0, 0},
	} {
		j := mustJoin(t, q, sub("s1", "gw1"), t0, resumeSpec("chat", pos.epoch, pos.offset))
		ms := j.GetMounts()[0]
		if got, want := offsetsOf(ms.GetHistory()), offsetRange(4, 8); !slices.Equal(got, want) || !ms.GetMissed() {
			t.Errorf("resume from epoch %d offset %d: replayed %v missed %v, want %v missed true", pos.epoch, pos.offset, got, ms.GetMissed(), want)
		}
	}
	// Another epoch on a mount with no history is still missed.
	j := mustJoin(t, q, sub("s1", "gw1"), t0, resumeSpec("empty", testEpoch+1, 2))
	if ms := j.GetMounts()[0]; len(ms.GetHistory()) != 0 || !ms.GetMissed() {
		t.Errorf("resume empty mount from other epoch: replayed %v missed %v, want none, missed", offsetsOf(ms.GetHistory()), ms.GetMissed())
	}
}

func TestResumeBeyondHead(t *testing.T) {
	q := newTestQueue(t, nil)
	mustPublish(t, q, "chat", []byte("a"), t0)
	mustPublish(t, q, "chat", []byte("b"), t0)
	before := viewOf(q)
	_, err := q.Join(sub("s1", "gw1"), []*imqpb.MountSpec{resumeSpec("chat", testEpoch, 3)}, at(time.Second))
	wantCode(t, err, imqpb.Code_BAD_REQUEST)
	if after := viewOf(q); !reflect.DeepEqual(before, after) {
		t.Fatalf("failed join changed the queue:\nbefore %+v\nafter  %+v", before, after)
	}
	// A new mount may be resumed up to the queue's head, not the mount's.
	j := mustJoin(t, q, sub("s1", "gw1"), t0, resumeSpec("other", testEpoch, 2))
	if ms := j.GetMounts()[0]; len(ms.GetHistory()) != 0 || ms.GetMissed() {
		t.Fatalf("resume new mount at head: replayed %v missed %v", offsetsOf(ms.GetHistory()), ms.GetMissed())
	}
}

func TestReplayBudget(t *testing.T) {
	l := testLimits()
	l.HistoryLen = 10
	l.MaxReplayBytes = 3 * (10 + len("alice") + entryOverhead) // three events
	q := newTestQueue(t, l)
	ten := bytes.Repeat([]byte("x"), 10)
	for range 8 {
		mustPublish(t, q, "chat", ten, t0) // offsets 1..8
	}
	for range 2 {
		mustPublish(t, q, "input", ten, t0) // offsets 9, 10
	}
	for _, c := range []struct {
		name   string
		specs  []*imqpb.MountSpec
		want   [][]uint64
		missed []bool
	}{
		{"over budget keeps newest", []*imqpb.MountSpec{resumeSpec("chat", testEpoch, 2)}, [][]uint64{{6, 7, 8}}, []bool{true}},
		{"exactly the budget", []*imqpb.MountSpec{resumeSpec("chat", testEpoch, 5)}, [][]uint64{{6, 7, 8}}, []bool{false}},
		{"under budget", []*imqpb.MountSpec{resumeSpec("chat", testEpoch, 6)}, [][]uint64{{7, 8}}, []bool{false}},
		{"other epoch over budget", []*imqpb.MountSpec{resumeSpec("chat", testEpoch+1, 0)}, [][]uint64{{6, 7, 8}}, []bool{true}},
		{"budget shared by the mounts of one join",
			[]*imqpb.MountSpec{resumeSpec("input", testEpoch, 0), resumeSpec("chat", testEpoch, 4)},
			[][]uint64{{9, 10}, {8}}, []bool{false, true}},
		{"spent budget", []*imqpb.MountSpec{resumeSpec("chat", testEpoch, 0), resumeSpec("input", testEpoch, 8)},
			[][]uint64{{6, 7, 8}, {}}, []bool{true, true}},
		// recent is best effort: it never reports missed.
		{"recent over budget", []*imqpb.MountSpec{recentSpec("chat", 5)}, [][]uint64{{6, 7, 8}}, []bool{false}},
	} {
		j := mustJoin(t, q, sub("s1", "gw1"), t0, c.specs...)
		for i, ms := range j.GetMounts() {
			if got := offsetsOf(ms.GetHistory()); !slices.Equal(got, c.want[i]) || ms.GetMissed() != c.missed[i] {
				t.Errorf("%s: mount %s replayed %v missed %v, want %v missed %v", c.name, ms.GetName(), got, ms.GetMissed(), c.want[i], c.missed[i])
			}
		}
	}
}

func TestRecentOnFreshJoin(t *testing.T) {
	q := newTestQueue(t, nil) // HistoryLen 5
	for i := range 8 {
		mustPublish(t, q, "chat", []byte{byte(i)}, t0)
	}
	for _, c := range []struct {
		recent uint32
		want   []uint64
	}{
		{0, []uint64{}},
		{1, []uint64{8}},
		{3, []uint64{6, 7, 8}},
		{5, offsetRange(4, 8)},
		{6, offsetRange(4, 8)},
		{1 << 31, offsetRange(4, 8)},
	} {
		j := mustJoin(t, q, sub(fmt.Sprint("s", c.recent), "gw1"), t0, recentSpec("chat", c.recent))
		ms := j.GetMounts()[0]
		if got := offsetsOf(ms.GetHistory()); !slices.Equal(got, c.want) || ms.GetMissed() {
			t.Errorf("recent %d: replayed %v missed %v, want %v missed false", c.recent, got, ms.GetMissed(), c.want)
		}
	}
	// A plain join of a fresh mount replays nothing.
	j := mustJoin(t, q, sub("plain", "gw1"), t0, msgSpec("new"))
	if ms := j.GetMounts()[0]; len(ms.GetHistory()) != 0 || ms.GetMissed() || ms.GetKind() != imqpb.MountKind_MESSAGE || ms.GetName() != "new" {
		t.Errorf("plain join: %v", ms)
	}
}

func TestStateSnapshot(t *testing.T) {
	q := newTestQueue(t, nil)
	now := t0
	mustPublish(t, q, "chat", []byte("x"), now) // offset 1: versions share the queue's order
	vc := mustSetState(t, q, "score", "carol", []byte("3"), false, now).GetVersion()
	va := mustSetState(t, q, "score", "alice", []byte("1"), false, now).GetVersion()
	mustSetState(t, q, "score", "bob", []byte("2"), false, now)
	ch := mustSetState(t, q, "score", "bob", []byte("20"), false, now)
	vb := ch.GetVersion()
	if ch.GetQueue() != testQueue || ch.GetMount() != "score" || ch.GetKey() != "bob" || string(ch.GetValue()) != "20" ||
		ch.GetDeleted() || ch.GetSender() != "alice" || ch.GetTimeMs() != now.UnixMilli() {
		t.Fatalf("change = %v", ch)
	}

	type entry struct {
		Key     string
		Value   string
		Version uint64
	}
	snapshot := func() []entry {
		t.Helper()
		j := mustJoin(t, q, sub("s1", "gw1"), now, stateSpec("score"))
		ms := j.GetMounts()[0]
		if ms.GetKind() != imqpb.MountKind_STATE || len(ms.GetHistory()) != 0 || ms.GetMissed() {
			t.Fatalf("state mount state = %v", ms)
		}
		out := []entry{}
		for _, e := range ms.GetState() {
			if e.GetVersion() > j.GetHead() {
				t.Fatalf("entry %q version %d is beyond head %d", e.GetKey(), e.GetVersion(), j.GetHead())
			}
			out = append(out, entry{e.GetKey(), string(e.GetValue()), e.GetVersion()})
		}
		return out
	}

	if got, want := snapshot(), []entry{{"alice", "1", va}, {"bob", "20", vb}, {"carol", "3", vc}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot = %v, want %v", got, want)
	}

	del := mustSetState(t, q, "score", "alice", nil, true, now)
	if del == nil || !del.GetDeleted() || del.GetKey() != "alice" || del.GetValue() != nil || del.GetVersion() != q.Head() {
		t.Fatalf("delete change = %v", del)
	}
	if got, want := snapshot(), []entry{{"bob", "20", vb}, {"carol", "3", vc}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot after delete = %v, want %v", got, want)
	}

	head := q.Head()
	for _, key := range []string{"alice", "nobody"} {
		ch, err := q.SetState("score", "alice", key, nil, true, now)
		if err != nil || ch != nil {
			t.Fatalf("delete absent %q = %v, %v; want nil, nil", key, ch, err)
		}
		if q.Head() != head {
			t.Fatalf("delete absent %q consumed an offset: head %d, was %d", key, q.Head(), head)
		}
	}

	before := snapshot()
	later := mustSetState(t, q, "score", "dave", []byte("4"), false, now)
	for _, e := range before {
		if later.GetVersion() <= e.Version {
			t.Fatalf("later change version %d is not above snapshot entry %v", later.GetVersion(), e)
		}
	}
	if got := snapshot(); len(got) != 3 || got[2] != (entry{"dave", "4", later.GetVersion()}) {
		t.Fatalf("snapshot = %v", got)
	}

	// An empty state mount answers an empty snapshot.
	j := mustJoin(t, q, sub("s2", "gw1"), now, stateSpec("empty"))
	if len(j.GetMounts()[0].GetState()) != 0 {
		t.Fatalf("empty mount snapshot = %v", j.GetMounts()[0].GetState())
	}
}

func TestLimits(t *testing.T) {
	bad := []byte("0123456789")
	pub := func(mount string, n int) func(*Queue) error {
		return func(q *Queue) error { _, err := q.Publish(mount, "alice", bad[:n], at(time.Second)); return err }
	}
	set := func(mount, key string, n int) func(*Queue) error {
		return func(q *Queue) error {
			_, err := q.SetState(mount, "alice", key, bytes.Repeat([]byte("v"), n), false, at(time.Second))
			return err
		}
	}
	join := func(session string, specs ...*imqpb.MountSpec) func(*Queue) error {
		return func(q *Queue) error { _, err := q.Join(sub(session, "gw2"), specs, at(time.Second)); return err }
	}
	// setup runs before the operation; every queue starts with s1@gw1 on
	// chat (message) and score (state) and one event and one key.
	setup := func(ops ...func(*Queue) error) func(*testing.T, *Queue) {
		return func(t *testing.T, q *Queue) {
			t.Helper()
			for i, op := range ops {
				if err := op(q); err != nil {
					t.Fatalf("setup %d: %v", i, err)
				}
			}
		}
	}
	del := func(mount, key string) func(*Queue) error {
		return func(q *Queue) error { _, err := q.SetState(mount, "alice", key, nil, true, t0); return err }
	}
	long := strings.Repeat("m", 65)

	for _, c := range []struct {
		name   string
		limits func(*Limits)
		setup  func(*testing.T, *Queue)
		op     func(*Queue) error
		want   imqpb.Code
	}{
		{name: "payload at limit", limits: func(l *Limits) { l.MaxPayload = 8 }, op: pub("chat", 8), want: imqpb.Code_OK},
		{name: "payload too large", limits: func(l *Limits) { l.MaxPayload = 8 }, op: pub("chat", 9), want: imqpb.Code_PAYLOAD_TOO_LARGE},
		{name: "payload too large on new mount", limits: func(l *Limits) { l.MaxPayload = 8 }, op: pub("new", 9), want: imqpb.Code_PAYLOAD_TOO_LARGE},
		{name: "state value at limit", limits: func(l *Limits) { l.MaxStateValue = 8 }, op: set("score", "k", 8), want: imqpb.Code_OK},
		{name: "state value too large", limits: func(l *Limits) { l.MaxStateValue = 8 }, op: set("score", "k", 9), want: imqpb.Code_PAYLOAD_TOO_LARGE},
		{name: "state keys at limit", limits: func(l *Limits) { l.MaxStateKeys = 2 }, op: set("score", "k2", 1), want: imqpb.Code_OK},
		{name: "too many state keys", limits: func(l *Limits) { l.MaxStateKeys = 2 }, setup: setup(set("score", "k2", 1)), op: set("score", "k3", 1), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "update existing key at key limit", limits: func(l *Limits) { l.MaxStateKeys = 2 }, setup: setup(set("score", "k2", 1)), op: set("score", "k2", 5), want: imqpb.Code_OK},
		{name: "add key after delete at key limit", limits: func(l *Limits) { l.MaxStateKeys = 2 }, setup: setup(set("score", "k2", 1), del("score", "k2")), op: set("score", "k3", 1), want: imqpb.Code_OK},
		// score already holds key "k" with a 1-byte value: 2 bytes.
		{name: "state bytes at limit", limits: func(l *Limits) { l.MaxStateBytes = 10 }, op: set("score", "ab", 6), want: imqpb.Code_OK},
		{name: "state bytes exceeded by new key", limits: func(l *Limits) { l.MaxStateBytes = 10 }, op: set("score", "ab", 7), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "state bytes exceeded by growing value", limits: func(l *Limits) { l.MaxStateBytes = 10 }, op: set("score", "k", 10), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "state bytes: grow value to limit", limits: func(l *Limits) { l.MaxStateBytes = 10 }, op: set("score", "k", 9), want: imqpb.Code_OK},
		{name: "state bytes freed by delete", limits: func(l *Limits) { l.MaxStateBytes = 10 }, setup: setup(del("score", "k")), op: set("score", "ab", 8), want: imqpb.Code_OK},
		{name: "state bytes freed by shrinking", limits: func(l *Limits) { l.MaxStateBytes = 10 },
			setup: setup(set("score", "k", 9), set("score", "k", 0)), op: set("score", "ab", 6), want: imqpb.Code_OK},
		{name: "too many mounts: publish", limits: func(l *Limits) { l.MaxMounts = 2 }, op: pub("third", 1), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "too many mounts: set state", limits: func(l *Limits) { l.MaxMounts = 2 }, op: set("third", "k", 1), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "too many mounts: join", limits: func(l *Limits) { l.MaxMounts = 2 }, op: join("s2", msgSpec("chat"), msgSpec("third")), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "too many mounts: rejoin", limits: func(l *Limits) { l.MaxMounts = 2 }, op: join("s1", msgSpec("third")), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "too many mounts in one join", limits: func(l *Limits) { l.MaxMounts = 2 }, op: join("s2", msgSpec("chat"), stateSpec("score"), msgSpec("third")), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "existing mounts at mount limit", limits: func(l *Limits) { l.MaxMounts = 2 }, op: join("s2", msgSpec("chat"), stateSpec("score")), want: imqpb.Code_OK},
		{name: "publish to existing mount at mount limit", limits: func(l *Limits) { l.MaxMounts = 2 }, op: pub("chat", 1), want: imqpb.Code_OK},
		{name: "subscribers at limit", limits: func(l *Limits) { l.MaxSubscribers = 2 }, op: join("s2", msgSpec("chat")), want: imqpb.Code_OK},
		{name: "too many subscribers", limits: func(l *Limits) { l.MaxSubscribers = 2 }, setup: setup(join("s2", msgSpec("chat"))), op: join("s3", msgSpec("chat")), want: imqpb.Code_LIMIT_EXCEEDED},
		{name: "rejoin at subscriber limit", limits: func(l *Limits) { l.MaxSubscribers = 2 }, setup: setup(join("s2", msgSpec("chat"))), op: join("s1", msgSpec("other")), want: imqpb.Code_OK},
		{name: "publish to state mount", op: pub("score", 1), want: imqpb.Code_WRONG_MOUNT_TYPE},
		{name: "set state on message mount", op: set("chat", "k", 1), want: imqpb.Code_WRONG_MOUNT_TYPE},
		{name: "join message mount as state", op: join("s2", stateSpec("chat")), want: imqpb.Code_WRONG_MOUNT_TYPE},
		{name: "join state mount as message", op: join("s2", msgSpec("fresh"), msgSpec("score")), want: imqpb.Code_WRONG_MOUNT_TYPE},
		{name: "rejoin with wrong kind", op: join("s1", msgSpec("score")), want: imqpb.Code_WRONG_MOUNT_TYPE},
		{name: "publish: empty mount name", op: pub("", 1), want: imqpb.Code_INVALID_MOUNT},
		{name: "publish: mount name with space", op: pub("a b", 1), want: imqpb.Code_INVALID_MOUNT},
		{name: "publish: mount name too long", op: pub(long, 1), want: imqpb.Code_INVALID_MOUNT},
		{name: "set state: mount name with slash", op: set("a/b", "k", 1), want: imqpb.Code_INVALID_MOUNT},
		{name: "set state: unicode mount name", op: set("é", "k", 1), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: bad mount name", op: join("s2", msgSpec("ok"), msgSpec("bad name")), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: too long mount name", op: join("s2", stateSpec(long)), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: unspecified kind", op: join("s2", &imqpb.MountSpec{Name: "x"}), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: unknown kind", op: join("s2", &imqpb.MountSpec{Name: "x", Kind: 9}), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: duplicate mount", op: join("s2", msgSpec("x"), msgSpec("x")), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: duplicate mount of two kinds", op: join("s2", msgSpec("x"), stateSpec("y"), stateSpec("x")), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: empty mount list", op: join("s2"), want: imqpb.Code_INVALID_MOUNT},
		{name: "rejoin: empty mount list", op: join("s1"), want: imqpb.Code_INVALID_MOUNT},
		{name: "join: nil spec", op: join("s2", nil), want: imqpb.Code_INVALID_MOUNT},
		{name: "state key empty", op: set("score", "", 1), want: imqpb.Code_BAD_REQUEST},
		{name: "state key with NUL", op: set("score", "a\x00", 1), want: imqpb.Code_BAD_REQUEST},
		{name: "state key with newline", op: set("score", "a\nb", 1), want: imqpb.Code_BAD_REQUEST},
		{name: "state key not UTF-8", op: set("score", "\xff", 1), want: imqpb.Code_BAD_REQUEST},
		{name: "state key too long", op: set("score", strings.Repeat("k", 257), 1), want: imqpb.Code_BAD_REQUEST},
		{name: "delete with bad key", op: func(q *Queue) error { _, err := q.SetState("score", "", "", nil, true, t0); return err }, want: imqpb.Code_BAD_REQUEST},
		{name: "resume on state mount", op: join("s2", &imqpb.MountSpec{Name: "score", Kind: imqpb.MountKind_STATE, Resume: &imqpb.Position{Epoch: testEpoch}}), want: imqpb.Code_BAD_REQUEST},
		{name: "recent on state mount", op: join("s2", &imqpb.MountSpec{Name: "new", Kind: imqpb.MountKind_STATE, Recent: 3}), want: imqpb.Code_BAD_REQUEST},
		{name: "resume beyond head", op: join("s2", msgSpec("new"), resumeSpec("chat", testEpoch, 3)), want: imqpb.Code_BAD_REQUEST},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := testLimits()
			if c.limits != nil {
				c.limits(l)
			}
			q := newTestQueue(t, l)
			mustJoin(t, q, sub("s1", "gw1"), t0, msgSpec("chat"), stateSpec("score"))
			mustPublish(t, q, "chat", []byte("e"), t0)
			mustSetState(t, q, "score", "k", []byte("v"), false, t0)
			if c.setup != nil {
				c.setup(t, q)
			}
			before := viewOf(q)
			err := c.op(q)
			wantCode(t, err, c.want)
			if err == nil {
				return
			}
			if after := viewOf(q); !reflect.DeepEqual(before, after) {
				t.Fatalf("failed call changed the queue:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
}

func TestGatewayRefs(t *testing.T) {
	q := newTestQueue(t, nil)
	now := t0
	check := func(step string, want map[string][]string) {
		t.Helper()
		for mount, gws := range want {
			if got := gatewaysOf(t, q, mount); !slices.Equal(got, gws) {
				t.Errorf("%s: gateways of %s = %v, want %v", step, mount, got, gws)
			}
		}
	}
	mustJoin(t, q, sub("s1", "gwA"), now, msgSpec("chat"), stateSpec("score"))
	mustJoin(t, q, sub("s2", "gwA"), now, msgSpec("chat"))
	mustJoin(t, q, sub("s3", "gwB"), now, msgSpec("input"))
	mustJoin(t, q, sub("s4", "gwB"), now, msgSpec("chat"), msgSpec("input"))
	check("joined", map[string][]string{
		"chat":    {"gwA", "gwB"},
		"score":   {"gwA"},
		"input":   {"gwB"},
		"nothing": {},
	})
	if q.Subscribers() != 4 {
		t.Fatalf("Subscribers() = %d, want 4", q.Subscribers())
	}

	if !q.Leave("s1", now) {
		t.Fatal("Leave(s1) = false")
	}
	if q.Leave("s1", now) || q.Leave("nobody", now) {
		t.Fatal("Leave of a session not joined = true")
	}
	check("s1 left", map[string][]string{"chat": {"gwA", "gwB"}, "score": {}, "input": {"gwB"}})

	// s2 rejoins with other mounts: its chat ref goes, and gwA leaves chat.
	mustJoin(t, q, sub("s2", "gwA"), now, msgSpec("input"), stateSpec("score"))
	check("s2 rejoined", map[string][]string{"chat": {"gwB"}, "score": {"gwA"}, "input": {"gwA", "gwB"}})

	// s4 rejoins through another gateway (a reconnect elsewhere).
	mustJoin(t, q, sub("s4", "gwC"), now, msgSpec("chat"))
	check("s4 moved", map[string][]string{"chat": {"gwC"}, "input": {"gwA", "gwB"}})

	// Rejoining with the same mounts does not count a gateway twice.
	for range 3 {
		mustJoin(t, q, sub("s3", "gwB"), now, msgSpec("input"))
	}
	if n := q.RemoveGateway("gwB", now, nil); n != 1 {
		t.Fatalf("RemoveGateway(gwB) = %d, want 1", n)
	}
	check("gwB removed", map[string][]string{"chat": {"gwC"}, "score": {"gwA"}, "input": {"gwA"}})
	if n := q.RemoveGateway("gwB", now, nil); n != 0 {
		t.Fatalf("RemoveGateway(gwB) again = %d, want 0", n)
	}
	if got := q.SubscriberList(); !reflect.DeepEqual(got, []Subscriber{sub("s2", "gwA"), sub("s4", "gwC")}) {
		t.Fatalf("SubscriberList() = %v", got)
	}

	q.Leave("s2", now)
	q.Leave("s4", now)
	check("all left", map[string][]string{"chat": {}, "score": {}, "input": {}})
	if q.Subscribers() != 0 {
		t.Fatalf("Subscribers() = %d, want 0", q.Subscribers())
	}
	for name, m := range q.mounts {
		if len(m.gateways) != 0 {
			t.Errorf("mount %s still counts gateways %v", name, m.gateways)
		}
	}
}

func TestGatewayRefsManySubscribers(t *testing.T) {
	q := newTestQueue(t, nil)
	for i := range 20 {
		mustJoin(t, q, sub(fmt.Sprint("s", i), fmt.Sprint("gw", i%3)), t0, msgSpec("chat"))
	}
	if got := gatewaysOf(t, q, "chat"); !slices.Equal(got, []string{"gw0", "gw1", "gw2"}) {
		t.Fatalf("gateways = %v", got)
	}
	// gw1 keeps chat until its last subscriber leaves.
	for i := 1; i < 20; i += 3 {
		if got := gatewaysOf(t, q, "chat"); !slices.Contains(got, "gw1") {
			t.Fatalf("gw1 dropped from chat before its last subscriber left: %v", got)
		}
		q.Leave(fmt.Sprint("s", i), t0)
	}
	if got := gatewaysOf(t, q, "chat"); !slices.Equal(got, []string{"gw0", "gw2"}) {
		t.Fatalf("gateways after gw1's subscribers left = %v", got)
	}
	if n := q.RemoveGateway("gw0", t0, nil); n != 7 {
		t.Fatalf("RemoveGateway(gw0) = %d, want 7", n)
	}
	if got := gatewaysOf(t, q, "chat"); !slices.Equal(got, []string{"gw2"}) {
		t.Fatalf("gateways after removing gw0 = %v", got)
	}
}

func TestExpireIdle(t *testing.T) {
	const ttl = time.Minute
	q := newTestQueue(t, nil) // created at t0
	for _, c := range []struct {
		step string
		do   func()
		now  time.Duration
		idle bool
	}{
		{"fresh, before ttl", nil, 59 * time.Second, false},
		{"fresh, at ttl", nil, 60 * time.Second, true},
		{"joined", func() { mustJoin(t, q, sub("s1", "gw1"), at(70*time.Second), msgSpec("chat")) }, 70 * time.Second, false},
		{"joined, long after", nil, 10 * time.Hour, false},
		{"left", func() { q.Leave("s1", at(100*time.Second)) }, 159 * time.Second, false},
		{"left, ttl later", nil, 160 * time.Second, true},
		{"published", func() { mustPublish(t, q, "chat", nil, at(200*time.Second)) }, 259 * time.Second, false},
		{"published, ttl later", nil, 260 * time.Second, true},
		{"state set", func() { mustSetState(t, q, "score", "k", nil, false, at(300*time.Second)) }, 359 * time.Second, false},
		{"state set, ttl later", nil, 360 * time.Second, true},
		{"joined again", func() { mustJoin(t, q, sub("s2", "gw2"), at(400*time.Second), msgSpec("chat")) }, 500 * time.Second, false},
		{"gateway removed", func() { q.RemoveGateway("gw2", at(500*time.Second), nil) }, 559 * time.Second, false},
		{"gateway removed, ttl later", nil, 560 * time.Second, true},
	} {
		if c.do != nil {
			c.do()
		}
		if got := q.Expire(at(c.now), ttl); got != c.idle {
			t.Fatalf("%s: Expire(t0+%v) = %v, want %v", c.step, c.now, got, c.idle)
		}
	}
}

// modelEvent is one publish as the model remembers it.
type modelEvent struct {
	mount   string
	offset  uint64
	timeMs  int64
	payload []byte
}

// queueModel is the simplest possible account of a queue's message mounts: a
// full log of every event. What a queue must retain and replay is computed
// from the log by the documented rules.
type queueModel struct {
	lim Limits
	log []modelEvent
}

// window returns the events of mount the queue must still hold at now (the
// newest HistoryLen of them, younger than HistoryAge) and the offset of the
// newest one it dropped (0: none).
func (m *queueModel) window(mount string, now time.Time) (kept []modelEvent, newestEvicted uint64) {
	var all []modelEvent
	for _, e := range m.log {
		if e.mount == mount {
			all = append(all, e)
		}
	}
	start := max(0, len(all)-m.lim.HistoryLen)
	if m.lim.HistoryAge > 0 {
		cutoff := now.Add(-m.lim.HistoryAge).UnixMilli()
		for start < len(all) && all[start].timeMs <= cutoff {
			start++
		}
	}
	if start > 0 {
		newestEvicted = all[start-1].offset
	}
	return all[start:], newestEvicted
}

// join returns, per spec, the offsets a join must replay and whether it must
// report missed, spending the replay budget across the specs in order.
func (m *queueModel) join(specs []*imqpb.MountSpec, epoch uint64, now time.Time) (replays [][]uint64, missed []bool) {
	budget := m.lim.MaxReplayBytes
	for _, s := range specs {
		kept, evicted := m.window(s.GetName(), now)
		var cand []modelEvent
		miss := false
		switch r := s.GetResume(); {
		case r != nil && r.GetEpoch() != epoch:
			cand, miss = kept, true
		case r != nil:
			for _, e := range kept {
				if e.offset > r.GetOffset() {
					cand = append(cand, e)
				}
			}
			miss = r.GetOffset() < evicted
		case s.GetRecent() > 0:
			cand = kept[max(0, len(kept)-int(s.GetRecent())):]
		}
		start := len(cand)
		cost := func(e modelEvent) int { return len(e.payload) + len("bot") + entryOverhead }
		for start > 0 && budget >= cost(cand[start-1]) {
			start--
			budget -= cost(cand[start])
		}
		if start > 0 && s.GetResume() != nil {
			miss = true
		}
		out := []uint64{}
		for _, e := range cand[start:] {
			out = append(out, e.offset)
		}
		replays = append(replays, out)
		missed = append(missed, miss)
	}
	return replays, missed
}

func TestResumeMatchesModel(t *testing.T) {
	mounts := []string{"a", "b", "c"}
	for seed := range uint64(300) {
		rng := rand.New(rand.NewPCG(seed, 0x1a2b))
		lim := *testLimits()
		lim.HistoryLen = 1 + rng.IntN(8)
		if rng.IntN(2) == 0 {
			lim.HistoryAge = time.Duration(1+rng.IntN(5)) * time.Second
		}
		lim.MaxReplayBytes = 10 + rng.IntN(300)
		q := NewQueue(testQueue, testEpoch, &lim, t0)
		model := &queueModel{lim: lim}
		now := t0
		for step := range 200 {
			switch r := rng.IntN(100); {
			case r < 55:
				mount := mounts[rng.IntN(len(mounts))]
				payload := make([]byte, rng.IntN(16))
				for i := range payload {
					payload[i] = byte(rng.Uint32())
				}
				ev, err := q.Publish(mount, "bot", payload, now)
				if err != nil {
					t.Fatalf("seed %d step %d: publish: %v", seed, step, err)
				}
				want := uint64(len(model.log) + 1)
				if ev.GetOffset() != want || q.Head() != want {
					t.Fatalf("seed %d step %d: offset %d head %d, want %d", seed, step, ev.GetOffset(), q.Head(), want)
				}
				model.log = append(model.log, modelEvent{mount, ev.GetOffset(), ev.GetTimeMs(), payload})
			case r < 65:
				now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
			case r < 70:
				q.Expire(now, time.Hour)
			default:
				var specs []*imqpb.MountSpec
				for _, i := range rng.Perm(len(mounts))[:1+rng.IntN(len(mounts))] {
					spec := msgSpec(mounts[i])
					switch k := rng.IntN(10); {
					case k < 7:
						spec.Resume = &imqpb.Position{Epoch: testEpoch, Offset: rng.Uint64N(q.Head() + 1)}
					case k < 8:
						spec.Resume = &imqpb.Position{Epoch: testEpoch + 1 + rng.Uint64N(3), Offset: rng.Uint64N(q.Head() + 5)}
					case k < 9:
						spec.Recent = uint32(rng.IntN(10))
					}
					specs = append(specs, spec)
				}
				j, err := q.Join(sub("s1", "gw1"), specs, now)
				if err != nil {
					t.Fatalf("seed %d step %d: join: %v", seed, step, err)
				}
				if j.GetHead() != uint64(len(model.log)) {
					t.Fatalf("seed %d step %d: joined head %d, want %d", seed, step, j.GetHead(), len(model.log))
				}
				replays, missed := model.join(specs, testEpoch, now)
				for i, ms := range j.GetMounts() {
					got := offsetsOf(ms.GetHistory())
					if !slices.Equal(got, replays[i]) || ms.GetMissed() != missed[i] {
						t.Fatalf("seed %d step %d: join %v: mount %s replayed %v missed %v, want %v missed %v",
							seed, step, specs[i], ms.GetName(), got, ms.GetMissed(), replays[i], missed[i])
					}
					for _, ev := range ms.GetHistory() {
						want := model.log[ev.GetOffset()-1]
						if ev.GetMount() != want.mount || !bytes.Equal(ev.GetPayload(), want.payload) || ev.GetTimeMs() != want.timeMs {
							t.Fatalf("seed %d step %d: replayed event %v, want %+v", seed, step, ev, want)
						}
					}
				}
			}
		}
	}
}

func TestDisposable(t *testing.T) {
	limits := DefaultLimits()
	now := time.Unix(1_700_000_000, 0)
	sub := Subscriber{User: "u", Session: "s1", Gateway: "g"}
	chat := []*imqpb.MountSpec{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}}

	q := NewQueue("/room/d", 1, &limits, now)
	if !q.Disposable() {
		t.Fatal("a new queue with nothing in it is not disposable")
	}
	if _, err := q.Join(sub, chat, now); err != nil {
		t.Fatal(err)
	}
	if q.Disposable() {
		t.Fatal("a queue with a subscriber is disposable")
	}
	q.Leave("s1", now)
	if !q.Disposable() {
		t.Fatal("a queue joined and left without traffic is not disposable")
	}
	if _, err := q.Publish("chat", "u", []byte("x"), now); err != nil {
		t.Fatal(err)
	}
	if q.Disposable() {
		t.Fatal("a queue with history is disposable")
	}

	s := NewQueue("/room/s", 1, &limits, now)
	if _, err := s.SetState("scores", "u", "k", []byte("1"), false, now); err != nil {
		t.Fatal(err)
	}
	if s.Disposable() {
		t.Fatal("a queue with state is disposable")
	}
	if _, err := s.SetState("scores", "u", "k", nil, true, now); err != nil {
		t.Fatal(err)
	}
	if !s.Disposable() {
		t.Fatal("a queue whose only key was deleted is not disposable")
	}
}

func TestJoinBytesBound(t *testing.T) {
	l := testLimits()
	l.MaxJoinBytes = 4096
	l.MaxReplayBytes = 1024
	q := newTestQueue(t, l)
	big := bytes.Repeat([]byte("v"), 1000)
	for _, k := range []string{"a", "b", "c"} {
		if _, err := q.SetState("s1", "u", k, big, false, t0); err != nil {
			t.Fatal(err)
		}
		if _, err := q.SetState("s2", "u", k, big, false, t0); err != nil {
			t.Fatal(err)
		}
	}
	one := []*imqpb.MountSpec{{Name: "s1", Kind: imqpb.MountKind_STATE}}
	both := append(one, &imqpb.MountSpec{Name: "s2", Kind: imqpb.MountKind_STATE})
	if _, err := q.Join(sub("s1", "gw1"), one, t0); err != nil {
		t.Fatalf("join of one state mount (about 3 KB): %v", err)
	}
	_, err := q.Join(sub("s2", "gw1"), both, t0)
	if code := imqerr.CodeOf(err); code != imqpb.Code_LIMIT_EXCEEDED {
		t.Fatalf("join of two state mounts (about 6 KB, limit 4 KiB): %v, want LIMIT_EXCEEDED", err)
	}
	if q.Subscribers() != 1 {
		t.Fatalf("a refused join added a subscriber")
	}
}

func TestGateways(t *testing.T) {
	q := newTestQueue(t, nil)
	if gws := q.Gateways(); len(gws) != 0 {
		t.Fatalf("empty queue: Gateways() = %v", gws)
	}
	mustJoin(t, q, sub("s1", "gw-b/1"), t0, msgSpec("chat"), stateSpec("score"))
	mustJoin(t, q, sub("s2", "gw-b/1"), t0, msgSpec("input"))
	mustJoin(t, q, sub("s3", "gw-a/2"), t0, stateSpec("score"))
	if got, want := q.Gateways(), []string{"gw-a/2", "gw-b/1"}; !slices.Equal(got, want) {
		t.Fatalf("Gateways() = %v, want %v", got, want)
	}
	q.Leave("s3", t0)
	if got, want := q.Gateways(), []string{"gw-b/1"}; !slices.Equal(got, want) {
		t.Fatalf("after the leave: Gateways() = %v, want %v", got, want)
	}
}

func TestGetState(t *testing.T) {
	q := newTestQueue(t, nil)
	mustPublish(t, q, "chat", []byte("x"), t0)
	vb := mustSetState(t, q, "score", "bob", []byte("2"), false, t0).GetVersion()
	va := mustSetState(t, q, "score", "alice", []byte("1"), false, t0).GetVersion()
	before := viewOf(q)
	keysOf := func(snap *imqpb.StateSnapshot) []string {
		out := []string{}
		for _, e := range snap.GetEntries() {
			out = append(out, fmt.Sprintf("%s=%s@%d", e.GetKey(), e.GetValue(), e.GetVersion()))
		}
		return out
	}
	for _, c := range []struct {
		name string
		keys []string
		want []string
	}{
		{"all", nil, []string{fmt.Sprint("alice=1@", va), fmt.Sprint("bob=2@", vb)}},
		{"some, duplicated and missing", []string{"bob", "nobody", "bob"}, []string{fmt.Sprint("bob=2@", vb)}},
		{"none set", []string{"nobody"}, []string{}},
	} {
		snap, err := q.GetState("score", c.keys)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if snap.GetEpoch() != testEpoch || snap.GetHead() != q.Head() {
			t.Fatalf("%s: epoch %d head %d, want %d %d", c.name, snap.GetEpoch(), snap.GetHead(), testEpoch, q.Head())
		}
		if got := keysOf(snap); !slices.Equal(got, c.want) {
			t.Fatalf("%s: entries %v, want %v", c.name, got, c.want)
		}
	}
	for _, c := range []struct {
		mount string
		keys  []string
		want  imqpb.Code
	}{
		{"nothing", nil, imqpb.Code_NOT_FOUND},
		{"chat", nil, imqpb.Code_WRONG_MOUNT_TYPE},
		{"bad mount!", nil, imqpb.Code_INVALID_MOUNT},
		{"score", []string{""}, imqpb.Code_BAD_REQUEST},
	} {
		_, err := q.GetState(c.mount, c.keys)
		wantCode(t, err, c.want)
	}
	if !reflect.DeepEqual(viewOf(q), before) {
		t.Fatal("reads changed the queue")
	}
	if q.StateKeySet("score", "alice") != true || q.StateKeySet("score", "nobody") || q.StateKeySet("nothing", "alice") {
		t.Fatal("StateKeySet is wrong")
	}

	l := testLimits()
	l.MaxJoinBytes = 100
	small := newTestQueue(t, l)
	mustSetState(t, small, "score", "k", bytes.Repeat([]byte("v"), 80), false, t0)
	if _, err := small.GetState("score", nil); imqerr.CodeOf(err) != imqpb.Code_LIMIT_EXCEEDED {
		t.Fatalf("GetState over MaxJoinBytes: %v, want LIMIT_EXCEEDED", err)
	}
}

func TestHistoryPaging(t *testing.T) {
	l := testLimits()
	l.HistoryLen = 20
	q := newTestQueue(t, l)
	// chat gets offsets 1, 3, 5, ..., 49; input the even ones. chat keeps the
	// last 20 (11..49), having evicted 1..9.
	for i := range 50 {
		mount := "chat"
		if i%2 == 1 {
			mount = "input"
		}
		mustPublish(t, q, mount, []byte("x"), t0)
	}
	odd := func(from, to uint64) []uint64 {
		out := []uint64{}
		for o := from; o <= to; o += 2 {
			out = append(out, o)
		}
		return out
	}
	for _, c := range []struct {
		name         string
		since        uint64
		limit        int
		want         []uint64
		missed, more bool
	}{
		{"from the start, evicted", 0, 0, odd(11, 49), true, false},
		{"just before the oldest retained", 9, 0, odd(11, 49), false, false},
		{"inside the evicted range", 8, 0, odd(11, 49), true, false},
		{"one page", 9, 5, odd(11, 19), false, true},
		{"next page", 19, 5, odd(21, 29), false, true},
		{"last page", 39, 5, odd(41, 49), false, false},
		{"after another mount's event", 40, 5, odd(41, 49), false, false},
		{"at head", 50, 0, []uint64{}, false, false},
		{"beyond head", 99, 0, []uint64{}, false, false},
	} {
		page, err := q.History("chat", c.since, c.limit, t0)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := offsetsOf(page.GetEvents()); !slices.Equal(got, c.want) || page.GetMissed() != c.missed || page.GetMore() != c.more {
			t.Fatalf("%s: events %v missed %v more %v; want %v %v %v", c.name, got, page.GetMissed(), page.GetMore(), c.want, c.missed, c.more)
		}
		if page.GetEpoch() != testEpoch || page.GetHead() != 50 {
			t.Fatalf("%s: epoch %d head %d", c.name, page.GetEpoch(), page.GetHead())
		}
	}
	for _, c := range []struct {
		mount string
		want  imqpb.Code
	}{{"nothing", imqpb.Code_NOT_FOUND}, {"bad mount!", imqpb.Code_INVALID_MOUNT}} {
		_, err := q.History(c.mount, 0, 0, t0)
		wantCode(t, err, c.want)
	}
	mustSetState(t, q, "score", "k", []byte("1"), false, t0)
	_, err := q.History("score", 0, 0, t0)
	wantCode(t, err, imqpb.Code_WRONG_MOUNT_TYPE)
}

func TestHistoryLimits(t *testing.T) {
	l := testLimits()
	l.HistoryLen = 2000
	q := newTestQueue(t, l)
	for range 1500 {
		mustPublish(t, q, "small", []byte("x"), t0)
	}
	for _, c := range []struct {
		limit, want int
	}{{0, DefaultHistoryLimit}, {-1, DefaultHistoryLimit}, {7, 7}, {5000, MaxHistoryLimit}} {
		page, err := q.History("small", 0, c.limit, t0)
		if err != nil || len(page.GetEvents()) != c.want || !page.GetMore() {
			t.Fatalf("limit %d: %d events, more %v, err %v; want %d, more", c.limit, len(page.GetEvents()), page.GetMore(), err, c.want)
		}
	}

	// The page's bytes are bounded too: 10 events of 100 bytes fit; an event
	// larger than the whole budget still comes alone.
	l = testLimits()
	l.HistoryLen = 100
	l.MaxReplayBytes = 10 * (100 + entryOverhead + len("alice"))
	q = newTestQueue(t, l)
	for range 25 {
		mustPublish(t, q, "big", bytes.Repeat([]byte("b"), 100), t0)
	}
	page, _ := q.History("big", 0, 1000, t0)
	if len(page.GetEvents()) != 10 || !page.GetMore() {
		t.Fatalf("byte-bounded page: %d events, more %v; want 10, more", len(page.GetEvents()), page.GetMore())
	}
	huge := mustPublish(t, q, "huge", bytes.Repeat([]byte("h"), l.MaxReplayBytes+1), t0)
	mustPublish(t, q, "huge", []byte("after"), t0)
	page, _ = q.History("huge", 0, 0, t0)
	if got := offsetsOf(page.GetEvents()); !slices.Equal(got, []uint64{huge.GetOffset()}) || !page.GetMore() {
		t.Fatalf("oversized first event: page %v more %v; want just %d, more", got, page.GetMore(), huge.GetOffset())
	}

	// Aged events are gone from history, and missed.
	l2 := testLimits()
	l2.HistoryAge = time.Minute
	aged := newTestQueue(t, l2)
	mustPublish(t, aged, "chat", []byte("old"), t0)
	fresh := mustPublish(t, aged, "chat", []byte("new"), at(50*time.Second))
	page, _ = aged.History("chat", 0, 0, at(90*time.Second))
	if got := offsetsOf(page.GetEvents()); !slices.Equal(got, []uint64{fresh.GetOffset()}) || !page.GetMissed() {
		t.Fatalf("after aging: %v missed %v; want [%d] missed", got, page.GetMissed(), fresh.GetOffset())
	}
}

func TestInfo(t *testing.T) {
	l := testLimits()
	q := NewQueue(testQueue, testEpoch, l, at(-time.Hour))
	for range 7 {
		mustPublish(t, q, "chat", []byte("x"), t0) // keeps 3..7 of 7
	}
	mustSetState(t, q, "score", "alice", []byte("10"), false, t0)
	mustSetState(t, q, "score", "bob", []byte("2"), false, t0)
	mustJoin(t, q, sub("s2", "gwB/7"), t0, msgSpec("chat"), stateSpec("score"))
	mustJoin(t, q, sub("s1", "gwA/1"), t0, msgSpec("chat"))
	mustJoin(t, q, sub("s3", "gwA/1"), t0, msgSpec("empty"))

	info := q.Info(t0)
	want := &imqpb.QueueInfoResult{
		Queue: testQueue, Epoch: testEpoch, Head: 9, CreatedMs: at(-time.Hour).UnixMilli(),
		Mounts: []*imqpb.MountInfo{
			{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Retained: 5, OldestOffset: 3},
			{Name: "empty", Kind: imqpb.MountKind_MESSAGE},
			{Name: "score", Kind: imqpb.MountKind_STATE, Keys: 2, Bytes: uint64(len("alice10bob2"))},
		},
		Subscribers: []*imqpb.SubscriberInfo{
			{User: "u-s1", Session: "s1", Gateway: "gwA/1", Mounts: []string{"chat"}},
			{User: "u-s2", Session: "s2", Gateway: "gwB/7", Mounts: []string{"chat", "score"}},
			{User: "u-s3", Session: "s3", Gateway: "gwA/1", Mounts: []string{"empty"}},
		},
		SubscribersTotal: 3,
	}
	if !proto.Equal(info, want) {
		t.Fatalf("Info() =\n%v\nwant\n%v", info, want)
	}

	// The subscriber list is bounded by MaxJoinBytes, first sessions first.
	l.MaxJoinBytes = len("u-s1s1gwA/1chat") + 2 + len("u-s2s2gwB/7chatscore") + 4 + 2*entryOverhead
	if got := q.Info(t0); len(got.GetSubscribers()) != 2 || got.GetSubscribersTotal() != 3 {
		t.Fatalf("bounded Info lists %d of %d subscribers, want 2 of 3", len(got.GetSubscribers()), got.GetSubscribersTotal())
	}
}

// TestHistoryBytes: HistoryBytes bounds each message mount's retained
// events by bytes, evicting the oldest (but never the newest), alongside
// HistoryLen; Bytes follows every change and resume reports exactly what
// was evicted.
func TestHistoryBytes(t *testing.T) {
	// Each event of n payload bytes counts n+37: the sender "alice" and
	// entryOverhead.
	cases := []struct {
		name          string
		historyLen    int
		historyBytes  int
		sizes         []int // eventBytes of each publish
		retained      []uint64
		newestEvicted uint64
		evicted       map[EvictReason]Evictions
	}{
		{"under the bound", 100, 1000, []int{100, 100, 100, 100, 100}, offsetRange(1, 5), 0, nil},
		{"at the bound", 100, 500, []int{100, 100, 100, 100, 100}, offsetRange(1, 5), 0, nil},
		{"one byte over", 100, 499, []int{100, 100, 100, 100, 100}, offsetRange(2, 5), 1,
			map[EvictReason]Evictions{EvictBytes: {1, 100}}},
		{"a large event evicts several", 100, 500, []int{100, 100, 100, 100, 300}, offsetRange(3, 5), 2,
			map[EvictReason]Evictions{EvictBytes: {2, 200}}},
		{"the newest is kept alone", 100, 200, []int{100, 100, 300}, []uint64{3}, 2,
			map[EvictReason]Evictions{EvictBytes: {2, 200}}},
		{"bytes before count", 3, 250, []int{100, 100, 100, 100, 100}, offsetRange(4, 5), 3,
			map[EvictReason]Evictions{EvictBytes: {3, 300}}},
		{"count before bytes", 2, 1000, []int{100, 100, 100, 100}, offsetRange(3, 4), 2,
			map[EvictReason]Evictions{EvictCount: {2, 200}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := testLimits()
			l.HistoryLen, l.HistoryBytes = c.historyLen, c.historyBytes
			q := newTestQueue(t, l)
			for i, n := range c.sizes {
				mustPublish(t, q, "chat", make([]byte, n-37), at(time.Duration(i)*time.Millisecond))
			}
			checkResume(t, q, "chat", at(time.Second), everyResumePoint(uint64(len(c.sizes)), c.retained, c.newestEvicted))
			want := QueueBytes(testQueue) + MountBytes("chat")
			for _, o := range c.retained {
				want += int64(c.sizes[o-1])
			}
			if q.Bytes() != want {
				t.Errorf("Bytes() = %d, want %d", q.Bytes(), want)
			}
			if q.HistoryBytes() != want-QueueBytes(testQueue)-MountBytes("chat") {
				t.Errorf("HistoryBytes() = %d, want %d", q.HistoryBytes(), want-QueueBytes(testQueue)-MountBytes("chat"))
			}
			got, ok := q.TakeEvictions()
			if ok != (len(c.evicted) > 0) {
				t.Errorf("TakeEvictions reports evictions: %v", ok)
			}
			for r := range numEvictReasons {
				if got[r] != c.evicted[r] {
					t.Errorf("evicted by %s: %+v, want %+v", r, got[r], c.evicted[r])
				}
			}
			if e, ok := q.TakeEvictions(); ok || e != [numEvictReasons]Evictions{} {
				t.Error("TakeEvictions did not reset")
			}
		})
	}
}

// TestQueueBytes: Bytes counts state entries and mounts too, and
// EvictOldest evicts the oldest events of every mount by time, as a resume
// then sees.
func TestQueueBytes(t *testing.T) {
	q := newTestQueue(t, nil)
	base := QueueBytes(testQueue)
	if q.Bytes() != base {
		t.Fatalf("empty queue: %d bytes, want %d", q.Bytes(), base)
	}
	mustSetState(t, q, "st", "key", []byte("12345"), false, at(0))
	want := base + MountBytes("st") + 3 + 5 + entryOverhead
	if q.Bytes() != want {
		t.Fatalf("after a set: %d, want %d", q.Bytes(), want)
	}
	mustSetState(t, q, "st", "key", []byte("1"), false, at(0))
	if want -= 4; q.Bytes() != want {
		t.Fatalf("after an overwrite: %d, want %d", q.Bytes(), want)
	}
	mustSetState(t, q, "st", "key", nil, true, at(0))
	if want = base + MountBytes("st"); q.Bytes() != want {
		t.Fatalf("after a delete: %d, want %d", q.Bytes(), want)
	}
	// chat at 0, 10, 20 ms; input at 5, 15 ms.
	for i, m := range []string{"chat", "input", "chat", "input", "chat"} {
		mustPublish(t, q, m, []byte("x"), at(time.Duration(i*5)*time.Millisecond))
	}
	var times []int64
	q.ForEachEvent(func(ms int64, b int) {
		if b != 1+5+entryOverhead {
			t.Fatalf("event of %d bytes", b)
		}
		times = append(times, ms-t0.UnixMilli())
	})
	if slices.Sort(times); !slices.Equal(times, []int64{0, 5, 10, 15, 20}) {
		t.Fatalf("ForEachEvent times %v", times)
	}
	cutoff := t0.UnixMilli() + 12
	freed := q.EvictOldest(func(ms int64, _ int) bool { return ms < cutoff })
	if freed != 3*(1+5+entryOverhead) {
		t.Fatalf("EvictOldest freed %d", freed)
	}
	if e, _ := q.TakeEvictions(); e[EvictNode].Events != 3 {
		t.Fatalf("node evictions %+v", e[EvictNode])
	}
	if h := q.HistoryBytes(); h != 2*(1+5+entryOverhead) {
		t.Fatalf("HistoryBytes after EvictOldest: %d", h)
	}
	checkResume(t, q, "chat", at(time.Second), everyResumePoint(q.Head(), []uint64{8}, 6))
	checkResume(t, q, "input", at(time.Second), everyResumePoint(q.Head(), []uint64{7}, 5))
}
