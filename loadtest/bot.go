package loadtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/reasons"
	imqpb "github.com/imq-dev/imq/proto"
)

// Mount names of every room.
const (
	chatMount  = "chat"
	stateMount = "scores"
)

// lateConnect is how long a bot must have been trying to connect when the
// run ends to count as a failed connect rather than one cut short.
const lateConnect = time.Second

// requestTimeout bounds each request a bot makes.
const requestTimeout = 5 * time.Second

// bot is one simulated player. Its goroutine (run) owns every field not
// marked otherwise; other bots read pubs, intervals, lastValue and the
// flags only after the engine's barriers, which order those reads after the
// writes.
type bot struct {
	e     *engine
	id    int // unique in the run: room*BotsPerRoom + index in room
	room  int
	user  string
	queue string
	rng   *rand.Rand
	c     *client.Client
	up    atomic.Bool  // counted in the connected gauge; used by onState
	ours  atomic.Bool  // we are closing the client ourselves
	track atomic.Int64 // offsets recorded, publishes and receptions, against TrackLimit

	rcv          *receiver // current membership; nil while not joined
	lo           uint64    // lower bound of the current interval
	pubs         []uint64  // offsets of own chat publishes (tracked)
	intervals    []interval
	seq          int
	lastValue    []byte // last value of own key that the server confirmed
	lastVersion  uint64 // its version
	stateUnknown bool   // a SetState outcome is unknown: lastValue unreliable
	viewer       bool   // joined at the end, so its mirror is checked
	state        StateResult
}

func reqCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), requestTimeout)
}

// run is the bot's life: connect, join, act until the load ends, settle,
// then (after every bot settled) check convergence and clean up. Every
// step is bounded by a timeout, the load loop by the deadline and a count.
func (b *bot) run(load context.Context) {
	e := b.e
	connected := b.connect(load)
	if connected {
		if b.join() == nil {
			b.loop(load)
		}
		b.finish()
	}
	e.settled.Done()
	<-e.allSettled
	if connected && b.viewer {
		b.converge()
	}
	e.checked.Done()
	<-e.allChecked
	if connected {
		b.cleanup()
	}
}

func (b *bot) onState(s client.ConnState) {
	st := b.e.st
	switch s {
	case client.Connected:
		if !b.up.Swap(true) {
			st.connected.Add(1)
		}
	case client.Reconnecting, client.Closed:
		if b.up.Swap(false) {
			st.connected.Add(-1)
		}
		if s == client.Reconnecting {
			st.disconnect("connection_lost")
		} else if !b.ours.Load() {
			st.disconnect("closed_by_server")
		}
	}
}

func (b *bot) connect(load context.Context) bool {
	e := b.e
	opts := []client.Option{
		client.WithBackoff(50*time.Millisecond, 2*time.Second),
		client.WithRequestTimeout(requestTimeout),
		client.WithDialer(e.dialers[b.id%len(e.dialers)]),
		client.WithOnStateChange(b.onState),
	}
	if len(e.cfg.Secret) > 0 {
		tok, err := mintToken(e.cfg.Secret, b.user, e.cfg.Audience, time.Until(e.end)+time.Hour)
		if err != nil {
			e.st.connectFailure(err)
			return false
		}
		opts = append(opts, client.WithToken(tok))
	} else {
		opts = append(opts, client.WithUser(b.user))
	}
	ctx, cancel := context.WithTimeout(load, e.cfg.ConnectTimeout)
	defer cancel()
	t0 := time.Now()
	c, err := client.Dial(ctx, e.urls[b.id%len(e.urls)], opts...)
	if err != nil {
		// A bot still connecting when the run ended (or was stopped) after
		// trying for lateConnect never connected: it failed too, or a run
		// shorter than the connect timeout would pass with bots that never
		// got in. One that started just before the end was cut short.
		url := e.urls[b.id%len(e.urls)]
		tried := time.Since(t0)
		switch {
		case load.Err() == nil:
			err = connectError(url, e.cfg.ConnectTimeout, err)
		case tried < min(lateConnect, e.cfg.ConnectTimeout):
			return false
		default:
			err = fmt.Errorf("%s: still not connected when the run ended, after %v; last attempt: %w",
				url, tried.Round(time.Millisecond), lastCause(err))
		}
		e.st.connectFailure(err)
		e.log.Debug("bot could not connect", "user", b.user, "err", err)
		return false
	}
	e.st.recordConnect(time.Since(t0))
	e.st.connects.Add(1)
	b.c = c
	return true
}

