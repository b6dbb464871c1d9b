package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/gorilla/websocket"

	"github.com/imq-dev/imq/internal/reasons"
	imqpb "github.com/imq-dev/imq/proto"
)

// clientName goes in every connect, for the server's logs.
const clientName = "imq-go/0.1"

// ConnState is the state of a client's connection.
type ConnState uint8

const (
	// Connected: requests are sent at once.
	Connected ConnState = iota + 1
	// Reconnecting: the connection was lost; requests wait for the next.
	Reconnecting
	// Closed: by Close, or for good by the server (see Client.Err).
	Closed
)

func (s ConnState) String() string {
	switch s {
	case Connected:
		return "connected"
	case Reconnecting:
		return "reconnecting"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("ConnState(%d)", uint8(s))
}

// Client is a connection to IMQ that reconnects by itself and keeps its
// subscriptions joined. It is safe for concurrent use.
type Client struct {
	opts   options
	url    string
	log    *slog.Logger
	nextID atomic.Uint64 // request ids; 0 is never used

	ctx    context.Context // canceled when the client closes
	cancel context.CancelFunc
	wg     sync.WaitGroup // run, rejoin retries, and last deliveries (endSub)

	mu sync.Mutex
	// Guarded by mu.
	cn      *conn         // nil while not connected
	ready   chan struct{} // closed once cn is set; replaced when it is lost
	subs    map[string]*Subscription
	ending  map[*Subscription]struct{} // delivering their KindClosed (endSub)
	closed  bool                       // Close was called
	state   ConnState
	err     error // why the client closed; nil while open
	user    string
	session string
}

// Dial connects to the gateway at url (ws://host:port/ws), authenticates,
// and returns once connected. Connection failures are retried with backoff
// until ctx ends (bounded by the request timeout if ctx has no deadline);
// refused credentials are not: Dial then returns an *Error with code
// UNAUTHORIZED.
//
// The client then runs one supervising goroutine until Close, plus two per
// connection.
func Dial(ctx context.Context, rawURL string, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("imq: url: %w", err)
	}
	if o.user != "" {
		q := u.Query()
		q.Set("user", o.user)
		u.RawQuery = q.Encode()
	}
	c := &Client{
		opts:   o,
		url:    u.String(),
		log:    o.logger,
		ready:  make(chan struct{}),
		subs:   map[string]*Subscription{},
		ending: map[*Subscription]struct{}{},
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())

	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	attempt := 0
	cn, err := c.connectLoop(ctx, &attempt, 0)
	if err != nil {
		c.cancel()
		return nil, err
	}
	c.attach(cn)
	c.wg.Add(1)
	go c.run(cn)
	return c, nil
}

// Close closes the connection and every subscription, and returns once all
// the client's goroutines have ended. Requests in flight fail with
// ErrClosed. It is idempotent and always returns nil.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClosed
	}
	c.closed = true
	subs := slices.Collect(maps.Values(c.subs))
	subs = append(subs, slices.Collect(maps.Keys(c.ending))...)
	clear(c.subs)
	c.mu.Unlock()
	c.cancel()
	for _, s := range subs {
		s.finish()
	}
	c.wg.Wait()
	c.setState(Closed)
	return nil
}

// Err returns nil while the client is open, ErrClosed after Close, and
// otherwise why it closed by itself: refused credentials (*Error), a server
// that said not to reconnect (*GoodbyeError), or, without WithReconnect, the
// lost connection's cause.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// State returns the connection state.
func (c *Client) State() ConnState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// User returns the user id the server authenticated.
func (c *Client) User() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.user
}

// Session returns the session id of the current (or last) connection.
func (c *Client) Session() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.session
}

// Publish appends payload to a message mount and returns its offset. It is
// sent once: on ErrConnectionLost it may or may not have happened.
func (c *Client) Publish(ctx context.Context, queue, mount string, payload []byte) (offset uint64, err error) {
	m := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: queue, Mount: mount, Payload: payload}}}
	r, err := c.request(ctx, m, nil)
	return r.GetPublished().GetOffset(), err
}

