package client

import (
	"bytes"
	"cmp"
	"fmt"
	"maps"
	"slices"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// tracker is one subscription's bookkeeping, kept apart from channels and
// locks so that it is plain data to test: the queue's epoch, where each
// message mount resumes, and each state mount's mirror.
//
// Nothing is recorded before the application has it. Applying a Joined is
// split in three: begin plans the updates to deliver, commit records one once
// it is delivered, settle records the join's head once all are. If the
// connection dies halfway, the next join resumes from what was delivered and
// plans again whatever was not (a gap included).
type tracker struct {
	queue  string
	epoch  uint64 // of the last Joined, for Subscription.Epoch
	joined bool   // a Joined was applied, so joining again resumes
	mounts []mountTrack
}

// mountTrack is the bookkeeping of one mount. Every event or state change up
// to offset last of queue incarnation epoch was delivered, or is part of the
// state mirror.
type mountTrack struct {
	name   string
	kind   imqpb.MountKind
	recent uint32 // message mounts: events to replay on the first join
	epoch  uint64
	last   uint64
	state  map[string][]byte // state mounts: the mirror
}

func newTracker(queue string, mounts []Mount) tracker {
	t := tracker{queue: queue, mounts: make([]mountTrack, len(mounts))}
	for i, m := range mounts {
		t.mounts[i] = mountTrack{name: m.Name, kind: m.Kind, recent: m.Recent}
		if m.Kind == imqpb.MountKind_STATE {
			t.mounts[i].state = map[string][]byte{}
		}
	}
	return t
}

// mount returns the named mount, or nil. Subscriptions have a handful of
// mounts, so a scan beats a map.
func (t *tracker) mount(name string) *mountTrack {
	for i := range t.mounts {
		if t.mounts[i].name == name {
			return &t.mounts[i]
		}
	}
	return nil
}

// specs returns the mounts to ask for in a Join: the recent events wanted on
// the first join, the resume position on the next ones.
func (t *tracker) specs() []*imqpb.MountSpec {
	specs := make([]*imqpb.MountSpec, len(t.mounts))
	for i := range t.mounts {
		m := &t.mounts[i]
		spec := &imqpb.MountSpec{Name: m.name, Kind: m.kind}
		if m.kind == imqpb.MountKind_MESSAGE {
			if t.joined {
				spec.Resume = &imqpb.Position{Epoch: m.epoch, Offset: m.last}
			} else {
				spec.Recent = m.recent
			}
		}
		specs[i] = spec
	}
	return specs
}

// begin starts applying j and returns the updates to deliver, in order: a
// gap for each message mount that lost events (reason says why the join
// happened), then in queue order the replayed events not yet delivered and
// the keys the snapshot sets differently from the mirror, then the keys the
// snapshot no longer has.
func (t *tracker) begin(j *imqpb.Joined, reason imqpb.Reason) []Update {
	rejoin := t.joined
	t.joined, t.epoch = true, j.GetEpoch()
	var gaps, events, changes []Update
	for _, ms := range j.GetMounts() {
		m := t.mount(ms.GetName())
		if m == nil {
			continue
		}
		if !rejoin {
			m.epoch = j.GetEpoch()
		}
		switch m.kind {
		case imqpb.MountKind_MESSAGE:
			if !rejoin {
				// Position a first join just before what it replays (or at
				// the head), so that a reconnect before the plan is delivered
				// resumes from there rather than from the start of history.
				m.last = j.GetHead()
				if h := ms.GetHistory(); len(h) > 0 {
					m.last = h[0].GetOffset() - 1
				}
			}
			after := m.last
			switch {
			case m.epoch != j.GetEpoch():
				after = 0 // offsets restart with the new incarnation
				gaps = append(gaps, t.gap(m, reason, fmt.Sprintf("queue was recreated (epoch %d, now %d): events were lost", m.epoch, j.GetEpoch())))
			case rejoin && ms.GetMissed():
				gaps = append(gaps, t.gap(m, reason, fmt.Sprintf("events after offset %d left the history: they were lost", m.last)))
			}
			for _, ev := range ms.GetHistory() {
				if ev.GetOffset() > after {
					events = append(events, eventUpdate(t.queue, m.name, ev))
					after = ev.GetOffset()
				}
			}
		case imqpb.MountKind_STATE:
			changes = diff(t.queue, m, ms.GetState(), changes)
		}
	}
	// Events and the keys set meanwhile, in queue order (a key set carries
	// the offset of its last change); deletions found by comparing snapshots
	// have no offset and come last.
	ordered := events
	var deletions []Update
	for _, u := range changes {
		if u.Kind == KindStateDeleted {
			deletions = append(deletions, u)
		} else {
			ordered = append(ordered, u)
		}
	}
	slices.SortStableFunc(ordered, func(a, b Update) int { return cmp.Compare(a.Offset, b.Offset) })
	return slices.Concat(gaps, ordered, deletions)
}

func (t *tracker) gap(m *mountTrack, reason imqpb.Reason, msg string) Update {
	return Update{Kind: KindGap, Queue: t.queue, Mount: m.name, Reason: reason, Message: msg}
}

// diff appends to ups what turns m's mirror into snapshot: the keys set or
// changed (in key order, as the server sends them), then those deleted.
func diff(queue string, m *mountTrack, snapshot []*imqpb.StateEntry, ups []Update) []Update {
	for _, e := range snapshot {
		if old, ok := m.state[e.GetKey()]; !ok || !bytes.Equal(old, e.GetValue()) {
			ups = append(ups, Update{Kind: KindStateSet, Queue: queue, Mount: m.name,
				Offset: e.GetVersion(), Key: e.GetKey(), Payload: e.GetValue()})
		}
	}
	if len(m.state) == 0 {
		return ups
	}
	kept := make(map[string]bool, len(snapshot))
	for _, e := range snapshot {
		kept[e.GetKey()] = true
	}
	for _, k := range slices.Sorted(maps.Keys(m.state)) {
		if !kept[k] {
			ups = append(ups, Update{Kind: KindStateDeleted, Queue: queue, Mount: m.name, Key: k})
		}
	}
	return ups
}

// commit records that u was delivered.
func (t *tracker) commit(u *Update) {
	m := t.mount(u.Mount)
	if m == nil {
		return
	}
	switch u.Kind {
	case KindGap:
		if m.epoch != t.epoch {
			m.epoch, m.last = t.epoch, 0
		}
	case KindEvent:
		m.last = u.Offset
	case KindStateSet:
		m.state[u.Key] = u.Payload
		m.last = max(m.last, u.Offset)
	case KindStateDeleted:
		delete(m.state, u.Key)
		m.last = max(m.last, u.Offset)
	}
}

// settle records that every update planned by begin(j) was delivered: the
// mounts are now at the queue's head, since anything later has a larger
// offset.
func (t *tracker) settle(j *imqpb.Joined) {
	for _, ms := range j.GetMounts() {
		if m := t.mount(ms.GetName()); m != nil {
			m.epoch, m.last = j.GetEpoch(), j.GetHead()
		}
	}
}

// live returns the mount that a live event or state change at offset is new
// for, or nil for a duplicate, an unknown mount, or one of the other kind.
func (t *tracker) live(mount string, kind imqpb.MountKind, offset uint64) *mountTrack {
	if !t.joined {
		return nil
	}
	m := t.mount(mount)
	if m == nil || m.kind != kind || offset <= m.last {
		return nil
	}
	return m
}

func eventUpdate(queue, mount string, ev *imqpb.Event) Update {
	return Update{Kind: KindEvent, Queue: queue, Mount: mount, Offset: ev.GetOffset(),
		Sender: ev.GetSender(), Time: unixMilli(ev.GetTimeMs()), Payload: ev.GetPayload()}
}

func stateUpdate(queue, mount string, sc *imqpb.StateChange) Update {
	u := Update{Kind: KindStateSet, Queue: queue, Mount: mount, Offset: sc.GetVersion(),
		Sender: sc.GetSender(), Time: unixMilli(sc.GetTimeMs()), Key: sc.GetKey(), Payload: sc.GetValue()}
	if sc.GetDeleted() {
		u.Kind, u.Payload = KindStateDeleted, nil
	}
	return u
}

func unixMilli(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}
