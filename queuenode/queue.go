package queuenode

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// Limits bound what one queue may hold. Every field must be positive except
// HistoryAge, where zero means events age out only by count and bytes.
type Limits struct {
	// HistoryLen is how many events each message mount keeps for resume.
	HistoryLen int
	// HistoryBytes bounds the bytes of the events each message mount keeps
	// for resume (payload, sender and entryOverhead each; see
	// Queue.Bytes): past it the oldest are evicted, as past HistoryLen. The
	// newest event is always kept, even a larger one.
	HistoryBytes int
	// HistoryAge is how long an event is kept for resume.
	HistoryAge time.Duration
	// MaxPayload is the largest event payload, in bytes.
	MaxPayload int
	// MaxMounts is the number of mounts one queue may have.
	MaxMounts int
	// MaxStateKeys is the number of keys one state mount may hold.
	MaxStateKeys int
	// MaxStateValue is the largest state value, in bytes.
	MaxStateValue int
	// MaxStateBytes bounds the keys and values of one state mount together.
	MaxStateBytes int
	// MaxSubscribers is the number of sessions that may join one queue.
	MaxSubscribers int
	// MaxReplayBytes bounds the payload bytes replayed in one Joined; a longer
	// resume replay keeps the newest events and reports missed.
	MaxReplayBytes int
	// MaxJoinBytes bounds one Joined: the state snapshots of the mounts joined
	// (keys, values and per-entry overhead) plus the replay. A join over it is
	// refused with LIMIT_EXCEEDED rather than sent.
	MaxJoinBytes int
}

// entryOverhead approximates the encoded bytes of a state entry or event
// beside its key, value or payload.
const entryOverhead = 32

// queueOverhead and mountOverhead approximate the memory of an empty queue
// and an empty mount beside their names, for Queue.Bytes.
const (
	queueOverhead = 512
	mountOverhead = 256
)

// QueueBytes is what an empty queue called name counts in Queue.Bytes, and
// MountBytes what an empty mount called name adds.
func QueueBytes(name string) int64 { return queueOverhead + int64(len(name)) }

// MountBytes is what an empty mount called name adds to Queue.Bytes.
func MountBytes(name string) int64 { return mountOverhead + int64(len(name)) }

// EvictReason says why events left a message mount's history.
type EvictReason int

// The reasons events are evicted, the reason label of
// imq_queuenode_evicted_events_total.
const (
	EvictCount EvictReason = iota // HistoryLen
	EvictAge                      // HistoryAge
	EvictBytes                    // HistoryBytes
	EvictNode                     // the node's memory budget (Queue.EvictOldest)
	numEvictReasons
)

var evictReasonNames = [numEvictReasons]string{"count", "age", "bytes", "node"}

// String returns the reason's metric label.
func (r EvictReason) String() string { return evictReasonNames[r] }

// Evictions counts the events and bytes evicted for one reason.
type Evictions struct{ Events, Bytes int64 }

// DefaultLimits returns the limits documented in README.md.
func DefaultLimits() Limits {
	return Limits{
		HistoryLen:     256,
		HistoryBytes:   1 << 20,
		HistoryAge:     5 * time.Minute,
		MaxPayload:     64 << 10,
		MaxMounts:      16,
		MaxStateKeys:   1024,
		MaxStateValue:  16 << 10,
		MaxStateBytes:  1 << 20,
		MaxSubscribers: 100_000,
		MaxReplayBytes: 256 << 10,
		MaxJoinBytes:   4 << 20,
	}
}

// Subscriber is one session joined to a queue through a gateway.
type Subscriber struct {
	User    string
	Session string
	Gateway string
}

// Queue is one queue: its mounts, its subscribers and its total order. It is a
// plain value with no locks, goroutines or clock: the caller serializes every
// call and passes the time in.
type Queue struct {
	name       string
	epoch      uint64
	head       uint64 // last offset assigned
	created    time.Time
	lastActive time.Time
	limits     *Limits
	mounts     map[string]*mount
	subs       map[string]*subscription // by session

	bytes    int64                      // see Bytes
	history  int64                      // see HistoryBytes
	evicted  [numEvictReasons]Evictions // since the last TakeEvictions
	anyEvict bool                       // evicted holds something

	// accounted and accountedHistory are owned by the Server: the parts of
	// its node-wide totals that this queue's Bytes and HistoryBytes made
	// up when it last settled.
	accounted, accountedHistory int64
}

type mount struct {
	name string
	kind imqpb.MountKind

	// Message mounts. hist is ordered by offset; evicted is the offset of the
	// newest event dropped from it (0: none), which decides "missed".
	hist      []*imqpb.Event
	evicted   uint64
	histBytes int // eventBytes of hist

	// State mounts.
	state      map[string]*imqpb.StateEntry
	stateBytes int

	// gateways counts, per gateway, the subscribers that want this mount: the
	// node sends each event once to each gateway with a non-zero count.
	gateways map[string]int
}

type subscription struct {
	Subscriber
	mounts []string
}