// connectError says why a bot could not connect to url: for a timeout,
// within how long and what the last attempt met (the client retries until
// then), such as a refused TCP connection.
func connectError(url string, timeout time.Duration, err error) error {
	if !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", url, err)
	}
	if cause := lastCause(err); cause != err {
		return fmt.Errorf("%s: not connected within %v; last attempt: %w", url, timeout, cause)
	}
	return fmt.Errorf("%s: not connected within %v", url, timeout)
}

// lastCause returns what the last attempt of a Dial that ran out of time
// met (the client joins it to the context's error), or err itself.
func lastCause(err error) error {
	if m, ok := err.(interface{ Unwrap() []error }); ok {
		for _, cause := range m.Unwrap() {
			if !errors.Is(cause, context.DeadlineExceeded) && !errors.Is(cause, context.Canceled) {
				return cause
			}
		}
	}
	return err
}

// mintToken returns an HS256 JWT whose sub is user, expiring after ttl,
// with aud = audience when that is not empty.
func mintToken(secret []byte, user, audience string, ttl time.Duration) (string, error) {
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Subject:   user,
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
	}
	if audience != "" {
		claims.Audience = jwt.ClaimStrings{audience}
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
}

// loop acts until the load ends: chat, state updates and churn, each a
// Poisson process; the bot does one thing at a time.
func (b *bot) loop(load context.Context) {
	e := b.e
	s := e.cfg.Scenario
	chat := poisson{b.rng, s.ChatRate}
	upd := poisson{b.rng, s.StateRate}
	churn := poisson{b.rng, s.ChurnRate / 60}
	start := time.Now()
	stopAt := e.end.Sub(start)
	nChat, nUpd, nChurn := chat.next(), upd.next(), churn.next()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for range e.maxActions {
		next := min(nChat, nUpd, nChurn)
		if next >= stopAt {
			<-load.Done() // nothing more to do: stay joined, idle, until the end
			return
		}
		if wait := time.Until(start.Add(next)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-load.Done():
				return
			}
		} else if load.Err() != nil {
			return
		}
		if b.c.Err() != nil {
			return // closed for good by the server: counted in onState
		}
		if b.rcv == nil || b.rcv.isClosed() {
			b.rejoin()
		}
		switch next {
		case nChat:
			b.publish()
			nChat = later(nChat, chat.next())
		case nUpd:
			b.setState()
			nUpd = later(nUpd, upd.next())
		default:
			if b.rcv != nil {
				b.leave()
				b.join()
			}
			nChurn = later(nChurn, churn.next())
		}
	}
}

// later returns t+d, saturating at never.
func later(t, d time.Duration) time.Duration {
	if d >= never-t {
		return never
	}
	return t + d
}

func (b *bot) publish() {
	e := b.e
	payload := make([]byte, e.cfg.Scenario.MessageSize)
	binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
	ctx, cancel := reqCtx()
	off, err := b.c.Publish(ctx, b.queue, chatMount, payload)
	cancel()
	e.st.request(err)
	if err != nil {
		return
	}
	e.st.publishes.Add(1)
	if b.track.Add(1) <= int64(e.cfg.TrackLimit) {
		b.pubs = append(b.pubs, off)
	}
}

// setState sets the bot's own key to a new value and returns its version.
func (b *bot) setState() (uint64, error) {
	b.seq++
	val := fmt.Appendf(nil, `{"bot":%q,"n":%d}`, b.user, b.seq)
	ctx, cancel := reqCtx()
	v, err := b.c.SetState(ctx, b.queue, stateMount, b.user, val)
	cancel()
	b.e.st.request(err)
	if err != nil {
		if !isRefusal(err) {
			b.stateUnknown = true // sent, and it may have been applied: converge skips its pairs
		}
		return 0, err
	}
	b.e.st.stateSets.Add(1)
	b.lastValue, b.lastVersion = val, v
	return v, nil
}