// SetState sets key of a state mount to value and returns the change's
// version (its offset in the queue).
func (c *Client) SetState(ctx context.Context, queue, mount, key string, value []byte) (version uint64, err error) {
	m := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: queue, Mount: mount, Key: key, Value: value}}}
	r, err := c.request(ctx, m, nil)
	return r.GetStateSet().GetVersion(), err
}

// DeleteState deletes key of a state mount and returns the change's version.
func (c *Client) DeleteState(ctx context.Context, queue, mount, key string) (version uint64, err error) {
	m := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: queue, Mount: mount, Key: key, Delete: true}}}
	r, err := c.request(ctx, m, nil)
	return r.GetStateSet().GetVersion(), err
}

// Ping measures the round trip to the gateway.
func (c *Client) Ping(ctx context.Context) (rtt time.Duration, err error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	m := &imqpb.ClientMessage{Id: c.nextID.Add(1), Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}}
	cl := call{ch: make(chan *imqpb.ServerMessage, 1)}
	for {
		cn, err := c.waitConn(ctx)
		if err != nil {
			return 0, err
		}
		start := time.Now()
		msg, err := cn.roundTrip(ctx, m, cl)
		switch {
		case errors.Is(err, errStale):
			continue
		case err != nil:
			return 0, err
		case msg.GetPong() == nil:
			return 0, answerError(msg)
		}
		return time.Since(start), nil
	}
}

// request sends m once connected and waits for its reply, within the
// request timeout if ctx has no deadline. sub is set for a join.
func (c *Client) request(ctx context.Context, m *imqpb.ClientMessage, sub *Subscription) (*imqpb.Reply, error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	m.Id = c.nextID.Add(1)
	cl := call{ch: make(chan *imqpb.ServerMessage, 1), sub: sub}
	for {
		cn, err := c.waitConn(ctx)
		if err != nil {
			return nil, err
		}
		msg, err := cn.roundTrip(ctx, m, cl)
		switch {
		case errors.Is(err, errStale):
			continue // lost before sending: wait for the next connection
		case err != nil:
			return nil, err
		case msg.GetReply() == nil:
			return nil, answerError(msg)
		}
		return msg.GetReply(), replyError(msg.GetReply())
	}
}

// answerError reports an answer of the wrong kind: a refused ping, or a
// server bug.
func answerError(msg *imqpb.ServerMessage) error {
	if err := replyError(msg.GetReply()); err != nil {
		return err
	}
	return &Error{Code: imqpb.Code_INTERNAL, Message: "unexpected answer from server"}
}

func (c *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.opts.requestTimeout)
}

