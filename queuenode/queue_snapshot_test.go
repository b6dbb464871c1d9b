package queuenode

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// snapshotLimits are small enough that random operations hit every limit
// and every kind of eviction often.
func snapshotLimits() *Limits {
	return &Limits{
		HistoryLen:     6,
		HistoryBytes:   260,
		HistoryAge:     10 * time.Second,
		MaxPayload:     40,
		MaxMounts:      4,
		MaxStateKeys:   4,
		MaxStateValue:  30,
		MaxStateBytes:  80,
		MaxSubscribers: 8,
		MaxReplayBytes: 150,
		MaxJoinBytes:   300,
	}
}

// roundTrip snapshots q (link keys "gw/serial" named by their gateway id),
// sends the snapshot through the wire encoding and restores it with
// limits at now, binding gateway g to link key g+"/"+serial except for
// those in unlinked.
func roundTrip(t *testing.T, q *Queue, limits *Limits, now time.Time, serial int, unlinked ...string) (*Queue, []Subscriber) {
	t.Helper()
	b, err := proto.Marshal(q.Snapshot(gatewayOfKey))
	if err != nil {
		t.Fatal(err)
	}
	var s imqpb.QueueSnapshot
	if err := proto.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	r, unbound, err := RestoreQueue(&s, limits, now, func(id string) (string, bool) {
		if slices.Contains(unlinked, id) {
			return "", false
		}
		return fmt.Sprintf("%s/%d", id, serial), true
	})
	if err != nil {
		t.Fatalf("RestoreQueue: %v", err)
	}
	return r, unbound
}

// twin is a queue and its restored copy, driven by the same operations.
// Their subscribers' link keys differ ("g1/1" and "g1/2"); everything they
// show is compared by gateway id.
type twin struct {
	t      *testing.T
	a, b   *Queue
	sa, sb int // the link serials of a's and b's keys
}

func (w *twin) keyA(gw string) string { return fmt.Sprintf("%s/%d", gw, w.sa) }
func (w *twin) keyB(gw string) string { return fmt.Sprintf("%s/%d", gw, w.sb) }

// same fails the test unless the two results are equal protos (or both
// nil) and the two errors say the same.
func (w *twin) same(what string, ra, rb proto.Message, ea, eb error) {
	w.t.Helper()
	if fmt.Sprint(ea) != fmt.Sprint(eb) || imqerr.CodeOf(ea) != imqerr.CodeOf(eb) {
		w.t.Fatalf("%s: errors differ:\n original %v\n restored %v", what, ea, eb)
	}
	if !proto.Equal(ra, rb) {
		w.t.Fatalf("%s: results differ:\n original %v\n restored %v", what, ra, rb)
	}
}

// gatewayIDs maps link keys to gateway ids, sorted.
func gatewayIDs(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = gatewayOfKey(k)
	}
	slices.Sort(out)
	return out
}