// NewQueue returns an empty queue. epoch must differ from every earlier
// incarnation of the same name.
func NewQueue(name string, epoch uint64, limits *Limits, now time.Time) *Queue {
	return &Queue{
		name:       name,
		epoch:      epoch,
		created:    now,
		lastActive: now,
		limits:     limits,
		mounts:     make(map[string]*mount),
		subs:       make(map[string]*subscription),
		bytes:      QueueBytes(name),
	}
}

// Bytes approximates the memory the queue holds, what the node's budget
// counts: QueueBytes, MountBytes per mount, each retained event's payload
// and sender plus entryOverhead, each state entry's key and value plus
// entryOverhead. Subscribers are not counted (their number is bounded by
// the gateways' connections).
func (q *Queue) Bytes() int64 { return q.bytes }

// HistoryBytes is the part of Bytes that the retained events of its
// message mounts make up: what the node's budget may evict.
func (q *Queue) HistoryBytes() int64 { return q.history }

// TakeEvictions returns the events evicted from the queue's history since
// its last call, by reason, and starts counting again; ok is false, and
// the array all zero, when none were.
func (q *Queue) TakeEvictions() (e [numEvictReasons]Evictions, ok bool) {
	if !q.anyEvict {
		return e, false
	}
	e = q.evicted
	q.evicted, q.anyEvict = [numEvictReasons]Evictions{}, false
	return e, true
}

// ForEachEvent calls fn with the time and Bytes share of every retained
// event.
func (q *Queue) ForEachEvent(fn func(timeMs int64, bytes int)) {
	for _, m := range q.mounts {
		for _, ev := range m.hist {
			fn(ev.TimeMs, eventBytes(ev))
		}
	}
}

// EvictOldest drops, from each message mount, the oldest events for which
// evict returns true, stopping at the mount's first event for which it
// returns false (events are in time order), and counts them under
// EvictNode. A resume from before them reports missed, as after any
// eviction. It returns the bytes freed.
func (q *Queue) EvictOldest(evict func(timeMs int64, bytes int) bool) (freed int64) {
	before := q.bytes
	for _, m := range q.mounts {
		n := 0
		for n < len(m.hist) && evict(m.hist[n].TimeMs, eventBytes(m.hist[n])) {
			n++
		}
		if n > 0 {
			q.drop(m, n, EvictNode)
		}
	}
	return before - q.bytes
}

// Name returns the queue's name.
func (q *Queue) Name() string { return q.name }

// Epoch returns the queue's incarnation.
func (q *Queue) Epoch() uint64 { return q.epoch }

// Head returns the last offset assigned.
func (q *Queue) Head() uint64 { return q.head }

// Created returns the time the queue was created.
func (q *Queue) Created() time.Time { return q.created }

// Subscribers returns the number of joined sessions.
func (q *Queue) Subscribers() int { return len(q.subs) }

// mountFor returns mount name of the given kind, creating it if allowed.
func (q *Queue) mountFor(name string, kind imqpb.MountKind) (*mount, error) {
	if m, ok := q.mounts[name]; ok {
		if m.kind != kind {
			return nil, imqerr.New(imqpb.Code_WRONG_MOUNT_TYPE, "mount %q of %s is a %s mount, not %s", name, q.name, m.kind, kind)
		}
		return m, nil
	}
	if len(q.mounts) >= q.limits.MaxMounts {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue %s already has %d mounts", q.name, q.limits.MaxMounts)
	}
	m := &mount{name: name, kind: kind, gateways: make(map[string]int)}
	if kind == imqpb.MountKind_STATE {
		m.state = make(map[string]*imqpb.StateEntry)
	}
	q.mounts[name] = m
	q.bytes += MountBytes(name)
	return m, nil
}

// Publish appends payload to message mount name and returns the event, which
// the caller delivers to ForEachGateway(name).
func (q *Queue) Publish(name, sender string, payload []byte, now time.Time) (*imqpb.Event, error) {
	if err := wire.ValidateMountName(name); err != nil {
		return nil, err
	}
	if len(payload) > q.limits.MaxPayload {
		return nil, imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "payload is %d bytes; the limit is %d", len(payload), q.limits.MaxPayload)
	}
	m, err := q.mountFor(name, imqpb.MountKind_MESSAGE)
	if err != nil {
		return nil, err
	}
	q.head++
	q.lastActive = now
	ev := &imqpb.Event{
		Queue:   q.name,
		Mount:   name,
		Offset:  q.head,
		Sender:  sender,
		TimeMs:  now.UnixMilli(),
		Payload: payload,
	}
	m.hist = append(m.hist, ev)
	b := eventBytes(ev)
	m.histBytes += b
	q.bytes += int64(b)
	q.history += int64(b)
	if len(m.hist) > q.limits.HistoryLen {
		q.drop(m, len(m.hist)-q.limits.HistoryLen, EvictCount)
	}
	if m.histBytes > q.limits.HistoryBytes {
		n, over := 0, m.histBytes-q.limits.HistoryBytes
		for over > 0 && n < len(m.hist)-1 {
			over -= eventBytes(m.hist[n])
			n++
		}
		q.drop(m, n, EvictBytes)
	}
	return ev, nil
}