// waitConn returns the current connection, waiting for one while
// reconnecting.
func (c *Client) waitConn(ctx context.Context) (*conn, error) {
	for {
		c.mu.Lock()
		cn, ready, err := c.cn, c.ready, c.err
		c.mu.Unlock()
		switch {
		case err != nil:
			return nil, closedError(err)
		case cn != nil:
			return cn, nil
		}
		select {
		case <-ready:
		case <-c.ctx.Done():
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func closedError(cause error) error {
	if cause == ErrClosed {
		return ErrClosed
	}
	return fmt.Errorf("%w: %w", ErrClosed, cause)
}

// attach makes cn the current connection, unless it has closed already
// (the supervisor will see that). It reports false if the client closed.
func (c *Client) attach(cn *conn) bool {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return false
	}
	if !cn.detached {
		c.cn = cn
		close(c.ready)
	}
	c.mu.Unlock()
	c.setState(Connected)
	return true
}

// detach forgets cn for good; conn.close calls it before closing done, so
// that a request that sees done never finds cn again.
func (c *Client) detach(cn *conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cn.detached = true
	if c.cn == cn {
		c.cn = nil
		c.ready = make(chan struct{})
	}
}

func (c *Client) setState(s ConnState) {
	c.mu.Lock()
	if c.state == s || c.state == Closed {
		c.mu.Unlock()
		return
	}
	c.state = s
	c.mu.Unlock()
	if f := c.opts.onStateChange; f != nil {
		f(s)
	}
}

// run supervises the connections: when one ends it reconnects, with
// backoff, and rejoins every subscription. It is the only goroutine that
// replaces connections, and it ends when the client closes (after the last
// connection's goroutines have ended) or when reconnecting cannot help.
func (c *Client) run(cn *conn) {
	defer c.wg.Done()
	attempt := 0
	for {
		up := time.Now()
		select {
		case <-cn.done:
		case <-c.ctx.Done():
			cn.close(ErrClosed)
		}
		cn.wait() // the reader has stopped delivering: the next one may start
		cause := cn.err
		if c.ctx.Err() != nil {
			return
		}
		if fatal(cause) || !c.opts.reconnect {
			c.shutdown(cause)
			return
		}
		c.log.Warn("imq client: connection lost", "err", cause)
		c.setState(Reconnecting)
		if time.Since(up) >= c.opts.backoffMax || atOnce(cause) {
			// That connection was stable, or its gateway is going away
			// (its goodbyes spread over time): start over, waiting only
			// the minimum backoff's jitter.
			attempt = 0
		}
		first := reconnectWait(cause, c.opts.backoffMin, c.opts.backoffMax, &attempt, rand.Int64N)
		next, err := c.connectLoop(c.ctx, &attempt, first)
		switch {
		case err != nil && c.ctx.Err() != nil:
			return
		case err != nil:
			c.shutdown(err)
			return
		case !c.attach(next):
			next.close(ErrClosed)
			next.wait()
			return
		}
		c.rejoinAll(next, reasonOf(cause))
		cn = next
	}
}

// connectLoop connects, retrying with backoff until it succeeds, ctx ends,
// or retrying cannot help. It waits first before the first attempt (0: none)
// and backs off before each further one, counting them in attempt.
func (c *Client) connectLoop(ctx context.Context, attempt *int, first time.Duration) (*conn, error) {
	var last error
	wait := first
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				if last == nil {
					return nil, ctx.Err()
				}
				return nil, fmt.Errorf("%w; last attempt: %w", ctx.Err(), last)
			}
		} else if err := ctx.Err(); err != nil && last != nil { // a backoff of 0 after a failure
			return nil, fmt.Errorf("%w; last attempt: %w", err, last)
		}
		cn, err := c.connect(ctx)
		if err == nil {
			return cn, nil
		}
		if fatal(err) || !c.opts.reconnect {
			return nil, err
		}
		c.log.Debug("imq client: connect failed", "err", err, "attempt", *attempt)
		last = err
		wait = backoff(c.opts.backoffMin, c.opts.backoffMax, *attempt, rand.Int64N)
		*attempt++
	}
}

// connect dials, checks the subprotocol, and authenticates, within the
// request timeout. It returns a running connection.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.requestTimeout)
	defer cancel()
	token := c.opts.token
	if f := c.opts.tokenFunc; f != nil {
		t, err := f(ctx)
		if err != nil {
			return nil, fmt.Errorf("imq: token: %w", err)
		}
		token = t
	}
	d := websocket.DefaultDialer
	if c.opts.dialer != nil {
		d = c.opts.dialer
	}
	dialer := *d
	want := subprotocol
	if c.opts.json {
		want = subprotocolJSON
	}
	dialer.Subprotocols = []string{want}
	ws, resp, err := dialer.DialContext(ctx, c.url, c.opts.header)
	if err != nil {
		return nil, handshakeError(err, resp)
	}
	if got := ws.Subprotocol(); got != want {
		_ = ws.Close()
		return nil, fmt.Errorf("%w: asked %q, got %q", errSubprotocol, want, got)
	}
	cn := newConn(c, ws)
	cn.start()
	m := &imqpb.ClientMessage{Id: c.nextID.Add(1), Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token, Client: clientName}}}
	msg, err := cn.roundTrip(ctx, m, call{ch: make(chan *imqpb.ServerMessage, 1)})
	if err == nil {
		err = replyError(msg.GetReply())
	}
	if err == nil && msg.GetReply().GetConnected() == nil {
		err = answerError(msg)
	}
	if err != nil {
		cn.close(err)
		cn.wait()
		return nil, err
	}
	ok := msg.GetReply().GetConnected()
	c.mu.Lock()
	c.user, c.session = ok.GetUser(), ok.GetSession()
	c.mu.Unlock()
	c.log.Info("imq client: connected", "url", c.url, "user", ok.GetUser(), "session", ok.GetSession())
	return cn, nil
}