// compare fails the test unless everything observable about a and b is
// the same at now. It reads both the same way, so that what reads change
// (aging out history, a probe's join and leave) changes both alike.
func (w *twin) compare(what string, now time.Time, probes bool) {
	w.t.Helper()
	a, b := w.a, w.b
	if a.Name() != b.Name() || a.Epoch() != b.Epoch() || a.Head() != b.Head() || !a.Created().Equal(b.Created()) {
		w.t.Fatalf("%s: name/epoch/head/created %s/%d/%d/%v, restored %s/%d/%d/%v", what,
			a.Name(), a.Epoch(), a.Head(), a.Created(), b.Name(), b.Epoch(), b.Head(), b.Created())
	}
	// Before the probes below, which are activity.
	for _, ttl := range []time.Duration{0, 3 * time.Second, time.Hour} {
		if xa, xb := a.Expire(now, ttl), b.Expire(now, ttl); xa != xb {
			w.t.Fatalf("%s: Expire(ttl %v) %v, restored %v", what, ttl, xa, xb)
		}
	}
	ia, ib := a.Info(now), b.Info(now)
	for _, s := range append(slices.Clone(ia.Subscribers), ib.Subscribers...) {
		s.Gateway = gatewayOfKey(s.Gateway)
	}
	w.same(what+": Info", ia, ib, nil, nil)
	if a.Bytes() != b.Bytes() || a.HistoryBytes() != b.HistoryBytes() {
		w.t.Fatalf("%s: Bytes/HistoryBytes %d/%d, restored %d/%d", what, a.Bytes(), a.HistoryBytes(), b.Bytes(), b.HistoryBytes())
	}
	if a.Subscribers() != b.Subscribers() || a.Disposable() != b.Disposable() {
		w.t.Fatalf("%s: subscribers/disposable %d/%v, restored %d/%v", what, a.Subscribers(), a.Disposable(), b.Subscribers(), b.Disposable())
	}
	if ga, gb := gatewayIDs(a.Gateways()), gatewayIDs(b.Gateways()); !slices.Equal(ga, gb) {
		w.t.Fatalf("%s: gateways %v, restored %v", what, ga, gb)
	}
	for _, sb := range b.SubscriberList() {
		if sb.Gateway != w.keyB(gatewayOfKey(sb.Gateway)) {
			w.t.Fatalf("%s: restored subscriber %s is bound to %q, not this side's link key", what, sb.Session, sb.Gateway)
		}
	}
	ea, eb := a.TakeEvictions()
	fa, fb := b.TakeEvictions()
	if ea != fa || eb != fb {
		w.t.Fatalf("%s: evictions %v %v, restored %v %v", what, ea, eb, fa, fb)
	}
	for _, mi := range ia.Mounts {
		if ga, gb := gatewayIDs(gatewaysOf(w.t, a, mi.Name)), gatewayIDs(gatewaysOf(w.t, b, mi.Name)); !slices.Equal(ga, gb) {
			w.t.Fatalf("%s: gateways of %s %v, restored %v", what, mi.Name, ga, gb)
		}
		if mi.Kind == imqpb.MountKind_STATE {
			sa, erra := a.GetState(mi.Name, nil)
			sb, errb := b.GetState(mi.Name, nil)
			w.same(what+": GetState "+mi.Name, sa, sb, erra, errb)
			continue
		}
		for since := uint64(0); since <= a.Head()+1; since++ {
			limits := []int{0}
			if probes {
				limits = append(limits, 2) // short pages: more, and paging
			}
			for _, limit := range limits {
				pa, erra := a.History(mi.Name, since, limit, now)
				pb, errb := b.History(mi.Name, since, limit, now)
				w.same(fmt.Sprintf("%s: History %s since %d limit %d", what, mi.Name, since, limit), pa, pb, erra, errb)
			}
			if !probes {
				continue
			}
			// A resume from since (this epoch and another), joined and left
			// on both.
			for _, epoch := range []uint64{a.Epoch(), a.Epoch() + 1} {
				spec := resumeSpec(mi.Name, epoch, since)
				ja, erra := a.Join(Subscriber{User: "probe", Session: "probe", Gateway: w.keyA("gp")}, []*imqpb.MountSpec{spec}, now)
				jb, errb := b.Join(Subscriber{User: "probe", Session: "probe", Gateway: w.keyB("gp")}, []*imqpb.MountSpec{spec}, now)
				w.same(fmt.Sprintf("%s: resume %s from %d/%d", what, mi.Name, epoch, since), ja, jb, erra, errb)
				if la, lb := a.Leave("probe", now), b.Leave("probe", now); la != lb {
					w.t.Fatalf("%s: probe leave %v, restored %v", what, la, lb)
				}
			}
		}
	}
}

