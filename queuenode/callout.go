package queuenode

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// Hooks is a set of call-out hooks.
type Hooks uint8

// The call-out hooks. A hook call is a POST of JSON to Callout.URL + "/" +
// the hook's name (join, publish, set_state, leave).
const (
	// HookJoin asks whether a client may join, before the join; the answer
	// may seed state keys that are not set yet.
	HookJoin Hooks = 1 << iota
	// HookPublish asks whether a client's publish is allowed, and may
	// rewrite its payload.
	HookPublish
	// HookLeave tells that a client left (explicitly, or its gateway's link
	// closed), after the fact and asynchronously (see Callout); the answer
	// is ignored.
	HookLeave
	// HookSetState asks whether a client may set or delete a state key,
	// before the change; a refusal is FORBIDDEN. The backend cannot
	// rewrite the value.
	HookSetState

	// AllHooks is every hook, what a Callout with no Hooks makes.
	AllHooks = HookJoin | HookPublish | HookSetState | HookLeave
)

var hookNames = []struct {
	hook Hooks
	name string
}{{HookJoin, "join"}, {HookPublish, "publish"}, {HookSetState, "set_state"}, {HookLeave, "leave"}}

// hookByName returns the hook called name, or 0.
func hookByName(name string) Hooks {
	for _, hn := range hookNames {
		if hn.name == name {
			return hn.hook
		}
	}
	return 0
}

// String returns the hooks' names separated by commas ("join,publish").
func (h Hooks) String() string {
	var names []string
	for _, hn := range hookNames {
		if h&hn.hook != 0 {
			names = append(names, hn.name)
		}
	}
	return strings.Join(names, ",")
}

// Callout sends the client operations on the queues under Prefix to a
// backend at URL for approval. See Config.Callouts.
//
// A join, publish or set_state call-out is made before its operation, which waits for
// the answer; one session's operations on one queue are asked about and
// applied in the order sent. A leave notification is asynchronous: it is
// queued when the leave is applied and sent by a few workers, so it may
// reach the backend after the call-out of a later join of the same session
// (or never: it is dropped when the queue is full, or when Shutdown runs
// out of time).
//
// So every hook body carries, beside its own fields, "seq", "time_ms" and
// "node": seq is strictly increasing over all of the node's call-outs and
// is given when the node decides the operation (a join, publish or
// set_state when it asks; a leave when it applies it); time_ms is that
// moment in Unix milliseconds and node the node's id. A backend that tracks presence
// orders a session's join and leave on a queue by seq, not by arrival. seq
// starts from the node's start time in Unix microseconds, so it goes on
// increasing when the node restarts (unless it averaged more than a million
// call-outs a second); seqs of different nodes do not compare (a queue
// whose bucket moves changes node), their time_ms do, as far as the nodes'
// clocks agree.
type Callout struct {
	// Prefix selects the queues whose name starts with it, byte for byte:
	// "/room/" selects /room/1 and /room/a/b, "/room" also /roomy. It starts
	// with "/" and some valid queue name starts with it.
	Prefix string
	// URL is the backend's base URL, http or https, without query or
	// fragment: a hook is POSTed to URL + "/" + hook (a trailing "/" of URL
	// is not doubled).
	URL string
	// Hooks are the hooks called. Zero: AllHooks.
	Hooks Hooks
}

// String returns c as ParseCallout reads it, with any password in the URL
// redacted.
func (c Callout) String() string {
	u := c.URL
	if pu, err := url.Parse(c.URL); err == nil {
		u = pu.Redacted()
	}
	return c.Prefix + "=" + u + " hooks=" + c.hooks().String()
}

func (c Callout) hooks() Hooks {
	if c.Hooks == 0 {
		return AllHooks
	}
	return c.Hooks
}