// handshakeError turns a refused upgrade into an *Error where the status
// says the credentials or the origin were refused, which is final. The
// gateway explains a refusal in a JSON body, {"error": {"code", "message"}}
// (such as a 429 for too many unauthenticated connections from one
// address); its code and message, when present, go into the error text.
func handshakeError(err error, resp *http.Response) error {
	if resp == nil {
		return fmt.Errorf("imq: dial: %w", err)
	}
	why := resp.Status
	if code, msg := refusalBody(resp); code != "" || msg != "" {
		why = fmt.Sprintf("%s: %s: %s", resp.Status, code, msg)
	}
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		return &Error{Code: imqpb.Code_UNAUTHORIZED, Message: "websocket handshake: " + why}
	case http.StatusForbidden:
		return &Error{Code: imqpb.Code_FORBIDDEN, Message: "websocket handshake: " + why}
	}
	return fmt.Errorf("imq: websocket handshake: %s: %w", why, err)
}

// maxRefusalBody bounds how much of a refused upgrade's body is read.
const maxRefusalBody = 1 << 10

// refusalBody returns the code and message of a refused upgrade's JSON
// body, {"error": {"code", "message"}}, reading at most maxRefusalBody
// bytes; both are empty when the body is absent or not that shape.
func refusalBody(resp *http.Response) (code, message string) {
	if resp.Body == nil {
		return "", ""
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxRefusalBody))
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &body) != nil {
		return "", ""
	}
	return printable(body.Error.Code, 64), printable(body.Error.Message, 256)
}

// printable returns s cut to n bytes with control characters dropped,
// so that a server's text cannot forge lines in a log.
func printable(s string, n int) string {
	if len(s) > n {
		s = s[:n]
	}
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, strings.ToValidUTF8(s, ""))
}

// shutdown closes the client for good because of cause: every subscription
// gets a KindClosed update (waiting for the application, or for Close).
func (c *Client) shutdown(cause error) {
	c.log.Error("imq client: closed", "err", cause)
	c.mu.Lock()
	if c.err == nil {
		c.err = cause
	}
	subs := slices.Collect(maps.Values(c.subs))
	c.mu.Unlock()
	c.cancel()
	for _, s := range subs {
		c.endSub(s, Update{Kind: KindClosed, Queue: s.queue, Reason: reasonOf(cause), Message: cause.Error()})
	}
	c.setState(Closed)
}

// sub returns the subscription to queue, or nil.
func (c *Client) sub(queue string) *Subscription {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.subs[queue]
}

// remove forgets s; it reports false if s was gone already.
func (c *Client) remove(s *Subscription) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.subs[s.queue] != s {
		return false
	}
	delete(c.subs, s.queue)
	return true
}

// rejoinAll rejoins, on a new connection, every subscription joined before.
func (c *Client) rejoinAll(cn *conn, reason imqpb.Reason) {
	c.mu.Lock()
	subs := slices.Collect(maps.Values(c.subs))
	c.mu.Unlock()
	for _, s := range subs {
		if s.joined() {
			c.rejoin(cn, s, reason)
		}
	}
}

// rejoin sends a Join resuming s, without waiting: the reader applies the
// answer (onJoinReply). If the connection is lost first, the next one
// rejoins.
func (c *Client) rejoin(cn *conn, s *Subscription, reason imqpb.Reason) {
	s.mu.Lock()
	if s.retry != nil {
		s.retry.Stop()
		s.retry = nil
	}
	specs := s.t.specs()
	s.mu.Unlock()
	if s.finished() {
		return
	}
	m := &imqpb.ClientMessage{Id: c.nextID.Add(1), Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: s.queue, Mounts: specs}}}
	if err := cn.send(c.ctx, m, call{sub: s, reason: reason}); err != nil {
		c.log.Debug("imq client: rejoin not sent", "queue", s.queue, "err", err)
	}
}