// isRefusal reports whether err is the server's refusal, so the request
// certainly did not take effect. A TIMEOUT answer (the gateway stopped
// waiting for the queue node), an UNAVAILABLE one (which is also what a
// link lost with the request on it gets) and an INTERNAL one leave the
// outcome unknown, as do the client's own errors (timeout, connection
// lost).
func isRefusal(err error) bool {
	e, ok := errors.AsType[*client.Error](err)
	if !ok {
		return false
	}
	switch e.Code {
	case imqpb.Code_TIMEOUT, imqpb.Code_UNAVAILABLE, imqpb.Code_INTERNAL:
		return false
	}
	return true
}

// join joins the room and opens a membership interval at the version of an
// own state update made right after.
func (b *bot) join() error {
	e := b.e
	ctx, cancel := reqCtx()
	t0 := time.Now()
	sub, err := b.c.Join(ctx, b.queue, client.Messages(chatMount), client.State(stateMount))
	cancel()
	e.st.request(err)
	if err != nil {
		return err
	}
	e.st.recordJoin(time.Since(t0))
	e.st.joins.Add(1)
	b.rcv = &receiver{b: b, sub: sub, done: make(chan struct{})}
	go b.rcv.run()
	b.lo = math.MaxUint64 // nothing is checked if the bound is unknown
	if v, err := b.setState(); err == nil {
		b.lo = v
	}
	return nil
}

// endInterval closes the current membership interval, keeping the
// subscription: the bot sets its key and waits up to wait to receive that
// change, so every earlier offset must have arrived. If it does not come
// back in time, the interval is checked up to what arrived, and the
// offsets between that and the update are in flight: late or lost, which
// nothing received tells apart, so they are counted but not violations.
func (b *bot) endInterval(wait time.Duration) {
	r := b.rcv
	hi, want := uint64(math.MaxUint64), uint64(0) // hi is clamped to what was received, below
	if v, err := b.setState(); err == nil {
		if r.waitFor(v, wait) {
			hi = v
		} else if !r.isClosed() {
			want = v
		}
	}
	b.intervals = append(b.intervals, r.take(b.lo, hi, want))
}

func (b *bot) leave() {
	b.endInterval(b.e.cfg.SettleTimeout)
	ctx, cancel := reqCtx()
	err := b.rcv.sub.Leave(ctx)
	cancel()
	b.e.st.request(err)
	b.e.st.leaves.Add(1)
	<-b.rcv.done
	b.rcv = nil
}

// rejoin replaces a subscription the server ended (or a failed join).
func (b *bot) rejoin() {
	if r := b.rcv; r != nil {
		b.intervals = append(b.intervals, r.take(b.lo, math.MaxUint64, 0))
		r.sub.Leave(context.Background()) // local only: the server ended it
		<-r.done
		b.rcv = nil
	}
	b.join()
}

// finish ends the load for this bot: its last state update, which is the
// value every other bot must end up with, closes the last interval. The
// bot waits for it up to the drain, receiving what is still in flight.
func (b *bot) finish() {
	if b.c.Err() != nil {
		return
	}
	if b.rcv == nil || b.rcv.isClosed() {
		b.rejoin()
		if b.rcv == nil {
			return
		}
	}
	b.endInterval(b.e.cfg.Drain)
	b.viewer = !b.rcv.isClosed()
}