// ParseCallout reads a call-out spec, the form of the --callout flag:
//
//	PREFIX=URL[ hooks=HOOK,...]
//
// PREFIX is the queue-name prefix, URL the backend's http or https base URL
// (the "=" before "http://" or "https://" splits them, so the prefix may
// itself contain "="), and hooks lists some of join, publish, set_state
// and leave (default: all four). Example: "/room/=http://127.0.0.1:9000/imq/room
// hooks=join,leave".
func ParseCallout(spec string) (Callout, error) {
	fields := strings.Fields(spec)
	if len(fields) == 0 {
		return Callout{}, errors.New("callout: empty spec; want PREFIX=URL[ hooks=join,publish,set_state,leave]")
	}
	head := fields[0]
	split := -1
	for i := 0; i < len(head); i++ {
		if head[i] != '=' {
			continue
		}
		if split < 0 {
			split = i // a fallback, for a clear message about the URL
		}
		if rest := strings.ToLower(head[i+1:]); strings.HasPrefix(rest, "http://") || strings.HasPrefix(rest, "https://") {
			split = i
			break
		}
	}
	if split < 0 {
		return Callout{}, fmt.Errorf("callout %q: want PREFIX=URL[ hooks=join,publish,set_state,leave]", spec)
	}
	c := Callout{Prefix: head[:split], URL: head[split+1:]}
	seen := false
	for _, opt := range fields[1:] {
		name, val, _ := strings.Cut(opt, "=")
		if name != "hooks" {
			return Callout{}, fmt.Errorf("callout %q: unknown option %q (the only option is hooks=join,publish,set_state,leave)", spec, opt)
		}
		if seen {
			return Callout{}, fmt.Errorf("callout %q: hooks given twice", spec)
		}
		seen = true
		for _, name := range strings.Split(val, ",") {
			h := hookByName(name)
			if h == 0 {
				return Callout{}, fmt.Errorf("callout %q: unknown hook %q (hooks are join, publish, set_state and leave)", spec, name)
			}
			c.Hooks |= h
		}
	}
	if err := c.validate(); err != nil {
		return Callout{}, err
	}
	return c, nil
}

func (c Callout) validate() error {
	if err := validPrefix(c.Prefix); err != nil {
		return fmt.Errorf("callout %w", err)
	}
	u, err := url.Parse(c.URL)
	if err != nil {
		return fmt.Errorf("callout for %s: bad URL: %w", c.Prefix, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("callout for %s: URL %q must be http:// or https:// with a host", c.Prefix, u.Redacted())
	}
	if u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return fmt.Errorf("callout for %s: URL %q must have no query or fragment (the hook name is appended to its path)", c.Prefix, u.Redacted())
	}
	if c.Hooks&^AllHooks != 0 {
		return fmt.Errorf("callout for %s: unknown hooks %#x", c.Prefix, uint8(c.Hooks&^AllHooks))
	}
	return nil
}

// validPrefix checks a queue-name prefix: it starts with "/" and some valid
// queue name starts with it.
func validPrefix(p string) error {
	if p == "" || p[0] != '/' {
		return fmt.Errorf("prefix %q must start with '/'", p)
	}
	// Some valid queue name starts with the prefix if and only if the prefix
	// followed by one more name character is valid.
	if len(p) >= wire.MaxQueueName || wire.ValidateQueueName(p+"x") != nil {
		return fmt.Errorf("prefix %q does not begin any valid queue name", p)
	}
	return nil
}

const (
	// maxCalloutBody bounds a backend's answer.
	maxCalloutBody = 1 << 20
	// calloutWaitFactor times CalloutConcurrency call-outs may wait for a
	// slot to one host; more fail at once.
	calloutWaitFactor = 16
	// leaveQueueLen bounds the leave notifications waiting to be sent; when
	// it is full a notification is dropped and counted.
	leaveQueueLen = 10_000
	// leaveWorkers send the leave notifications.
	leaveWorkers = 8
	// calloutWarnEvery rate-limits the warning logged per prefix when its
	// call-outs fail.
	calloutWarnEvery = 10 * time.Second
	// deniedMessage is a denial's message when the backend gives no reason.
	deniedMessage = "denied by the backend"
)

// Call-out outcomes, the outcome label of imq_queuenode_callouts_total. A
// leave notification is allowed (delivered), failed_allowed (not delivered;
// the leave stands) or dropped (its queue was full).
const (
	outcomeAllowed       = "allowed"
	outcomeDenied        = "denied"
	outcomeRewritten     = "rewritten"
	outcomeFailedAllowed = "failed_allowed"
	outcomeFailedDenied  = "failed_denied"
	outcomeDropped       = "dropped"
)

