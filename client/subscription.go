package client

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// Mount names one mount of a queue to join. Build it with Messages or State.
type Mount struct {
	Name string
	Kind imqpb.MountKind
	// Recent asks a message mount for up to this many of its most recent
	// events on the first join (bounded by the server's history). Rejoins
	// resume instead.
	Recent uint32
}

// Messages is a message mount: events with offsets, replayed on resume.
func Messages(name string) Mount {
	return Mount{Name: name, Kind: imqpb.MountKind_MESSAGE}
}

// State is a state mount: key/value state, a snapshot on join, then changes.
func State(name string) Mount {
	return Mount{Name: name, Kind: imqpb.MountKind_STATE}
}

// WithRecent returns m asking for up to n recent events on the first join.
func (m Mount) WithRecent(n uint32) Mount {
	m.Recent = n
	return m
}

// Kind says what an Update carries.
type Kind uint8

const (
	// KindEvent is an event published to a message mount.
	KindEvent Kind = iota + 1
	// KindStateSet is a key of a state mount set to Payload.
	KindStateSet
	// KindStateDeleted is a key of a state mount deleted.
	KindStateDeleted
	// KindGap says events of a message mount were lost for good: the
	// history window passed while the client was away, or the queue was
	// recreated. Reason and Message say why. State mounts need no gap: they
	// are brought level by KindStateSet and KindStateDeleted updates.
	KindGap
	// KindClosed is the last update: the subscription ended without Leave.
	// Reason and Message say why; the channel is closed after it.
	KindClosed
)

var kindNames = [...]string{"Kind(0)", "Event", "StateSet", "StateDeleted", "Gap", "Closed"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "Kind(?)"
}

// Update is one thing that happened on a joined queue, delivered in the
// queue's total order.
//
// Payload aliases memory that the client keeps (the state mirror): read it,
// do not modify it.
type Update struct {
	Kind  Kind
	Queue string
	Mount string
	// Offset is the event's place in the queue, or the state change's
	// version (the same counter). It is 0 for a deletion found by comparing
	// snapshots, for gaps and for KindClosed.
	Offset uint64
	// Sender is the publisher's user id, "" for the backend or unknown.
	Sender string
	// Time is the server's time of the publish or change; zero if unknown.
	Time time.Time
	// Key is the state key (KindStateSet, KindStateDeleted).
	Key string
	// Payload is the event payload, or the new value (KindStateSet).
	Payload []byte
	// Reason is the server's reason for a gap or a close, when one caused
	// it (REASON_NODE_LOST, REASON_SHUTDOWN, REASON_KICKED, ...).
	Reason imqpb.Reason
	// Message is a human-readable account of a gap or a close.
	Message string
}

// Subscription is a joined queue. The client keeps it joined across
// reconnects and node losses until Leave, Close, or a refusal to rejoin.
type Subscription struct {
	c     *Client
	queue string
	ch    chan Update
	done  chan struct{} // closed by finish: no more deliveries
	once  sync.Once

	sendMu   sync.Mutex // held while sending on ch, so finish never closes it under a sender
	chClosed bool       // guarded by sendMu

	mu sync.Mutex
	// Guarded by mu. t is written only by the goroutine that delivers to
	// the subscription (the current connection's reader, one at a time),
	// which may therefore read it without mu.
	t        tracker
	retry    *time.Timer // a rejoin waiting after a retryable refusal
	attempts int         // refused rejoins in a row
}

func newSubscription(c *Client, queue string, mounts []Mount, buffer int) *Subscription {
	return &Subscription{
		c:     c,
		queue: queue,
		ch:    make(chan Update, buffer),
		done:  make(chan struct{}),
		t:     newTracker(queue, mounts),
	}
}

// Join subscribes to some mounts of queue, creating them if needed, and
// returns once the server has answered. Updates then delivers the recent
// events asked for and each state mount's snapshot (as KindStateSet), and
// everything after, in queue order. Unless they outnumber the channel's
// buffer, those first updates are in the channel, and the snapshot in
// State, when Join returns.
//
// A queue can be joined once per client (ErrAlreadyJoined). If ctx ends
// before the answer, Join fails but the server may have joined: its events
// are dropped until a Join of the same queue replaces it or the connection
// ends.
func (c *Client) Join(ctx context.Context, queue string, mounts ...Mount) (*Subscription, error) {
	if err := checkMounts(mounts); err != nil {
		return nil, err
	}
	s := newSubscription(c, queue, mounts, c.opts.bufferSize)
	c.mu.Lock()
	switch {
	case c.err != nil:
		c.mu.Unlock()
		return nil, closedError(c.err)
	case c.subs[queue] != nil:
		c.mu.Unlock()
		return nil, ErrAlreadyJoined
	}
	c.subs[queue] = s
	c.mu.Unlock()

	m := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: queue, Mounts: s.t.specs()}}}
	r, err := c.request(ctx, m, s)
	if err == nil && r.GetJoined() == nil {
		err = &Error{Code: imqpb.Code_INTERNAL, Message: "join answered without joined"}
	}
	if err != nil {
		c.remove(s)
		s.finish()
		return nil, err
	}
	return s, nil
}

func checkMounts(mounts []Mount) error {
	if len(mounts) == 0 {
		return &Error{Code: imqpb.Code_INVALID_MOUNT, Message: "join needs at least one mount"}
	}
	for i, m := range mounts {
		if m.Kind != imqpb.MountKind_MESSAGE && m.Kind != imqpb.MountKind_STATE {
			return &Error{Code: imqpb.Code_INVALID_MOUNT, Message: "mount " + m.Name + ": kind " + m.Kind.String()}
		}
		for _, prev := range mounts[:i] {
			if prev.Name == m.Name {
				return &Error{Code: imqpb.Code_INVALID_MOUNT, Message: "mount " + m.Name + " named twice"}
			}
		}
	}
	return nil
}