// step applies one random operation to both queues at now and compares
// what they return.
func (w *twin) step(rng *rand.Rand, now time.Time) string {
	w.t.Helper()
	a, b := w.a, w.b
	pick := func(xs ...string) string { return xs[rng.IntN(len(xs))] }
	bytesOf := func(max int) []byte {
		p := make([]byte, rng.IntN(max+1))
		for i := range p {
			p[i] = byte(rng.IntN(256))
		}
		return p
	}
	switch rng.IntN(10) {
	case 0, 1, 2:
		mount, sender, payload := pick("m1", "m2", "m3", "s1"), pick("alice", "bob", ""), bytesOf(45)
		ea, erra := a.Publish(mount, sender, payload, now)
		eb, errb := b.Publish(mount, sender, payload, now)
		what := fmt.Sprintf("publish %s %d bytes", mount, len(payload))
		w.same(what, ea, eb, erra, errb)
		return what
	case 3, 4:
		mount, key, value, del := pick("s1", "s2", "m1"), pick("k1", "k2", "k3", "k4", "k5"), bytesOf(33), rng.IntN(4) == 0
		ca, erra := a.SetState(mount, "bob", key, value, del, now)
		cb, errb := b.SetState(mount, "bob", key, value, del, now)
		what := fmt.Sprintf("set_state %s %s del=%v", mount, key, del)
		w.same(what, ca, cb, erra, errb)
		return what
	case 5, 6:
		session, gw := pick("p1", "p2", "p3", "p4", "p5"), pick("g1", "g2", "g3")
		var specs []*imqpb.MountSpec
		for _, m := range []string{"m1", "m2", "m3", "s1", "s2"} {
			if rng.IntN(3) > 0 {
				continue
			}
			kind := imqpb.MountKind_MESSAGE
			if m[0] == 's' {
				kind = imqpb.MountKind_STATE
			}
			if rng.IntN(20) == 0 {
				kind = 3 - kind // the wrong kind, now and then
			}
			spec := &imqpb.MountSpec{Name: m, Kind: kind}
			if kind == imqpb.MountKind_MESSAGE {
				switch rng.IntN(3) {
				case 0:
					spec.Resume = &imqpb.Position{Epoch: a.Epoch(), Offset: uint64(rng.IntN(int(a.Head()) + 2))}
				case 1:
					spec.Recent = uint32(rng.IntN(8))
				}
			}
			specs = append(specs, spec)
		}
		ja, erra := a.Join(Subscriber{User: "u-" + session, Session: session, Gateway: w.keyA(gw)}, specs, now)
		jb, errb := b.Join(Subscriber{User: "u-" + session, Session: session, Gateway: w.keyB(gw)}, specs, now)
		what := fmt.Sprintf("join %s via %s %v", session, gw, specs)
		w.same(what, ja, jb, erra, errb)
		return what
	case 7:
		session := pick("p1", "p2", "p3", "p4", "p5")
		if la, lb := a.Leave(session, now), b.Leave(session, now); la != lb {
			w.t.Fatalf("leave %s: %v, restored %v", session, la, lb)
		}
		return "leave " + session
	case 8:
		gw := pick("g1", "g2", "g3")
		if na, nb := a.RemoveGateway(w.keyA(gw), now, nil), b.RemoveGateway(w.keyB(gw), now, nil); na != nb {
			w.t.Fatalf("remove gateway %s: %d, restored %d", gw, na, nb)
		}
		return "remove gateway " + gw
	default:
		// The node budget's eviction: events older than a cutoff (by
		// time, so that the mounts' order does not matter).
		cutoff := now.Add(-time.Duration(rng.IntN(8)) * time.Second).UnixMilli()
		evict := func(timeMs int64, _ int) bool { return timeMs < cutoff }
		if fa, fb := a.EvictOldest(evict), b.EvictOldest(evict); fa != fb {
			w.t.Fatalf("evict before %d: freed %d, restored %d", cutoff, fa, fb)
		}
		return "evict oldest"
	}
}