// SetState sets key in state mount name, or deletes it. It returns the change
// to deliver, or nil when deleting a key that is not there.
func (q *Queue) SetState(name, sender, key string, value []byte, del bool, now time.Time) (*imqpb.StateChange, error) {
	if err := wire.ValidateMountName(name); err != nil {
		return nil, err
	}
	if err := wire.ValidateStateKey(key); err != nil {
		return nil, err
	}
	if len(value) > q.limits.MaxStateValue {
		return nil, imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "state value is %d bytes; the limit is %d", len(value), q.limits.MaxStateValue)
	}
	if del {
		value = nil
	}
	// Check everything before creating the mount, so that a refused change
	// leaves no empty mount behind.
	m := q.mounts[name]
	if m != nil && m.kind != imqpb.MountKind_STATE {
		return nil, imqerr.New(imqpb.Code_WRONG_MOUNT_TYPE, "mount %q of %s is a %s mount, not STATE", name, q.name, m.kind)
	}
	var old *imqpb.StateEntry
	var stateBytes, keys int
	if m != nil {
		old, stateBytes, keys = m.state[key], m.stateBytes, len(m.state)
	}
	if del && old == nil {
		return nil, nil
	}
	size := stateBytes + len(value)
	if old != nil {
		size -= len(old.Value)
	} else {
		size += len(key)
	}
	if old == nil && keys >= q.limits.MaxStateKeys {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state mount %q already has %d keys", name, q.limits.MaxStateKeys)
	}
	if size > q.limits.MaxStateBytes {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state mount %q would hold %d bytes; the limit is %d", name, size, q.limits.MaxStateBytes)
	}
	if m == nil {
		var err error
		if m, err = q.mountFor(name, imqpb.MountKind_STATE); err != nil {
			return nil, err
		}
	}
	q.head++
	q.lastActive = now
	if del {
		delete(m.state, key)
		size -= len(key)
		q.bytes -= entryOverhead
	} else {
		if old == nil {
			q.bytes += entryOverhead
		}
		m.state[key] = &imqpb.StateEntry{Key: key, Value: value, Version: q.head}
	}
	q.bytes += int64(size - m.stateBytes)
	m.stateBytes = size
	return &imqpb.StateChange{
		Queue:   q.name,
		Mount:   name,
		Key:     key,
		Value:   value,
		Deleted: del,
		Version: q.head,
		Sender:  sender,
		TimeMs:  now.UnixMilli(),
	}, nil
}

// Join subscribes sub to the mounts in specs (replacing its earlier mounts if
// it had joined before) and returns what the subscriber needs to start: the
// queue's position, state snapshots and replayed history. Nothing changes when
// it returns an error.
func (q *Queue) Join(sub Subscriber, specs []*imqpb.MountSpec, now time.Time) (*imqpb.Joined, error) {
	if len(specs) == 0 {
		return nil, imqerr.New(imqpb.Code_INVALID_MOUNT, "join %s: name at least one mount", q.name)
	}
	if len(specs) > q.limits.MaxMounts {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "join %s: %d mounts; a queue may have %d", q.name, len(specs), q.limits.MaxMounts)
	}
	// Validate everything before changing anything.
	newMounts := 0
	for i, s := range specs {
		if err := wire.ValidateMountName(s.GetName()); err != nil {
			return nil, err
		}
		if err := wire.ValidateMountKind(s.GetName(), s.GetKind()); err != nil {
			return nil, err
		}
		for _, prev := range specs[:i] {
			if prev.GetName() == s.GetName() {
				return nil, imqerr.New(imqpb.Code_INVALID_MOUNT, "join %s: mount %q named twice", q.name, s.GetName())
			}
		}
		if s.GetKind() == imqpb.MountKind_STATE && (s.GetResume() != nil || s.GetRecent() != 0) {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "join %s: mount %q is a state mount; resume and recent apply to message mounts", q.name, s.GetName())
		}
		if r := s.GetResume(); r != nil && r.GetEpoch() == q.epoch && r.GetOffset() > q.head {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "join %s: resume offset %d is beyond the queue's head %d", q.name, r.GetOffset(), q.head)
		}
		m, ok := q.mounts[s.GetName()]
		if !ok {
			newMounts++
			continue
		}
		if m.kind != s.GetKind() {
			return nil, imqerr.New(imqpb.Code_WRONG_MOUNT_TYPE, "mount %q of %s is a %s mount, not %s", s.GetName(), q.name, m.kind, s.GetKind())
		}
	}
	if len(q.mounts)+newMounts > q.limits.MaxMounts {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue %s may have %d mounts", q.name, q.limits.MaxMounts)
	}
	snapshotBytes := 0
	for _, spec := range specs {
		if m := q.mounts[spec.GetName()]; m != nil && m.kind == imqpb.MountKind_STATE {
			snapshotBytes += m.stateBytes + entryOverhead*len(m.state)
		}
	}
	if snapshotBytes > q.limits.MaxJoinBytes {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "join %s: the state snapshots are %d bytes; a join may carry %d (join fewer state mounts)", q.name, snapshotBytes, q.limits.MaxJoinBytes)
	}
	old := q.subs[sub.Session]
	if old == nil && len(q.subs) >= q.limits.MaxSubscribers {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue %s already has %d subscribers", q.name, q.limits.MaxSubscribers)
	}

	if old != nil {
		q.unref(old)
	}
	s := &subscription{Subscriber: sub, mounts: make([]string, len(specs))}
	q.subs[sub.Session] = s
	q.lastActive = now
	joined := &imqpb.Joined{Queue: q.name, Epoch: q.epoch, Head: q.head, Mounts: make([]*imqpb.MountState, len(specs))}
	replayBudget := min(q.limits.MaxReplayBytes, q.limits.MaxJoinBytes-snapshotBytes)
	for i, spec := range specs {
		m, _ := q.mountFor(spec.GetName(), spec.GetKind()) // validated above
		m.gateways[sub.Gateway]++
		s.mounts[i] = m.name
		ms := &imqpb.MountState{Name: m.name, Kind: m.kind}
		if m.kind == imqpb.MountKind_STATE {
			ms.State = m.snapshot()
		} else {
			q.expire(m, now)
			ms.History, ms.Missed = m.replay(spec, q.epoch, &replayBudget)
		}
		joined.Mounts[i] = ms
	}
	return joined, nil
}