// Queue returns the queue's name.
func (s *Subscription) Queue() string { return s.queue }

// Updates returns the channel of updates, in queue order. It is closed after
// a KindClosed update, or without one after Leave or Client.Close.
//
// The channel is the only buffer: when it is full, the connection's reader
// waits for the application, and so do all subscriptions and replies on that
// connection. A reader that falls behind for long is cut off by the server
// as a slow consumer; the client then reconnects and resumes, reporting a
// KindGap if the history window passed. Drain every subscription's channel.
func (s *Subscription) Updates() <-chan Update { return s.ch }

// Epoch returns the incarnation of the queue as of the last join. It
// changes when the queue was recreated, which comes with a KindGap.
func (s *Subscription) Epoch() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.epoch
}

// State returns a copy of the client's mirror of a state mount: the snapshot
// with every change applied that was put in the Updates channel, which the
// application may not have read yet. It is nil for a mount that is not a
// joined state mount.
func (s *Subscription) State(mount string) map[string][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.t.mount(mount)
	if m == nil || m.kind != imqpb.MountKind_STATE {
		return nil
	}
	out := make(map[string][]byte, len(m.state))
	for k, v := range m.state {
		out[k] = bytes.Clone(v)
	}
	return out
}

// Leave unsubscribes and closes Updates. It is done locally at once; the
// error only reports whether the server confirmed (a lost connection counts
// as confirmation, since it ends every subscription).
func (s *Subscription) Leave(ctx context.Context) error {
	c := s.c
	if !c.remove(s) {
		return nil
	}
	s.finish()
	c.mu.Lock()
	cn := c.cn
	c.mu.Unlock()
	if cn == nil {
		return nil // the next connection will not rejoin it
	}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	m := &imqpb.ClientMessage{Id: c.nextID.Add(1), Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: s.queue}}}
	msg, err := cn.roundTrip(ctx, m, call{ch: make(chan *imqpb.ServerMessage, 1)})
	switch {
	case errors.Is(err, ErrConnectionLost), errors.Is(err, ErrClosed), errors.Is(err, errStale):
		return nil
	case err != nil:
		return err
	case msg.GetReply().GetCode() == imqpb.Code_NOT_JOINED:
		return nil
	}
	return replyError(msg.GetReply())
}

// deliver sends u to the application, waiting for room. It gives up when
// the subscription finishes or stop is closed, and reports whether u went.
func (s *Subscription) deliver(u Update, stop <-chan struct{}) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.chClosed {
		return false
	}
	select {
	case s.ch <- u:
		return true
	case <-s.done:
		return false
	case <-stop:
		return false
	}
}

// offer sends u only if the channel has room, and reports whether it did.
func (s *Subscription) offer(u Update) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.chClosed {
		return false
	}
	select {
	case s.ch <- u:
		return true
	default:
		return false
	}
}

// publish delivers a live update and records it once delivered.
func (s *Subscription) publish(u Update, stop <-chan struct{}) {
	if s.deliver(u, stop) {
		s.mu.Lock()
		s.t.commit(&u)
		s.mu.Unlock()
	}
}

func (s *Subscription) onEvent(ev *imqpb.Event, stop <-chan struct{}) {
	if m := s.t.live(ev.GetMount(), imqpb.MountKind_MESSAGE, ev.GetOffset()); m != nil {
		s.publish(eventUpdate(s.queue, m.name, ev), stop)
	}
}

func (s *Subscription) onState(sc *imqpb.StateChange, stop <-chan struct{}) {
	if m := s.t.live(sc.GetMount(), imqpb.MountKind_STATE, sc.GetVersion()); m != nil {
		s.publish(stateUpdate(s.queue, m.name, sc), stop)
	}
}

// begin starts applying a Joined (see tracker); ok is false if the
// subscription has finished meanwhile.
func (s *Subscription) begin(j *imqpb.Joined, reason imqpb.Reason) (plan []Update, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.finished() {
		return nil, false
	}
	s.attempts = 0
	if s.retry != nil { // an older rejoin's retry: this join supersedes it
		s.retry.Stop()
		s.retry = nil
	}
	return s.t.begin(j, reason), true
}

// apply delivers the updates planned by begin(j) with send, recording each
// one sent, then the join's head. It returns the updates send refused:
// they are planned again by the next join.
func (s *Subscription) apply(j *imqpb.Joined, plan []Update, send func(Update) bool) (rest []Update) {
	for i := range plan {
		if !send(plan[i]) {
			return plan[i:]
		}
		s.mu.Lock()
		s.t.commit(&plan[i])
		s.mu.Unlock()
	}
	s.mu.Lock()
	s.t.settle(j)
	s.mu.Unlock()
	return nil
}

// end delivers a last update, then finishes.
func (s *Subscription) end(u Update, stop <-chan struct{}) {
	s.deliver(u, stop)
	s.finish()
}

// finish ends deliveries and closes Updates. It is idempotent and never
// waits for the application.
func (s *Subscription) finish() {
	s.once.Do(func() {
		close(s.done)
		s.mu.Lock()
		if s.retry != nil {
			s.retry.Stop()
			s.retry = nil
		}
		s.mu.Unlock()
		s.sendMu.Lock()
		s.chClosed = true
		close(s.ch)
		s.sendMu.Unlock()
	})
}

func (s *Subscription) finished() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// joined returns whether a first join succeeded, so that reconnects rejoin.
func (s *Subscription) joined() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.joined
}
