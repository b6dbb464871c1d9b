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
			for _, limit := range []int{0, 2} {
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
	seeds := 300
	if testing.Short() {
		seeds = 40
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