// callouts makes a node's call-outs. It is safe for concurrent use; nil
// when the node has none.
type callouts struct {
	routes   []*route // longest prefix first
	client   *http.Client
	timeout  time.Duration
	failOpen bool
	m        *metrics
	log      *slog.Logger
	node     string           // the node's id, in every hook body
	now      func() time.Time // Config.Now
	seq      atomic.Uint64    // the last seq given (see stamp)

	// Leave notifications: sent by leaveWorkers goroutines, started by
	// start and ended by stop.
	leaves   chan leaveNote
	ctx      context.Context // their call-outs'; cancelled when stop's wait ends
	cancel   context.CancelFunc
	stopping chan struct{} // closed by stop: drain the queue, then end
	stopOnce sync.Once
	workers  sync.WaitGroup
}

// route is one configured Callout, ready to call.
type route struct {
	Callout
	hooks    Hooks
	base     string // URL without a trailing "/"
	host     *hostLimit
	lastWarn atomic.Int64 // Unix nanoseconds of the last failure warning
}

// hostLimit bounds the call-outs in flight to one backend host.
type hostLimit struct {
	slots      chan struct{} // a token per call-out in flight
	waiting    atomic.Int64
	maxWaiting int64
}

type leaveNote struct {
	rt                   *route
	user, session, queue string
	seq                  uint64
	timeMs               int64
}

// errCalloutsBusy is a call-out refused because too many wait for its host.
var errCalloutsBusy = errors.New("too many call-outs waiting")

// calloutError is a failed call-out: its message is fit for clients (no
// URL), err is the detail for the log.
type calloutError struct {
	msg string
	err error
}

func (e *calloutError) Error() string { return e.msg }
func (e *calloutError) Unwrap() error { return e.err }

func calloutErr(msg string, err error) error { return &calloutError{msg: msg, err: err} }