// TestSnapshotRoundTripProperty: a queue after random operations,
// snapshotted, encoded, decoded and restored, behaves exactly as the
// original under the same further operations: every History page, state
// read, Info, resume (with missed), eviction, expiry and byte count. The
// restored copy is round-tripped again now and then, and so is the
// original, each time binding its subscribers to new link keys; the
// subscribers of a gateway without a link are returned and, on the
// original, removed as its link closing would.
func TestSnapshotRoundTripProperty(t *testing.T) {
	seeds := 60
	if testing.Short() {
		seeds = 20
	}
	for seed := range seeds {
		rng := rand.New(rand.NewPCG(uint64(seed), 0x5eed))
		limits := snapshotLimits()
		now := t0
		// Until the first round trip, b is a second queue driven alike.
		a := NewQueue(testQueue, testEpoch, limits, now)
		w := &twin{t: t, a: a, b: NewQueue(testQueue, testEpoch, limits, now), sa: 1, sb: 1}
		var log []string
		fail := func() { t.Logf("seed %d: operations:\n%s", seed, strings.Join(log, "\n")) }
		for range rng.IntN(40) {
			now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
			log = append(log, w.step(rng, now))
		}
		for trip := range 3 {
			now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
			// The node counts them before it hands the queue off.
			a.TakeEvictions()
			w.b.TakeEvictions()
			var unlinked []string
			if rng.IntN(3) == 0 {
				unlinked = []string{"g3"}
			}
			src := w.a
			if trip > 0 && rng.IntN(2) == 0 {
				src = w.b // restore the restored one
			}
			serial := w.sb + 1
			b, unbound := roundTrip(t, src, limits, now, serial, unlinked...)
			w.b, w.sb = b, serial
			// The original drops the unlinked gateway's subscribers, as a
			// closing link would; the restored one reports them instead.
			var removed []Subscriber
			if len(unlinked) > 0 {
				a.RemoveGateway(w.keyA("g3"), now, func(s Subscriber) { removed = append(removed, s) })
			}
			for i := range removed {
				removed[i].Gateway = "g3"
			}
			slices.SortFunc(removed, func(x, y Subscriber) int { return strings.Compare(x.Session, y.Session) })
			if !slices.Equal(removed, unbound) {
				fail()
				t.Fatalf("seed %d: unbound subscribers %v, want %v", seed, unbound, removed)
			}
			if len(unlinked) == 0 {
				// Nothing left out: the snapshots of both say the same.
				sa, sb := a.Snapshot(gatewayOfKey), b.Snapshot(gatewayOfKey)
				sa.LastActiveUnixNano, sb.LastActiveUnixNano = 0, 0
				if !proto.Equal(sa, sb) {
					fail()
					t.Fatalf("seed %d: snapshot of the restored queue differs:\n%v\n%v", seed, sa, sb)
				}
			}
			w.compare(fmt.Sprintf("seed %d trip %d: after restore", seed, trip), now, true)
			for i := range rng.IntN(30) {
				now = now.Add(time.Duration(rng.IntN(2500)) * time.Millisecond)
				op := w.step(rng, now)
				log = append(log, op)
				w.compare(fmt.Sprintf("seed %d trip %d op %d (%s)", seed, trip, i, op), now, i%8 == 7)
			}
			// Long idle: age and idle expiry continue alike.
			now = now.Add(time.Duration(rng.IntN(15)) * time.Second)
			w.compare(fmt.Sprintf("seed %d trip %d: idle", seed, trip), now, false)
		}
	}
}

// sampleQueue is a queue with a bit of everything: a message mount that
// has evicted events by count, a state mount, and subscribers through two
// gateways (link keys g1/1 and g2/1).
func sampleQueue(t *testing.T, limits *Limits) *Queue {
	t.Helper()
	q := NewQueue(testQueue, testEpoch, limits, t0)
	for i := range 8 { // offsets 1-8; HistoryLen 6 evicts 1 and 2
		mustPublish(t, q, "m1", []byte{byte(i)}, at(time.Duration(i)*time.Millisecond))
	}
	mustSetState(t, q, "s1", "k1", []byte("v1"), false, at(time.Second))  // 9
	mustSetState(t, q, "s1", "k2", []byte("v2"), false, at(time.Second))  // 10
	mustSetState(t, q, "s1", "k1", []byte("v1b"), false, at(time.Second)) // 11
	mustJoin(t, q, sub("p1", "g1/1"), at(time.Second), msgSpec("m1"), stateSpec("s1"))
	mustJoin(t, q, sub("p2", "g2/1"), at(time.Second), stateSpec("s1"))
	return q
}