// Leave removes session from the queue. It reports whether it was joined.
func (q *Queue) Leave(session string, now time.Time) bool {
	s, ok := q.subs[session]
	if !ok {
		return false
	}
	q.unref(s)
	delete(q.subs, session)
	q.lastActive = now
	return true
}

// RemoveGateway removes every subscriber that joined through gateway, and
// returns how many it removed. removed, if set, is called with each.
func (q *Queue) RemoveGateway(gateway string, now time.Time, removed func(Subscriber)) int {
	n := 0
	for session, s := range q.subs {
		if s.Gateway == gateway {
			q.unref(s)
			delete(q.subs, session)
			n++
			if removed != nil {
				removed(s.Subscriber)
			}
		}
	}
	if n > 0 {
		q.lastActive = now
	}
	return n
}

func (q *Queue) unref(s *subscription) {
	for _, name := range s.mounts {
		m := q.mounts[name]
		if m.gateways[s.Gateway]--; m.gateways[s.Gateway] <= 0 {
			delete(m.gateways, s.Gateway)
		}
	}
}

// Disposable reports whether the queue can be dropped at once: no
// subscribers, and no retained events or state that a later join could want.
// Dropping it loses nothing but its epoch, so a client resuming into its next
// incarnation is told it missed events (conservatively).
func (q *Queue) Disposable() bool {
	if len(q.subs) > 0 {
		return false
	}
	for _, m := range q.mounts {
		if len(m.hist) > 0 || len(m.state) > 0 {
			return false
		}
	}
	return true
}

// ForEachGateway calls fn once for each gateway with a subscriber to mount.
func (q *Queue) ForEachGateway(mount string, fn func(gateway string)) {
	if m, ok := q.mounts[mount]; ok {
		for gw := range m.gateways {
			fn(gw)
		}
	}
}