func newCallouts(cfg *Config, m *metrics, log *slog.Logger) *callouts {
	if len(cfg.Callouts) == 0 {
		return nil
	}
	transport := &http.Transport{
		Proxy:               nil, // backends are local services; ignore HTTP_PROXY
		DialContext:         (&net.Dialer{Timeout: cfg.CalloutTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: cfg.CalloutConcurrency,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: cfg.CalloutTimeout,
	}
	now := cfg.Now
	if now == nil { // a Config without its defaults set, in tests
		now = time.Now
	}
	c := &callouts{
		client: &http.Client{
			Transport: transport,
			// A redirect is an answer like any non-2xx status: a failure.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		timeout:  cfg.CalloutTimeout,
		failOpen: cfg.CalloutFailOpen,
		m:        m,
		log:      log,
		node:     cfg.NodeID,
		now:      now,
		leaves:   make(chan leaveNote, leaveQueueLen),
		stopping: make(chan struct{}),
	}
	// Seqs go on increasing across restarts of the node: see Callout.
	c.seq.Store(uint64(max(now().UnixMicro(), 0)))
	c.ctx, c.cancel = context.WithCancel(context.Background())
	hosts := make(map[string]*hostLimit)
	for _, co := range cfg.Callouts {
		u, _ := url.Parse(co.URL) // validated
		key := u.Scheme + "://" + u.Host
		h := hosts[key]
		if h == nil {
			h = &hostLimit{slots: make(chan struct{}, cfg.CalloutConcurrency), maxWaiting: calloutWaitFactor * int64(cfg.CalloutConcurrency)}
			hosts[key] = h
		}
		c.routes = append(c.routes, &route{Callout: co, hooks: co.hooks(), base: strings.TrimSuffix(co.URL, "/"), host: h})
	}
	slices.SortFunc(c.routes, func(a, b *route) int { return len(b.Prefix) - len(a.Prefix) })
	return c
}

// match returns the route of queue: the longest prefix it starts with, or
// nil.
func (c *callouts) match(queue string) *route {
	for _, rt := range c.routes {
		if strings.HasPrefix(queue, rt.Prefix) {
			return rt
		}
	}
	return nil
}

// needsCallout reports whether req waits for a call-out on rt before it
// runs.
func needsCallout(rt *route, req *imqpb.NodeRequest) bool {
	switch req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		return rt.hooks&HookJoin != 0
	case *imqpb.NodeRequest_Publish:
		return rt.hooks&HookPublish != 0
	case *imqpb.NodeRequest_SetState:
		return rt.hooks&HookSetState != 0
	}
	return false
}

// stamp gives an operation the node has decided on its seq and time_ms
// (see Callout).
func (c *callouts) stamp() (seq uint64, timeMs int64) {
	return c.seq.Add(1), c.now().UnixMilli()
}

// calloutResult is what call-outs decided for a request run by a chain
// (zero for a request that needed none).
type calloutResult struct {
	seed      map[string]map[string]json.RawMessage // join: state to set first where unset
	payload   []byte                                // publish: the rewritten payload
	rewritten bool
}

// The hook bodies. Seq, TimeMs and Node are documented on Callout.

// hookHeader is what every hook body starts with.
type hookHeader struct {
	Hook    string `json:"hook"`
	Seq     uint64 `json:"seq"`
	TimeMs  int64  `json:"time_ms"`
	Node    string `json:"node"`
	User    string `json:"user"`
	Session string `json:"session"`
	Queue   string `json:"queue"`
}

// header returns the header of a hook call about queue by req's session,
// stamped with the next seq.
func (c *callouts) header(hook string, req *imqpb.NodeRequest, queue string) hookHeader {
	h := hookHeader{Hook: hook, Node: c.node, User: req.GetUser(), Session: req.GetSession(), Queue: queue}
	h.Seq, h.TimeMs = c.stamp()
	return h
}

type joinCall struct {
	hookHeader
	Mounts []string `json:"mounts"`
}

type joinAnswer struct {
	Allow  *bool                                 `json:"allow"`
	Reason string                                `json:"reason"`
	State  map[string]map[string]json.RawMessage `json:"state"`
}

type publishCall struct {
	hookHeader
	Mount      string          `json:"mount"`
	Data       json.RawMessage `json:"data,omitempty"`
	DataBase64 *string         `json:"data_base64,omitempty"` // set, "" included, for every payload not sent as JSON
}

type publishAnswer struct {
	Allow      *bool           `json:"allow"`
	Reason     string          `json:"reason"`
	Data       json.RawMessage `json:"data"`
	DataBase64 *string         `json:"data_base64"`
}

type setStateCall struct {
	hookHeader
	Mount       string          `json:"mount"`
	Key         string          `json:"key"`
	Value       json.RawMessage `json:"value,omitempty"`
	ValueBase64 *string         `json:"value_base64,omitempty"` // set, "" included, for every value not sent as JSON
	Delete      bool            `json:"delete"`
}

type setStateAnswer struct {
	Allow  *bool  `json:"allow"`
	Reason string `json:"reason"`
}

// join asks rt's backend whether req may join j's queue. It returns the
// state to seed, or DENIED.
func (c *callouts) join(ctx context.Context, rt *route, req *imqpb.NodeRequest, j *imqpb.Join) (map[string]map[string]json.RawMessage, error) {
	call := joinCall{hookHeader: c.header("join", req, j.GetQueue()), Mounts: make([]string, len(j.GetMounts()))}
	for i, m := range j.GetMounts() {
		call.Mounts[i] = m.GetName()
	}
	var ans joinAnswer
	err := c.call(ctx, rt, "join", call, &ans)
	if err == nil && ans.Allow == nil {
		err = calloutErr(`invalid answer: no "allow"`, nil)
		c.warn(rt, "join", err)
	}
	if err != nil {
		return nil, c.failed(rt, "join", err)
	}
	if !*ans.Allow {
		c.m.callouts.WithLabelValues("join", outcomeDenied).Inc()
		return nil, denied(ans.Reason)
	}
	c.m.callouts.WithLabelValues("join", outcomeAllowed).Inc()
	return ans.State, nil
}

// publish asks rt's backend whether req may publish p. It returns the
// rewritten payload (rewritten false: publish p's as is), or DENIED.
func (c *callouts) publish(ctx context.Context, rt *route, req *imqpb.NodeRequest, p *imqpb.Publish) (payload []byte, rewritten bool, err error) {
	call := publishCall{hookHeader: c.header("publish", req, p.GetQueue()), Mount: p.GetMount()}
	// JSON text is UTF-8 (RFC 8259): a payload that json.Valid accepts but
	// that holds other bytes ("caf\xe9" in Latin-1) goes as base64, or the
	// backend's decoder would refuse the whole call.
	// An empty payload is not JSON: it goes as "data_base64": "".
	if json.Valid(p.GetPayload()) && utf8.Valid(p.GetPayload()) {
		call.Data = p.GetPayload()
	} else {
		b64 := base64.StdEncoding.EncodeToString(p.GetPayload())
		call.DataBase64 = &b64
	}
	var ans publishAnswer
	err = c.call(ctx, rt, "publish", call, &ans)
	if err == nil {
		switch {
		case ans.Allow == nil:
			err = calloutErr(`invalid answer: no "allow"`, nil)
		case len(ans.Data) > 0 && ans.DataBase64 != nil:
			err = calloutErr(`invalid answer: both "data" and "data_base64"`, nil)
		case len(ans.Data) > 0:
			var b bytes.Buffer
			json.Compact(&b, ans.Data) // valid: it was decoded
			payload, rewritten = b.Bytes(), true
		case ans.DataBase64 != nil:
			if payload, err = base64.StdEncoding.DecodeString(*ans.DataBase64); err == nil {
				rewritten = true
			} else {
				err = calloutErr(`invalid answer: "data_base64" is not base64`, err)
			}
		}
		if err != nil {
			c.warn(rt, "publish", err)
		}
	}
	if err != nil {
		return nil, false, c.failed(rt, "publish", err)
	}
	switch {
	case !*ans.Allow:
		c.m.callouts.WithLabelValues("publish", outcomeDenied).Inc()
		return nil, false, denied(ans.Reason)
	case rewritten:
		c.m.callouts.WithLabelValues("publish", outcomeRewritten).Inc()
	default:
		c.m.callouts.WithLabelValues("publish", outcomeAllowed).Inc()
	}
	return payload, rewritten, nil
}

// setState asks rt's backend whether req may make the state change st. A
// refusal is FORBIDDEN with the backend's reason (not DENIED, as for joins
// and publishes: a refused state write is an authorization failure, as
// the owner rule's is); a failure follows the failure policy.
func (c *callouts) setState(ctx context.Context, rt *route, req *imqpb.NodeRequest, st *imqpb.SetState) error {
	call := setStateCall{hookHeader: c.header("set_state", req, st.GetQueue()), Mount: st.GetMount(), Key: st.GetKey(), Delete: st.GetDelete()}
	if !st.GetDelete() {
		// As for publish: only UTF-8 JSON travels as JSON. An empty value
		// is not JSON: it goes as "value_base64": "", so that the backend
		// tells it from a delete.
		if v := st.GetValue(); json.Valid(v) && utf8.Valid(v) {
			call.Value = v
		} else {
			b64 := base64.StdEncoding.EncodeToString(v)
			call.ValueBase64 = &b64
		}
	}
	var ans setStateAnswer
	err := c.call(ctx, rt, "set_state", call, &ans)
	if err == nil && ans.Allow == nil {
		err = calloutErr(`invalid answer: no "allow"`, nil)
		c.warn(rt, "set_state", err)
	}
	if err != nil {
		return c.failed(rt, "set_state", err)
	}
	if !*ans.Allow {
		c.m.callouts.WithLabelValues("set_state", outcomeDenied).Inc()
		reason := ans.Reason
		if reason == "" {
			reason = deniedMessage
		}
		return &imqerr.Error{Code: imqpb.Code_FORBIDDEN, Message: reason}
	}
	c.m.callouts.WithLabelValues("set_state", outcomeAllowed).Inc()
	return nil
}

func denied(reason string) error {
	if reason == "" {
		reason = deniedMessage
	}
	return &imqerr.Error{Code: imqpb.Code_DENIED, Message: reason}
}

// failed applies the failure policy to a join, publish or set_state call-out that
// failed with err: nil (go ahead) when failing open, else UNAVAILABLE.
func (c *callouts) failed(rt *route, hook string, err error) error {
	if c.failOpen {
		c.m.callouts.WithLabelValues(hook, outcomeFailedAllowed).Inc()
		return nil
	}
	c.m.callouts.WithLabelValues(hook, outcomeFailedDenied).Inc()
	// UNAVAILABLE, not DENIED: the backend refused nothing, so the request
	// is retryable (a client's rejoin retries rather than giving up).
	return imqerr.New(imqpb.Code_UNAVAILABLE, "the backend did not answer: %v", err)
}

// call POSTs body as JSON to rt's hook and decodes the answer into out
// (nil: the answer is read and ignored). Its error is a *calloutError; the
// failure is logged.
func (c *callouts) call(ctx context.Context, rt *route, hook string, body, out any) error {
	start := time.Now()
	defer func() { c.m.calloutSeconds.WithLabelValues(hook).Observe(time.Since(start).Seconds()) }()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	err := c.roundTrip(ctx, rt, hook, body, out)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, errCalloutsBusy) {
			err = calloutErr(fmt.Sprintf("no answer within %s", c.timeout), err)
		}
		c.warn(rt, hook, err)
	}
	return err
}