// converge waits until the bot's mirror of the scores mount holds every
// other bot's last value, up to the drain, and counts the pairs. A pair
// whose value is wrong although the bot received an offset at or past the
// other bot's last version diverged: that update was skipped or
// misapplied. One whose version the bot has not reached yet is behind: the
// update is still in flight (late or lost, which nothing tells apart).
func (b *bot) converge() {
	e := b.e
	var peers []*bot
	for _, o := range e.rooms[b.room] {
		switch {
		case o == b:
		case o.stateUnknown:
			b.state.Unknown++ // its last value is not known: nothing to compare
		case o.lastValue != nil:
			peers = append(peers, o)
		}
	}
	deadline := time.Now().Add(e.cfg.Drain)
	var mirror map[string][]byte
	var reached uint64
	for {
		// The mirror holds every change put in Updates, so it is read
		// after reached: whatever the receiver saw, the mirror has.
		reached = b.rcv.lastOffset()
		mirror = b.rcv.sub.State(stateMount)
		ok := true
		for _, o := range peers {
			if !bytes.Equal(mirror[o.user], o.lastValue) {
				ok = false
				break
			}
		}
		if ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, o := range peers {
		if b.state.addPair(mirror[o.user], o.lastValue, reached, o.lastVersion) == pairDiverged {
			e.st.violation("state_diverged")
		}
	}
}

// cleanup leaves, deletes the bot's key so that the room's state does not
// grow from run to run, and closes the client.
func (b *bot) cleanup() {
	ctx, cancel := reqCtx()
	defer cancel()
	if b.rcv != nil {
		b.rcv.sub.Leave(ctx)
		<-b.rcv.done
		b.rcv = nil
	}
	if b.c.Err() == nil {
		b.c.DeleteState(ctx, b.queue, stateMount, b.user)
	}
	b.ours.Store(true)
	b.c.Close()
}

// receiver drains one subscription and checks what arrives.
type receiver struct {
	b    *bot
	sub  *client.Subscription
	done chan struct{} // closed when run returns

	mu sync.Mutex
	// Guarded by mu.
	last    uint64        // highest offset received
	want    uint64        // waitFor's target, 0 if none
	reached chan struct{} // closed when last reaches want
	got     []uint64      // chat offsets received in the current interval
	lastGot uint64        // last offset appended to got
	full    bool          // the tracking cap stopped got at lastGot
	closed  bool          // the server ended the subscription
}

// run drains the subscription until it ends.
func (r *receiver) run() {
	defer close(r.done)
	b := r.b
	st := b.e.st
	limit := int64(b.e.cfg.TrackLimit)
	for u := range r.sub.Updates() {
		switch u.Kind {
		case client.KindEvent, client.KindStateSet, client.KindStateDeleted:
			if u.Kind == client.KindEvent {
				st.deliveries.Add(1)
				if len(u.Payload) >= 8 {
					sent := int64(binary.BigEndian.Uint64(u.Payload))
					if d := time.Duration(time.Now().UnixNano() - sent); d >= 0 && d < time.Hour {
						st.recordDeliver(b.id, d)
					}
				}
			} else {
				st.stateUpdates.Add(1)
			}
			r.mu.Lock()
			if u.Offset != 0 {
				switch {
				case u.Offset == r.last:
					st.violation("duplicate")
				case u.Offset < r.last:
					st.violation("out_of_order")
				default:
					r.last = u.Offset
				}
			}
			if u.Kind == client.KindEvent && !r.full {
				if b.track.Add(1) <= limit {
					r.got = append(r.got, u.Offset)
					r.lastGot = u.Offset
				} else {
					r.full = true
				}
			}
			if r.want != 0 && r.last >= r.want {
				close(r.reached)
				r.want = 0
			}
			r.mu.Unlock()
		case client.KindGap:
			if info := reasons.Of(u.Reason); info.QueueLost {
				// The queue was lost and recreated, as the server said: a
				// new epoch, whose offsets start again.
				st.disconnect("queue_lost_" + info.Label)
				b.e.lost[b.room].Store(true)
				r.mu.Lock()
				r.last = 0
				r.mu.Unlock()
				continue
			}
			st.violation("gap")
		case client.KindClosed:
			st.disconnect("unsubscribed_" + reasons.Of(u.Reason).Label)
			r.mu.Lock()
			r.closed = true
			r.mu.Unlock()
		}
	}
}

// lastOffset returns the highest offset received.
func (r *receiver) lastOffset() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

func (r *receiver) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// waitFor waits until offset v was received, up to timeout.
func (r *receiver) waitFor(v uint64, timeout time.Duration) bool {
	r.mu.Lock()
	if r.last >= v {
		r.mu.Unlock()
		return true
	}
	ch := make(chan struct{})
	r.want, r.reached = v, ch
	r.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-r.done:
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.want == v {
		r.want = 0
	}
	return r.last >= v
}

// take closes the current interval (lo, hi), clamped to what the receiver
// can vouch for, and starts collecting a new one. want, if not 0, is the
// update the interval was meant to end at, which did not come back.
func (r *receiver) take(lo, hi, want uint64) interval {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || hi == math.MaxUint64 {
		hi = min(hi, r.last+1) // everything up to the last offset received
	}
	if r.full {
		// Past the tracking cap nothing received is recorded, so what
		// lies beyond is neither checked nor called in flight.
		hi, want = min(hi, r.lastGot+1), 0
	}
	iv := interval{Lo: lo, Hi: hi, Want: want, Got: r.got}
	r.got, r.full = nil, false
	return iv
}