// Gateways returns each gateway with a subscriber to any of the queue's
// mounts once, sorted: those to tell when the queue closes.
func (q *Queue) Gateways() []string {
	// Every subscriber holds at least one mount, so the mounts' gateway
	// counts name them all, without a walk over the subscribers.
	seen := make(map[string]bool)
	for _, m := range q.mounts {
		for gw := range m.gateways {
			seen[gw] = true
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

// Expire drops history older than the age limit and reports whether the queue
// is idle: no subscribers and no activity for ttl.
func (q *Queue) Expire(now time.Time, ttl time.Duration) (idle bool) {
	for _, m := range q.mounts {
		q.expire(m, now)
	}
	return len(q.subs) == 0 && now.Sub(q.lastActive) >= ttl
}

// SubscriberList returns the subscribers ordered by session, for inspection.
func (q *Queue) SubscriberList() []Subscriber {
	out := make([]Subscriber, 0, len(q.subs))
	for _, s := range q.subs {
		out = append(out, s.Subscriber)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Session < out[j].Session })
	return out
}

// History page sizes: the events one History call returns when it names no
// limit, and the most it returns whatever it names.
const (
	DefaultHistoryLimit = 100
	MaxHistoryLimit     = 1000
)

// StateKeySet reports whether state mount name holds key.
func (q *Queue) StateKeySet(name, key string) bool {
	m := q.mounts[name]
	return m != nil && m.state[key] != nil
}

// readMount returns mount name for a read, which never creates one: a
// missing mount is NOT_FOUND.
func (q *Queue) readMount(name string, kind imqpb.MountKind) (*mount, error) {
	if err := wire.ValidateMountName(name); err != nil {
		return nil, err
	}
	m := q.mounts[name]
	if m == nil {
		return nil, imqerr.New(imqpb.Code_NOT_FOUND, "mount %q does not exist on queue %s", name, q.name)
	}
	if m.kind != kind {
		return nil, imqerr.New(imqpb.Code_WRONG_MOUNT_TYPE, "mount %q of %s is a %s mount, not %s", name, q.name, m.kind, kind)
	}
	return m, nil
}

// GetState reads state mount name: the entries of keys that are set (keys
// empty: every entry), sorted by key. A read larger than MaxJoinBytes (the
// bound of a snapshot in a join) is refused with LIMIT_EXCEEDED.
func (q *Queue) GetState(name string, keys []string) (*imqpb.StateSnapshot, error) {
	m, err := q.readMount(name, imqpb.MountKind_STATE)
	if err != nil {
		return nil, err
	}
	snap := &imqpb.StateSnapshot{Epoch: q.epoch, Head: q.head}
	if len(keys) == 0 {
		snap.Entries = m.snapshot()
	} else {
		for _, k := range keys {
			if err := wire.ValidateStateKey(k); err != nil {
				return nil, err
			}
		}
		keys = slices.Compact(slices.Sorted(slices.Values(keys)))
		for _, k := range keys {
			if e := m.state[k]; e != nil {
				snap.Entries = append(snap.Entries, e)
			}
		}
	}
	size := 0
	for _, e := range snap.Entries {
		size += len(e.Key) + len(e.Value) + entryOverhead
	}
	if size > q.limits.MaxJoinBytes {
		return nil, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state of mount %q of %s is %d bytes; one read may carry %d (name fewer keys)", name, q.name, size, q.limits.MaxJoinBytes)
	}
	return snap, nil
}

// History reads message mount name: the retained events with an offset
// above since, oldest first, at most limit of them (0: DefaultHistoryLimit;
// capped at MaxHistoryLimit) and at most MaxReplayBytes of payload (but at
// least one event, so that paging always advances). missed is resume's rule:
// an event of the mount after since was evicted (by count or age), so the
// page starts later than asked; since 0 on a mount that has evicted events
// is missed too. more says retained events follow the page. History ages
// out old events first, as a join would, and changes nothing else.
func (q *Queue) History(name string, since uint64, limit int, now time.Time) (*imqpb.HistoryPage, error) {
	m, err := q.readMount(name, imqpb.MountKind_MESSAGE)
	if err != nil {
		return nil, err
	}
	switch {
	case limit <= 0:
		limit = DefaultHistoryLimit
	case limit > MaxHistoryLimit:
		limit = MaxHistoryLimit
	}
	q.expire(m, now)
	from := sort.Search(len(m.hist), func(i int) bool { return m.hist[i].Offset > since })
	end, budget := from, q.limits.MaxReplayBytes
	for end < len(m.hist) && end-from < limit {
		b := eventBytes(m.hist[end])
		if end > from && b > budget {
			break
		}
		budget -= b
		end++
	}
	page := &imqpb.HistoryPage{Epoch: q.epoch, Head: q.head, Missed: since < m.evicted, More: end < len(m.hist)}
	if end > from {
		page.Events = slices.Clone(m.hist[from:end])
	}
	return page, nil
}

// Info describes the queue: its mounts by name and its subscribers by
// session, with each subscriber's Gateway as it joined (the caller maps
// it to what it shows). The subscribers listed are bounded by MaxJoinBytes
// (the first by session); the mounts are few. It ages out old events first,
// as History does.
func (q *Queue) Info(now time.Time) *imqpb.QueueInfoResult {
	res := &imqpb.QueueInfoResult{Queue: q.name, Epoch: q.epoch, Head: q.head, CreatedMs: q.created.UnixMilli()}
	for _, name := range slices.Sorted(maps.Keys(q.mounts)) {
		m := q.mounts[name]
		mi := &imqpb.MountInfo{Name: name, Kind: m.kind}
		if m.kind == imqpb.MountKind_STATE {
			mi.Keys, mi.Bytes = uint32(len(m.state)), uint64(m.stateBytes)
		} else {
			q.expire(m, now)
			mi.Retained = uint32(len(m.hist))
			if len(m.hist) > 0 {
				mi.OldestOffset = m.hist[0].Offset
			}
		}
		res.Mounts = append(res.Mounts, mi)
	}
	budget := q.limits.MaxJoinBytes
	res.SubscribersTotal = uint32(len(q.subs))
	for _, session := range slices.Sorted(maps.Keys(q.subs)) {
		s := q.subs[session]
		size := len(s.User) + len(s.Session) + len(s.Gateway) + entryOverhead
		for _, mn := range s.mounts {
			size += len(mn) + 2
		}
		if budget -= size; budget < 0 {
			break
		}
		res.Subscribers = append(res.Subscribers, &imqpb.SubscriberInfo{
			User: s.User, Session: s.Session, Gateway: s.Gateway, Mounts: slices.Clone(s.mounts),
		})
	}
	return res
}

// drop evicts the n oldest events of m for reason.
func (q *Queue) drop(m *mount, n int, reason EvictReason) {
	if n <= 0 {
		return
	}
	b := 0
	for _, ev := range m.hist[:n] {
		b += eventBytes(ev)
	}
	m.evicted = m.hist[n-1].Offset
	clear(m.hist[:n])
	m.hist = m.hist[n:]
	if len(m.hist) == 0 {
		m.hist = nil // let the old backing array go
	}
	m.histBytes -= b
	q.bytes -= int64(b)
	q.history -= int64(b)
	q.evicted[reason].Events += int64(n)
	q.evicted[reason].Bytes += int64(b)
	q.anyEvict = true
}

// expire drops the events of m older than HistoryAge.
func (q *Queue) expire(m *mount, now time.Time) {
	age := q.limits.HistoryAge
	if age <= 0 || len(m.hist) == 0 {
		return
	}
	cutoff := now.Add(-age).UnixMilli()
	n := sort.Search(len(m.hist), func(i int) bool { return m.hist[i].TimeMs > cutoff })
	q.drop(m, n, EvictAge)
}

// replay returns the events a join with spec should receive and whether the
// subscriber missed some for good. budget bounds the payload bytes returned
// across all mounts of one join.
func (m *mount) replay(spec *imqpb.MountSpec, epoch uint64, budget *int) (events []*imqpb.Event, missed bool) {
	var from int // index of the first event to replay
	switch r := spec.GetResume(); {
	case r != nil && r.GetEpoch() != epoch:
		missed = true // another incarnation: everything after r is gone
	case r != nil:
		missed = r.GetOffset() < m.evicted
		from = sort.Search(len(m.hist), func(i int) bool { return m.hist[i].Offset > r.GetOffset() })
	case spec.GetRecent() > 0:
		from = max(0, len(m.hist)-int(spec.GetRecent()))
	default:
		return nil, false
	}
	// Keep the newest events that fit the budget.
	start := len(m.hist)
	for start > from && *budget >= eventBytes(m.hist[start-1]) {
		start--
		*budget -= eventBytes(m.hist[start])
	}
	if start > from && spec.GetResume() != nil {
		missed = true
	}
	if start == len(m.hist) {
		return nil, missed
	}
	return append([]*imqpb.Event(nil), m.hist[start:]...), missed
}

func eventBytes(ev *imqpb.Event) int { return len(ev.Payload) + len(ev.Sender) + entryOverhead }

func (m *mount) snapshot() []*imqpb.StateEntry {
	out := make([]*imqpb.StateEntry, 0, len(m.state))
	for _, e := range m.state {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Snapshot returns the whole queue as a bucket hand-off carries it
// (docs/handoff.md): RestoreQueue on another node makes an identical
// queue of it. gatewayID maps each subscriber's Gateway (what the caller
// joined it with: the server's link key) to the gateway's id, which means
// something on another node. The snapshot shares the queue's events and
// state entries, which are never changed once made; it changes nothing.
func (q *Queue) Snapshot(gatewayID func(gateway string) string) *imqpb.QueueSnapshot {
	s := &imqpb.QueueSnapshot{
		Name:               q.name,
		Epoch:              q.epoch,
		Head:               q.head,
		CreatedUnixNano:    q.created.UnixNano(),
		LastActiveUnixNano: q.lastActive.UnixNano(),
		Mounts:             make([]*imqpb.MountSnapshot, 0, len(q.mounts)),
		Subscribers:        make([]*imqpb.SubscriberSnapshot, 0, len(q.subs)),
	}
	for _, name := range slices.Sorted(maps.Keys(q.mounts)) {
		m := q.mounts[name]
		ms := &imqpb.MountSnapshot{Name: name, Kind: m.kind, Evicted: m.evicted}
		if m.kind == imqpb.MountKind_STATE {
			ms.State = m.snapshot()
		} else {
			// A copy: drop clears the slots of the queue's own slice.
			ms.History = slices.Clone(m.hist)
		}
		s.Mounts = append(s.Mounts, ms)
	}
	for _, session := range slices.Sorted(maps.Keys(q.subs)) {
		sub := q.subs[session]
		s.Subscribers = append(s.Subscribers, &imqpb.SubscriberSnapshot{
			Gateway: gatewayID(sub.Gateway), User: sub.User, Session: sub.Session, Mounts: slices.Clone(sub.mounts),
		})
	}
	return s
}

// maxSnapshotID bounds a snapshot subscriber's gateway id and session,
// which no limit of the queue bounds otherwise: generous for what gateways
// make (a prefix and a serial), small enough that a hostile snapshot's
// strings stay bounded.
const maxSnapshotID = 1024

// RestoreQueue makes the queue s describes, with limits, as it was on the
// node that snapshotted it: same epoch, offsets, history, evictions,
// state versions and subscribers, and Bytes and HistoryBytes recomputed by
// this node's rules. gateway maps a subscriber's gateway id to what this
// node joins that gateway's subscribers with (its current link key for
// that gateway); the subscribers whose gateway it does not know (ok false)
// are left out of the queue and returned, with Gateway the gateway's id,
// for the caller to deal with, as if removed by RemoveGateway at now. The last activity, by the snapshotting
// node's clock, is taken no later than now, so that a clock ahead of this
// node's does not keep the queue from expiring when idle.
//
// s comes from another node: RestoreQueue checks it whole and returns an
// error (BAD_REQUEST for a malformed snapshot, LIMIT_EXCEEDED for one over
// limits) rather than restore anything odd. The queue shares s's events
// and entries, which must not change afterwards.
func RestoreQueue(s *imqpb.QueueSnapshot, limits *Limits, now time.Time, gateway func(id string) (key string, ok bool)) (q *Queue, unbound []Subscriber, err error) {
	if err := validateSnapshot(s, limits); err != nil {
		return nil, nil, err
	}
	q = NewQueue(s.GetName(), s.GetEpoch(), limits, time.Unix(0, s.GetCreatedUnixNano()))
	q.head = s.GetHead()
	q.lastActive = time.Unix(0, s.GetLastActiveUnixNano())
	if q.lastActive.After(now) {
		q.lastActive = now
	}
	for _, ms := range s.GetMounts() {
		m := &mount{name: ms.GetName(), kind: ms.GetKind(), gateways: make(map[string]int)}
		q.bytes += MountBytes(m.name)
		if m.kind == imqpb.MountKind_STATE {
			m.state = make(map[string]*imqpb.StateEntry, len(ms.GetState()))
			for _, e := range ms.GetState() {
				m.state[e.GetKey()] = e
				m.stateBytes += len(e.GetKey()) + len(e.GetValue())
			}
			q.bytes += int64(m.stateBytes + entryOverhead*len(m.state))
		} else {
			if len(ms.GetHistory()) > 0 {
				m.hist = slices.Clone(ms.GetHistory()) // drop clears the slots of m.hist
			}
			m.evicted = ms.GetEvicted()
			for _, ev := range m.hist {
				m.histBytes += eventBytes(ev)
			}
			q.bytes += int64(m.histBytes)
			q.history += int64(m.histBytes)
		}
		q.mounts[m.name] = m
	}
	for _, ss := range s.GetSubscribers() {
		sub := Subscriber{User: ss.GetUser(), Session: ss.GetSession(), Gateway: ss.GetGateway()}
		key, ok := gateway(sub.Gateway)
		if !ok {
			unbound = append(unbound, sub)
			continue
		}
		sub.Gateway = key
		q.subs[sub.Session] = &subscription{Subscriber: sub, mounts: slices.Clone(ss.GetMounts())}
		for _, name := range ss.GetMounts() {
			q.mounts[name].gateways[key]++
		}
	}
	if len(unbound) > 0 {
		q.lastActive = now // as RemoveGateway: they left now
	}
	return q, unbound, nil
}

// validateSnapshot checks everything RestoreQueue relies on: names,
// the total order (offsets and versions unique, at most head, each mount's
// history in order and after its evicted offset) and limits.
func validateSnapshot(s *imqpb.QueueSnapshot, l *Limits) error {
	if s == nil {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "queue snapshot: none")
	}
	if err := checkSnapshot(s, l); err != nil {
		// LIMIT_EXCEEDED: this node's limits are tighter than the sender's.
		// Anything else is a malformed snapshot, whatever the check said.
		code := imqpb.Code_BAD_REQUEST
		if imqerr.CodeOf(err) == imqpb.Code_LIMIT_EXCEEDED {
			code = imqpb.Code_LIMIT_EXCEEDED
		}
		return imqerr.New(code, "queue snapshot of %q: %s", s.GetName(), imqerr.From(err).Message)
	}
	return nil
}

func checkSnapshot(s *imqpb.QueueSnapshot, l *Limits) error {
	over := func(format string, args ...any) error {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, format, args...)
	}
	if err := wire.ValidateQueueName(s.GetName()); err != nil {
		return err
	}
	if s.GetEpoch() == 0 {
		return fmt.Errorf("epoch 0")
	}
	head := s.GetHead()
	if len(s.GetMounts()) > l.MaxMounts {
		return over("%d mounts; a queue may have %d", len(s.GetMounts()), l.MaxMounts)
	}
	kinds := make(map[string]imqpb.MountKind, len(s.GetMounts()))
	offsets := make(map[uint64]bool) // every event offset and state version: the total order
	for _, m := range s.GetMounts() {
		name := m.GetName()
		if err := wire.ValidateMountName(name); err != nil {
			return err
		}
		if err := wire.ValidateMountKind(name, m.GetKind()); err != nil {
			return err
		}
		if _, dup := kinds[name]; dup {
			return fmt.Errorf("mount %q twice", name)
		}
		kinds[name] = m.GetKind()
		if m.GetKind() == imqpb.MountKind_STATE {
			if len(m.GetHistory()) > 0 || m.GetEvicted() != 0 {
				return fmt.Errorf("state mount %q has history", name)
			}
			if err := validateStateSnapshot(m, l, head, offsets); err != nil {
				return err
			}
			continue
		}
		if len(m.GetState()) > 0 {
			return fmt.Errorf("message mount %q has state", name)
		}
		if err := validateHistorySnapshot(s.GetName(), m, l, head, offsets); err != nil {
			return err
		}
	}
	if len(s.GetSubscribers()) > l.MaxSubscribers {
		return over("%d subscribers; a queue may have %d", len(s.GetSubscribers()), l.MaxSubscribers)
	}
	sessions := make(map[string]bool, len(s.GetSubscribers()))
	for _, sub := range s.GetSubscribers() {
		switch {
		case sub.GetSession() == "" || len(sub.GetSession()) > maxSnapshotID:
			return fmt.Errorf("a subscriber's session is %d bytes", len(sub.GetSession()))
		case sub.GetGateway() == "" || len(sub.GetGateway()) > maxSnapshotID:
			return fmt.Errorf("subscriber %q: gateway id of %d bytes", sub.GetSession(), len(sub.GetGateway()))
		case sub.GetUser() == "" || len(sub.GetUser()) > wire.MaxUserID:
			return fmt.Errorf("subscriber %q: user id of %d bytes", sub.GetSession(), len(sub.GetUser()))
		case sessions[sub.GetSession()]:
			return fmt.Errorf("subscriber %q twice", sub.GetSession())
		case len(sub.GetMounts()) == 0:
			return fmt.Errorf("subscriber %q has no mounts", sub.GetSession())
		}
		sessions[sub.GetSession()] = true
		for i, name := range sub.GetMounts() {
			if _, ok := kinds[name]; !ok {
				return fmt.Errorf("subscriber %q: no mount %q", sub.GetSession(), name)
			}
			if slices.Contains(sub.GetMounts()[:i], name) {
				return fmt.Errorf("subscriber %q: mount %q twice", sub.GetSession(), name)
			}
		}
	}
	return nil
}

// validateStateSnapshot checks state mount m's entries against l and head,
// and adds their versions to offsets.
func validateStateSnapshot(m *imqpb.MountSnapshot, l *Limits, head uint64, offsets map[uint64]bool) error {
	if len(m.GetState()) > l.MaxStateKeys {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state mount %q has %d keys; the limit is %d", m.GetName(), len(m.GetState()), l.MaxStateKeys)
	}
	size := 0
	for i, e := range m.GetState() {
		if err := wire.ValidateStateKey(e.GetKey()); err != nil {
			return err
		}
		if i > 0 && e.GetKey() <= m.GetState()[i-1].GetKey() {
			return fmt.Errorf("state mount %q: key %q out of order or twice", m.GetName(), e.GetKey())
		}
		if len(e.GetValue()) > l.MaxStateValue {
			return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state mount %q: key %q holds %d bytes; the limit is %d", m.GetName(), e.GetKey(), len(e.GetValue()), l.MaxStateValue)
		}
		if v := e.GetVersion(); v == 0 || v > head || offsets[v] {
			return fmt.Errorf("state mount %q: key %q has version %d (head %d; each offset once)", m.GetName(), e.GetKey(), v, head)
		}
		offsets[e.GetVersion()] = true
		size += len(e.GetKey()) + len(e.GetValue())
	}
	if size > l.MaxStateBytes {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "state mount %q holds %d bytes; the limit is %d", m.GetName(), size, l.MaxStateBytes)
	}
	return nil
}

// validateHistorySnapshot checks message mount m of queue against l and
// head, and adds its offsets to offsets.
func validateHistorySnapshot(queue string, m *imqpb.MountSnapshot, l *Limits, head uint64, offsets map[uint64]bool) error {
	hist := m.GetHistory()
	if len(hist) > l.HistoryLen {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "message mount %q retains %d events; the limit is %d", m.GetName(), len(hist), l.HistoryLen)
	}
	if m.GetEvicted() > head {
		return fmt.Errorf("message mount %q: evicted offset %d beyond head %d", m.GetName(), m.GetEvicted(), head)
	}
	size, prev := 0, m.GetEvicted()
	for _, ev := range hist {
		switch {
		case ev == nil:
			return fmt.Errorf("message mount %q: an empty event", m.GetName())
		case ev.GetQueue() != queue || ev.GetMount() != m.GetName():
			return fmt.Errorf("message mount %q: event %d names another queue or mount", m.GetName(), ev.GetOffset())
		case ev.GetOffset() <= prev || ev.GetOffset() > head || offsets[ev.GetOffset()]:
			return fmt.Errorf("message mount %q: event offset %d after %d (evicted %d, head %d; each offset once)", m.GetName(), ev.GetOffset(), prev, m.GetEvicted(), head)
		case len(ev.GetPayload()) > l.MaxPayload:
			return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "message mount %q: event %d is %d bytes; the limit is %d", m.GetName(), ev.GetOffset(), len(ev.GetPayload()), l.MaxPayload)
		case len(ev.GetSender()) > wire.MaxUserID:
			return fmt.Errorf("message mount %q: event %d's sender is %d bytes", m.GetName(), ev.GetOffset(), len(ev.GetSender()))
		}
		prev = ev.GetOffset()
		offsets[prev] = true
		size += eventBytes(ev)
	}
	// The newest event is always kept, even past HistoryBytes: see Publish.
	if size > l.HistoryBytes && len(hist) > 1 {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "message mount %q retains %d bytes; the limit is %d", m.GetName(), size, l.HistoryBytes)
	}
	return nil
}