// TestRestoreQueueContinues: a restored queue picks up where the original
// stopped: the next publish gets head+1, state versions go on, a resume
// from an evicted offset is missed and one from a retained offset replays
// the same events, and its subscribers get its events through their
// gateways' links on this node.
func TestRestoreQueueContinues(t *testing.T) {
	limits := snapshotLimits()
	q := sampleQueue(t, limits)
	now := at(2 * time.Second)
	r, unbound := roundTrip(t, q, limits, now, 7)
	if len(unbound) != 0 {
		t.Fatalf("unbound %v", unbound)
	}
	if r.Epoch() != testEpoch || r.Head() != 11 || r.Bytes() != q.Bytes() || r.HistoryBytes() != q.HistoryBytes() {
		t.Fatalf("restored epoch %d head %d bytes %d/%d; want %d 11 %d/%d", r.Epoch(), r.Head(), r.Bytes(), r.HistoryBytes(), testEpoch, q.Bytes(), q.HistoryBytes())
	}
	if got := gatewaysOf(t, r, "s1"); !slices.Equal(got, []string{"g1/7", "g2/7"}) {
		t.Fatalf("gateways of s1: %v", got)
	}
	if got := gatewaysOf(t, r, "m1"); !slices.Equal(got, []string{"g1/7"}) {
		t.Fatalf("gateways of m1: %v", got)
	}
	j := mustJoin(t, r, sub("p3", "g1/7"), now, resumeSpec("m1", testEpoch, 1))
	if ms := j.GetMounts()[0]; !ms.GetMissed() || len(ms.GetHistory()) == 0 {
		t.Fatalf("resume from evicted offset 1: missed %v, events %v", ms.GetMissed(), offsetsOf(ms.GetHistory()))
	}
	j = mustJoin(t, r, sub("p3", "g1/7"), now, resumeSpec("m1", testEpoch, 6))
	if ms := j.GetMounts()[0]; ms.GetMissed() || !slices.Equal(offsetsOf(ms.GetHistory()), offsetRange(7, 8)) {
		t.Fatalf("resume from retained offset 6: missed %v, events %v", ms.GetMissed(), offsetsOf(ms.GetHistory()))
	}
	if ev := mustPublish(t, r, "m1", []byte("next"), now); ev.GetOffset() != 12 {
		t.Fatalf("next publish got offset %d, want 12", ev.GetOffset())
	}
	if ch := mustSetState(t, r, "s1", "k2", []byte("v2b"), false, now); ch.GetVersion() != 13 {
		t.Fatalf("next state change got version %d, want 13", ch.GetVersion())
	}
	st, err := r.GetState("s1", []string{"k1"})
	if err != nil || len(st.GetEntries()) != 1 || st.GetEntries()[0].GetVersion() != 11 || string(st.GetEntries()[0].GetValue()) != "v1b" {
		t.Fatalf("GetState k1: %v, %v", st, err)
	}
}