// onJoinReply applies the answer to a join on the reader goroutine, before
// the queue's next updates are read.
func (c *Client) onJoinReply(cn *conn, cl call, msg *imqpb.ServerMessage) {
	s, r, j := cl.sub, msg.GetReply(), msg.GetReply().GetJoined()
	switch {
	case cl.ch == nil && r.GetCode() != imqpb.Code_OK:
		c.rejoinRefused(cn, s, cl.reason, r)
		return
	case j == nil:
		if cl.ch != nil {
			cl.ch <- msg // Join reports the refusal
		}
		return
	}
	plan, ok := s.begin(j, cl.reason)
	if cl.ch != nil {
		// Deliver what fits before answering, so that Join usually returns
		// with the snapshot in State; the rest needs the application to
		// read, which it cannot before Join returns.
		if ok {
			plan = s.apply(j, plan, s.offer)
		}
		cl.ch <- msg
		ok = ok && len(plan) > 0
	}
	if ok {
		s.apply(j, plan, func(u Update) bool { return s.deliver(u, cn.done) })
	}
}

// rejoinRefused retries a rejoin later if the server said it may work, and
// otherwise ends the subscription.
func (c *Client) rejoinRefused(cn *conn, s *Subscription, reason imqpb.Reason, r *imqpb.Reply) {
	err := replyError(r)
	if !r.GetRetryable() {
		c.log.Warn("imq client: rejoin refused", "queue", s.queue, "err", err)
		c.remove(s)
		c.endSub(s, Update{Kind: KindClosed, Queue: s.queue, Reason: reason, Message: err.Error()})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.finished() {
		return
	}
	d := backoff(c.opts.backoffMin, c.opts.backoffMax, s.attempts, rand.Int64N)
	s.attempts++
	c.log.Debug("imq client: rejoin refused; retrying", "queue", s.queue, "err", err, "in", d)
	s.retry = time.AfterFunc(d, func() { c.retryRejoin(s, reason) })
}

// retryRejoin runs on a timer's goroutine, counted in wg so that Close
// waits for it.
func (c *Client) retryRejoin(s *Subscription, reason imqpb.Reason) {
	c.mu.Lock()
	cn := c.cn
	if c.err != nil || cn == nil {
		c.mu.Unlock()
		return // closed, or reconnecting: the next connection rejoins
	}
	c.wg.Add(1)
	c.mu.Unlock()
	defer c.wg.Done()
	c.rejoin(cn, s, reason)
}

// onUnsubscribed handles the server ending a subscription on its own.
func (c *Client) onUnsubscribed(cn *conn, u *imqpb.Unsubscribed) {
	s := c.sub(u.GetQueue())
	if s == nil || !s.joined() {
		return
	}
	c.log.Info("imq client: unsubscribed by server", "queue", u.GetQueue(), "reason", u.GetReason(), "rejoin", u.GetRejoin())
	if reasons.Of(u.GetReason()).Again(u.GetRejoin()) {
		c.rejoin(cn, s, u.GetReason())
		return
	}
	c.remove(s)
	c.endSub(s, Update{Kind: KindClosed, Queue: s.queue, Reason: u.GetReason(), Message: u.GetMessage()})
}

// endSub delivers u as s's last update and finishes s, on a goroutine of its
// own (counted in wg): neither a lost connection nor another subscription's
// unread channel can drop or delay it. Close cuts it short.
func (c *Client) endSub(s *Subscription, u Update) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		s.finish()
		return
	}
	c.ending[s] = struct{}{}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() { // ends when the application reads u, or at Close
		defer c.wg.Done()
		s.end(u, nil)
		c.mu.Lock()
		delete(c.ending, s)
		c.mu.Unlock()
	}()
}