// roundTrip is call without the timeout.
func (c *callouts) roundTrip(ctx context.Context, rt *route, hook string, body, out any) error {
	if err := rt.host.acquire(ctx); err != nil {
		return calloutErr(err.Error(), err)
	}
	defer rt.host.release()
	b, err := json.Marshal(body)
	if err != nil {
		return calloutErr("internal error", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rt.base+"/"+hook, bytes.NewReader(b))
	if err != nil {
		return calloutErr("internal error", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return calloutErr("unreachable", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxCalloutBody+1))
	switch {
	case err != nil:
		return calloutErr("answer cut short", err)
	case len(data) > maxCalloutBody:
		return calloutErr("answer over 1 MiB", nil)
	case resp.StatusCode/100 != 2:
		return calloutErr(fmt.Sprintf("HTTP status %d", resp.StatusCode), nil)
	case out == nil:
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return calloutErr("invalid answer: not the expected JSON", err)
	}
	return nil
}

// warn logs a failed call-out, at most once per calloutWarnEvery per
// prefix (the metrics count them all).
func (c *callouts) warn(rt *route, hook string, err error) {
	attrs := []any{"prefix", rt.Prefix, "hook", hook, "err", err}
	if d := errors.Unwrap(err); d != nil {
		attrs = append(attrs, "detail", d)
	}
	now := time.Now().UnixNano()
	last := rt.lastWarn.Load()
	if now-last < int64(calloutWarnEvery) || !rt.lastWarn.CompareAndSwap(last, now) {
		c.log.Debug("call-out failed", attrs...)
		return
	}
	c.log.Warn("call-out failed", attrs...)
}

func (h *hostLimit) acquire(ctx context.Context) error {
	select {
	case h.slots <- struct{}{}:
		return nil
	default:
	}
	if h.waiting.Add(1) > h.maxWaiting {
		h.waiting.Add(-1)
		return errCalloutsBusy
	}
	defer h.waiting.Add(-1)
	select {
	case h.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *hostLimit) release() { <-h.slots }

// notifyLeave queues a leave notification for rt's backend; the caller has
// just applied the leave, under its queue's shard lock, which is when it
// gets its seq. It never blocks: when the queue is full the notification is
// dropped and counted.
func (c *callouts) notifyLeave(rt *route, user, session, queue string) {
	n := leaveNote{rt: rt, user: user, session: session, queue: queue}
	n.seq, n.timeMs = c.stamp()
	select {
	case c.leaves <- n:
	default:
		c.m.callouts.WithLabelValues("leave", outcomeDropped).Inc()
	}
}

// start starts the leave workers; stop ends them.
func (c *callouts) start() {
	for range leaveWorkers {
		c.workers.Add(1)
		go func() { // ends after stop, once the queue is drained
			defer c.workers.Done()
			c.leaveLoop()
		}()
	}
}

func (c *callouts) leaveLoop() {
	for {
		select {
		case n := <-c.leaves:
			c.sendLeave(n)
		case <-c.stopping:
			for {
				select {
				case n := <-c.leaves:
					c.sendLeave(n)
				default:
					return
				}
			}
		}
	}
}

func (c *callouts) sendLeave(n leaveNote) {
	if c.ctx.Err() != nil { // stop gave up waiting: drop the rest
		c.m.callouts.WithLabelValues("leave", outcomeDropped).Inc()
		return
	}
	call := hookHeader{Hook: "leave", Seq: n.seq, TimeMs: n.timeMs, Node: c.node, User: n.user, Session: n.session, Queue: n.queue}
	if err := c.call(c.ctx, n.rt, "leave", call, nil); err != nil {
		c.m.callouts.WithLabelValues("leave", outcomeFailedAllowed).Inc()
		return
	}
	c.m.callouts.WithLabelValues("leave", outcomeAllowed).Inc()
}

// stop lets the leave workers send what is queued and end, waiting for them
// until ctx ends; then it cancels the call-outs still running, and the
// notifications still queued are dropped. It is idempotent.
func (c *callouts) stop(ctx context.Context) error {
	c.stopOnce.Do(func() { close(c.stopping) })
	done := make(chan struct{})
	go func() { c.workers.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		c.cancel()
		<-done // every call-out now ends at once
	}
	c.cancel()
	c.client.CloseIdleConnections()
	return err
}