// TestRestoreQueueSubscribers: subscribers of a gateway this node has no
// link with are returned, not joined, and their leaving is activity; a
// last activity ahead of this node's clock is taken as now.
func TestRestoreQueueSubscribers(t *testing.T) {
	limits := snapshotLimits()
	q := sampleQueue(t, limits)
	s := q.Snapshot(gatewayOfKey)
	if got := []string{s.Subscribers[0].GetGateway(), s.Subscribers[1].GetGateway()}; !slices.Equal(got, []string{"g1", "g2"}) {
		t.Fatalf("snapshot gateways %v: want gateway ids, not link keys", got)
	}
	now := at(time.Hour)
	r, unbound, err := RestoreQueue(s, limits, now, func(id string) (string, bool) { return id + "/3", id == "g1" })
	if err != nil {
		t.Fatal(err)
	}
	if want := []Subscriber{{User: "u-p2", Session: "p2", Gateway: "g2"}}; !slices.Equal(unbound, want) {
		t.Fatalf("unbound %v, want %v", unbound, want)
	}
	if got := r.SubscriberList(); len(got) != 1 || got[0].Gateway != "g1/3" {
		t.Fatalf("subscribers %v", got)
	}
	if got := gatewaysOf(t, r, "s1"); !slices.Equal(got, []string{"g1/3"}) {
		t.Fatalf("gateways of s1: %v", got)
	}
	r.Leave("p1", at(time.Hour+time.Second))
	if r.Expire(at(time.Hour+time.Second), time.Minute) {
		t.Fatal("idle at once after its last subscriber left")
	}

	// A snapshotting node whose clock runs a day ahead.
	s.LastActiveUnixNano = at(24 * time.Hour).UnixNano()
	s.Subscribers = nil
	r, _, err = RestoreQueue(s, limits, now, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	if !r.Expire(now.Add(time.Minute), time.Minute) {
		t.Fatal("a last activity ahead of this node's clock kept the queue from expiring")
	}
}

// TestRestoreQueueEmpty: a queue with nothing in it, and one whose
// message mount evicted everything, survive the round trip.
func TestRestoreQueueEmpty(t *testing.T) {
	limits := snapshotLimits()
	q := NewQueue(testQueue, testEpoch, limits, t0)
	r, _ := roundTrip(t, q, limits, t0, 2)
	if r.Head() != 0 || r.Bytes() != QueueBytes(testQueue) || !r.Disposable() {
		t.Fatalf("empty queue restored with head %d bytes %d", r.Head(), r.Bytes())
	}
	mustPublish(t, q, "m1", []byte("x"), t0)
	q.EvictOldest(func(int64, int) bool { return true })
	r, _ = roundTrip(t, q, limits, t0, 2)
	p, err := r.History("m1", 0, 0, t0)
	if err != nil || !p.GetMissed() || len(p.GetEvents()) != 0 || p.GetHead() != 1 {
		t.Fatalf("history of an evicted mount: %v, %v", p, err)
	}
	if ev := mustPublish(t, r, "m1", []byte("y"), t0); ev.GetOffset() != 2 {
		t.Fatalf("next publish got %d", ev.GetOffset())
	}
}

// TestRestoreQueueRefusesBadSnapshots: a snapshot from another node is
// checked whole; each flaw is refused with a clear error (BAD_REQUEST, or
// LIMIT_EXCEEDED past this node's limits), never restored or a panic.
func TestRestoreQueueRefusesBadSnapshots(t *testing.T) {
	limits := snapshotLimits()
	valid := func() *imqpb.QueueSnapshot { return sampleQueue(t, limits).Snapshot(gatewayOfKey) }
	// In valid(): mounts m1 (events 3-8, evicted 2) and s1 (k1@11, k2@10),
	// subscribers p1 (m1, s1) and p2 (s1); head 11.
	m1 := func(s *imqpb.QueueSnapshot) *imqpb.MountSnapshot { return s.Mounts[0] }
	s1 := func(s *imqpb.QueueSnapshot) *imqpb.MountSnapshot { return s.Mounts[1] }
	big := strings.Repeat("x", 2000)
	cases := []struct {
		name   string
		mutate func(s *imqpb.QueueSnapshot)
		code   imqpb.Code
		want   string
	}{
		{"bad queue name", func(s *imqpb.QueueSnapshot) { s.Name = "room" }, imqpb.Code_BAD_REQUEST, "must start with '/'"},
		{"epoch 0", func(s *imqpb.QueueSnapshot) { s.Epoch = 0 }, imqpb.Code_BAD_REQUEST, "epoch 0"},
		{"bad mount name", func(s *imqpb.QueueSnapshot) { m1(s).Name = "a b" }, imqpb.Code_BAD_REQUEST, "not allowed"},
		{"bad mount kind", func(s *imqpb.QueueSnapshot) { m1(s).Kind = 9 }, imqpb.Code_BAD_REQUEST, "kind must be"},
		{"mount twice", func(s *imqpb.QueueSnapshot) { s1(s).Name = "m1" }, imqpb.Code_BAD_REQUEST, `mount "m1" twice`},
		{"nil mount", func(s *imqpb.QueueSnapshot) { s.Mounts[0] = nil }, imqpb.Code_BAD_REQUEST, "mount name"},
		{"too many mounts", func(s *imqpb.QueueSnapshot) {
			for i := range 3 {
				s.Mounts = append(s.Mounts, &imqpb.MountSnapshot{Name: fmt.Sprint("x", i), Kind: imqpb.MountKind_MESSAGE})
			}
		}, imqpb.Code_LIMIT_EXCEEDED, "5 mounts"},
		{"events out of order", func(s *imqpb.QueueSnapshot) {
			h := m1(s).History
			h[1], h[2] = h[2], h[1]
		}, imqpb.Code_BAD_REQUEST, "event offset 4 after 5"},
		{"event beyond head", func(s *imqpb.QueueSnapshot) { s.Head = 7 }, imqpb.Code_BAD_REQUEST, "head 7"},
		{"event not after evicted", func(s *imqpb.QueueSnapshot) { m1(s).Evicted = 3 }, imqpb.Code_BAD_REQUEST, "evicted 3"},
		{"evicted beyond head", func(s *imqpb.QueueSnapshot) { m1(s).History, m1(s).Evicted = nil, 12 }, imqpb.Code_BAD_REQUEST, "beyond head"},
		{"event of another mount", func(s *imqpb.QueueSnapshot) { m1(s).History[0].Mount = "m2" }, imqpb.Code_BAD_REQUEST, "another queue or mount"},
		{"nil event", func(s *imqpb.QueueSnapshot) { m1(s).History[0] = nil }, imqpb.Code_BAD_REQUEST, "empty event"},
		{"offset used twice", func(s *imqpb.QueueSnapshot) { s1(s).State[1].Version = 8 }, imqpb.Code_BAD_REQUEST, "each offset once"},
		{"state version 0", func(s *imqpb.QueueSnapshot) { s1(s).State[0].Version = 0 }, imqpb.Code_BAD_REQUEST, "version 0"},
		{"state version beyond head", func(s *imqpb.QueueSnapshot) { s1(s).State[0].Version = 12 }, imqpb.Code_BAD_REQUEST, "version 12"},
		{"state keys out of order", func(s *imqpb.QueueSnapshot) {
			st := s1(s).State
			st[0], st[1] = st[1], st[0]
		}, imqpb.Code_BAD_REQUEST, "out of order or twice"},
		{"bad state key", func(s *imqpb.QueueSnapshot) { s1(s).State[0].Key = "a\x00" }, imqpb.Code_BAD_REQUEST, "control character"},
		{"nil state entry", func(s *imqpb.QueueSnapshot) { s1(s).State[0] = nil }, imqpb.Code_BAD_REQUEST, "state key must be"},
		{"history on a state mount", func(s *imqpb.QueueSnapshot) { s1(s).Evicted = 1 }, imqpb.Code_BAD_REQUEST, "has history"},
		{"state on a message mount", func(s *imqpb.QueueSnapshot) { m1(s).State = s1(s).State }, imqpb.Code_BAD_REQUEST, "has state"},
		{"history too long", func(s *imqpb.QueueSnapshot) {
			m1(s).Evicted = 1
			m1(s).History = append([]*imqpb.Event{{Queue: testQueue, Mount: "m1", Offset: 2}}, m1(s).History...)
		}, imqpb.Code_LIMIT_EXCEEDED, "retains 7 events"},
		{"history too large", func(s *imqpb.QueueSnapshot) { m1(s).History[0].Sender = strings.Repeat("a", 200) }, imqpb.Code_LIMIT_EXCEEDED, "retains"},
		{"payload too large", func(s *imqpb.QueueSnapshot) { m1(s).History[5].Payload = make([]byte, 41) }, imqpb.Code_LIMIT_EXCEEDED, "event 8 is 41 bytes"},
		{"sender too long", func(s *imqpb.QueueSnapshot) { m1(s).History[5].Sender = big }, imqpb.Code_BAD_REQUEST, "sender is 2000 bytes"},
		{"state value too large", func(s *imqpb.QueueSnapshot) { s1(s).State[0].Value = make([]byte, 31) }, imqpb.Code_LIMIT_EXCEEDED, "holds 31 bytes"},
		{"too many state keys", func(s *imqpb.QueueSnapshot) {
			for i := range 3 {
				s1(s).State = append(s1(s).State, &imqpb.StateEntry{Key: fmt.Sprint("z", i), Version: uint64(1 + i)})
			}
		}, imqpb.Code_LIMIT_EXCEEDED, "5 keys"},
		{"state too large", func(s *imqpb.QueueSnapshot) {
			s1(s).State[0].Value = make([]byte, 30)
			s1(s).State[1].Value = make([]byte, 30)
			s1(s).State = append(s1(s).State, &imqpb.StateEntry{Key: "k3", Value: make([]byte, 30), Version: 1})
		}, imqpb.Code_LIMIT_EXCEEDED, "the limit is 80"},
		{"too many subscribers", func(s *imqpb.QueueSnapshot) {
			for i := range 7 {
				s.Subscribers = append(s.Subscribers, &imqpb.SubscriberSnapshot{Gateway: "g", User: "u", Session: fmt.Sprint("x", i), Mounts: []string{"m1"}})
			}
		}, imqpb.Code_LIMIT_EXCEEDED, "9 subscribers"},
		{"empty session", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Session = "" }, imqpb.Code_BAD_REQUEST, "session is 0 bytes"},
		{"huge session", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Session = big }, imqpb.Code_BAD_REQUEST, "session is 2000 bytes"},
		{"session twice", func(s *imqpb.QueueSnapshot) { s.Subscribers[1].Session = "p1" }, imqpb.Code_BAD_REQUEST, `"p1" twice`},
		{"no gateway", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Gateway = "" }, imqpb.Code_BAD_REQUEST, "gateway id of 0 bytes"},
		{"no user", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].User = "" }, imqpb.Code_BAD_REQUEST, "user id of 0 bytes"},
		{"no mounts", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Mounts = nil }, imqpb.Code_BAD_REQUEST, "no mounts"},
		{"unknown mount", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Mounts[0] = "zz" }, imqpb.Code_BAD_REQUEST, `no mount "zz"`},
		{"mount joined twice", func(s *imqpb.QueueSnapshot) { s.Subscribers[0].Mounts[1] = "m1" }, imqpb.Code_BAD_REQUEST, `mount "m1" twice`},
		{"nil subscriber", func(s *imqpb.QueueSnapshot) { s.Subscribers[0] = nil }, imqpb.Code_BAD_REQUEST, "session is 0 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := valid()
			tc.mutate(s)
			q, unbound, err := RestoreQueue(s, limits, t0, func(id string) (string, bool) { return id, true })
			if err == nil {
				t.Fatalf("restored %v (unbound %v)", q, unbound)
			}
			if imqerr.CodeOf(err) != tc.code || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "queue snapshot") {
				t.Fatalf("error %v (%v), want %v containing %q", err, imqerr.CodeOf(err), tc.code, tc.want)
			}
			if q != nil || unbound != nil {
				t.Fatal("a refused snapshot returned a queue or subscribers")
			}
		})
	}
	if _, _, err := RestoreQueue(nil, limits, t0, nil); imqerr.CodeOf(err) != imqpb.Code_BAD_REQUEST {
		t.Fatalf("nil snapshot: %v", err)
	}
	// The newest event is kept even past HistoryBytes, as Publish keeps it.
	s := valid()
	m1(s).History = m1(s).History[5:]
	m1(s).History[0].Sender = strings.Repeat("a", 240)
	m1(s).Evicted = 7
	if _, _, err := RestoreQueue(s, limits, t0, func(id string) (string, bool) { return id, true }); err != nil {
		t.Fatalf("one event larger than HistoryBytes: %v", err)
	}
}

// FuzzRestoreQueue: whatever bytes arrive as a snapshot, RestoreQueue
// either refuses them or makes a queue that snapshots and restores to the
// same bytes count, and keeps working (the next publish gets head+1).
func FuzzRestoreQueue(f *testing.F) {
	limits := snapshotLimits()
	q := NewQueue(testQueue, testEpoch, limits, t0)
	for i := range 8 {
		q.Publish("m1", "alice", []byte{byte(i)}, t0)
	}
	q.SetState("s1", "bob", "k", []byte("v"), false, t0)
	q.Join(Subscriber{User: "u", Session: "p", Gateway: "g/1"}, []*imqpb.MountSpec{msgSpec("m1"), stateSpec("s1")}, t0)
	b, err := proto.Marshal(q.Snapshot(gatewayOfKey))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var s imqpb.QueueSnapshot
		if proto.Unmarshal(b, &s) != nil {
			return
		}
		r, _, err := RestoreQueue(&s, limits, t0, func(id string) (string, bool) { return id + "/1", len(id)%2 == 0 })
		if err != nil {
			return
		}
		r2, _, err := RestoreQueue(r.Snapshot(gatewayOfKey), limits, t0, func(id string) (string, bool) { return id + "/1", true })
		if err != nil {
			t.Fatalf("the snapshot of a restored queue is refused: %v", err)
		}
		if r2.Bytes() != r.Bytes() || r2.HistoryBytes() != r.HistoryBytes() {
			t.Fatalf("bytes %d/%d, again %d/%d", r.Bytes(), r.HistoryBytes(), r2.Bytes(), r2.HistoryBytes())
		}
		if ev, err := r.Publish("zz", "", nil, t0); err == nil && ev.GetOffset() != s.GetHead()+1 {
			t.Fatalf("next publish got %d after head %d", ev.GetOffset(), s.GetHead())
		}
	})
}
