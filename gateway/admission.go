package gateway

import (
	"container/list"
	"context"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// Admission: who may hold a connection. A connection is pending from accept
// until it authenticates: its WebSocket connect succeeds (or it upgrades
// with ?user= in development mode), or an admin RPC call on it presents a
// known API key. Serving an HTTP request does not take it out of the
// pending pool: a request that never finishes (a body dripped a byte at a
// time) holds a pending place, not a place of its own. A connection is
// pending again whenever it idles between HTTP requests (keep-alive).
// Pending connections are capped in total (Config.MaxPending) and per
// source address (Config.MaxPendingPerIP), apart from the authenticated
// ones (Config.MaxConnections). When the pending pool is full a newcomer
// takes the place of the oldest pending connection, an idle keep-alive one
// first: a flood of sockets that never authenticate can delay a real client
// but not lock it out. Failed authentications (connect tokens, admin RPC
// keys) are rate-limited per source address (Config.AuthFailuresPerIP). A
// source address is an IPv4 address or an IPv6 /64 (one subscriber's usual
// allocation).

// Refusal reasons, the label values of imq_gateway_connections_refused_total.
const (
	refusedFull         = "full"            // the authenticated pool is full
	refusedListenerFull = "listener_full"   // the listener's connection cap (the descriptors) is reached
	refusedPending      = "pending"         // too many pending connections in total, none of them evictable
	refusedPendingIP    = "pending_ip"      // too many pending connections from one address
	refusedEvicted      = "pending_evicted" // a pending connection closed to make room for a newer one
	refusedAuthFailures = "auth_failures"   // the address's failed-auth budget is spent
)

// refusalAnswer is how a refusal is answered: the HTTP status and message
// of a refused handshake or RPC call (code LIMIT_EXCEEDED), and raw, the
// same answer pre-rendered for a connection refused at accept, before it
// sent anything.
type refusalAnswer struct {
	status int
	msg    string
	raw    []byte
}

// refusals answers each refusal reason; the keys are the metric's label
// values. refusedEvicted has no answer: the connection is closed.
var refusals = map[string]refusalAnswer{
	refusedFull:         newRefusal(http.StatusServiceUnavailable, "gateway is full"),
	refusedListenerFull: newRefusal(http.StatusServiceUnavailable, "gateway is full"),
	refusedPending:      newRefusal(http.StatusServiceUnavailable, "too many connections are authenticating; try again"),
	refusedPendingIP:    newRefusal(http.StatusTooManyRequests, "too many unauthenticated connections from your address; authenticate or close them"),
	refusedEvicted:      {},
	refusedAuthFailures: newRefusal(http.StatusTooManyRequests, "too many failed authentications from your address"),
}

func newRefusal(status int, msg string) refusalAnswer {
	body := `{"error":{"code":"LIMIT_EXCEEDED","message":` + strconv.Quote(msg) + `,"retryable":true}}` + "\n"
	raw := []byte("HTTP/1.1 " + strconv.Itoa(status) + " " + http.StatusText(status) +
		"\r\nContent-Type: application/json\r\nX-IMQ-Error: LIMIT_EXCEEDED\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	return refusalAnswer{status: status, msg: msg, raw: raw}
}

// sourceKey is the address a connection's limits are counted by.
func sourceKey(addr net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// pendingPool holds the pending connections, counted in total and by
// source, and ordered by when they became pending: those idle between HTTP
// requests apart, as they are the first to go.
type pendingPool struct {
	maxTotal int
	maxPerIP int // < 0: no per-source cap

	mu    sync.Mutex
	total int                  // Guarded by mu.
	bySrc map[netip.Prefix]int // Guarded by mu: sources with pending connections only, so bounded by maxTotal.
	fresh list.List            // Guarded by mu: *countedConn not yet authenticated, oldest first.
	idle  list.List            // Guarded by mu: *countedConn idle between HTTP requests, oldest first.
}

func newPendingPool(maxTotal, maxPerIP int) *pendingPool {
	return &pendingPool{maxTotal: maxTotal, maxPerIP: maxPerIP, bySrc: map[netip.Prefix]int{}}
}

// acquire makes c pending, unless it is already or closed. idle says c is
// an HTTP keep-alive connection between requests. Past the per-source cap
// it returns why not. Past the total it evicts the oldest pending
// connection (an idle one first; a newly idle connection evicts only an
// idle one) and returns it for the caller to close, or refuses when there
// is none to evict.
func (p *pendingPool) acquire(c *countedConn, idle bool) (reason string, victim *countedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.closed {
		return "", nil
	}
	if c.elem != nil { // pending already; now idle, it goes among the first to be evicted
		if idle && !c.idle {
			p.fresh.Remove(c.elem)
			c.elem, c.idle = p.idle.PushBack(c), true
		}
		return "", nil
	}
	if !c.keyed && p.maxPerIP >= 0 && p.bySrc[c.src] >= p.maxPerIP {
		return refusedPendingIP, nil
	}
	if p.total >= p.maxTotal {
		front := p.idle.Front()
		if front == nil && !idle {
			front = p.fresh.Front()
		}
		if front == nil {
			return refusedPending, nil
		}
		victim = front.Value.(*countedConn)
		p.removeLocked(victim)
	}
	p.total++
	if !c.keyed {
		p.bySrc[c.src]++
	}
	if idle {
		c.elem = p.idle.PushBack(c)
	} else {
		c.elem = p.fresh.PushBack(c)
	}
	c.idle = idle
	return "", victim
}

// activate moves c, if it is pending and idle, back among the fresh: it
// has started another request (an upgrade, an RPC call), pending until it
// authenticates, and is no longer the first to go.
func (p *pendingPool) activate(c *countedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.elem != nil && c.idle {
		p.idle.Remove(c.elem)
		c.elem, c.idle = p.fresh.PushBack(c), false
	}
}

// release takes c out of the pool if it is in it; closed marks it closed,
// never to be pending again.
func (p *pendingPool) release(c *countedConn, closed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if closed {
		c.closed = true
	}
	if c.elem != nil {
		p.removeLocked(c)
	}
}

// keyed takes c out of the pool, as release does, and marks it as an API
// key holder's: when it idles between calls it is pending again in the
// total (among the first evicted) but no longer counted against its
// source, so a host's idle keep-alive RPC connections do not lock the
// host out.
func (p *pendingPool) keyed(c *countedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.elem != nil {
		p.removeLocked(c)
	}
	c.keyed = true
}

func (p *pendingPool) removeLocked(c *countedConn) {
	if c.idle {
		p.idle.Remove(c.elem)
	} else {
		p.fresh.Remove(c.elem)
	}
	c.elem = nil
	p.total--
	if c.keyed {
		return
	}
	if n := p.bySrc[c.src] - 1; n > 0 {
		p.bySrc[c.src] = n
	} else {
		delete(p.bySrc, c.src)
	}
}

func (p *pendingPool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total
}

// maxAuthSources bounds the sources one generation of the failed-auth
// limiter remembers (two generations are kept): an attacker with more
// addresses than this gets fresh budgets, but cannot grow the gateway's
// memory.
const maxAuthSources = 1 << 16

// authForget is how long a generation of the failed-auth limiter lasts: a
// source not seen for that long has refilled its budget (from the floor of
// -perMinute), so forgetting it loses nothing.
const authForget = 2 * time.Minute

// authLimiter is a token bucket per source: perMinute authentication
// attempts that fail a minute, in a burst of as many. An attempt may start
// while the source has a token (allowed) and costs one only if it fails
// (charge), so valid users behind one address are never refused for
// checks that are merely slow. Checks that start together on a balance of
// one token can each fail: the balance then goes below zero, down to
// -perMinute, so a burst of failures pushes the next try out. The checks
// in flight per source are bounded by its pending connections
// (Config.MaxPendingPerIP), and so is that overshoot. From the floor, the
// next token is back after a little over a minute ((1+perMinute)/perMinute
// minutes), a full budget after two.
// The buckets are kept in two generations, swapped every authForget or when
// the newer one is full, so forgetting costs O(1).
type authLimiter struct {
	perMinute int // < 0: no limit

	mu      sync.Mutex
	cur     map[netip.Prefix]*authBucket // Guarded by mu.
	prev    map[netip.Prefix]*authBucket // Guarded by mu: the older generation; a source seen again moves to cur.
	rotated time.Time                    // Guarded by mu: when prev was cur's successor.
}

type authBucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

func newAuthLimiter(perMinute int) *authLimiter {
	return &authLimiter{perMinute: perMinute, cur: map[netip.Prefix]*authBucket{}, prev: map[netip.Prefix]*authBucket{}}
}

// refill brings b up to now and returns its tokens.
func (a *authLimiter) refill(b *authBucket, now time.Time) float64 {
	b.tokens = min(float64(a.perMinute), b.tokens+max(0, now.Sub(b.at).Minutes())*float64(a.perMinute))
	b.at = now
	return b.tokens
}

func (a *authLimiter) rotateLocked(now time.Time) {
	a.prev, a.cur = a.cur, make(map[netip.Prefix]*authBucket)
	a.rotated = now
}

// bucketLocked returns src's bucket, creating a full one if create.
func (a *authLimiter) bucketLocked(src netip.Prefix, now time.Time, create bool) *authBucket {
	if a.rotated.IsZero() {
		a.rotated = now
	}
	if now.Sub(a.rotated) >= authForget {
		a.rotateLocked(now)
	}
	if b := a.cur[src]; b != nil {
		return b
	}
	b := a.prev[src]
	if b != nil {
		delete(a.prev, src)
	} else if !create {
		return nil
	} else {
		b = &authBucket{tokens: float64(a.perMinute), at: now}
	}
	if len(a.cur) >= maxAuthSources {
		a.rotateLocked(now)
	}
	a.cur[src] = b
	return b
}

// wait is how long until a bucket holding t tokens has one.
func (a *authLimiter) wait(t float64) time.Duration {
	return time.Duration((1 - t) / float64(a.perMinute) * float64(time.Minute))
}

// allowed reports whether src may try to authenticate: it has a token to
// spend. It returns how long until it has one otherwise. It spends nothing:
// it refuses early, at the handshake.
func (a *authLimiter) allowed(src netip.Prefix, now time.Time) (bool, time.Duration) {
	if a.perMinute < 0 {
		return true, 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.bucketLocked(src, now, false)
	if b == nil {
		return true, 0
	}
	if t := a.refill(b, now); t < 1 {
		return false, a.wait(t)
	}
	return true, 0
}

// charge spends one of src's tokens on a failed authentication, down to
// -perMinute.
func (a *authLimiter) charge(src netip.Prefix, now time.Time) {
	if a.perMinute < 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.bucketLocked(src, now, true)
	b.tokens = max(-float64(a.perMinute), a.refill(b, now)-1)
}

// sources returns how many sources the limiter remembers.
func (a *authLimiter) sources() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.cur) + len(a.prev)
}

// refusalMessage is reason's message, with when to try again if wait is
// known (> 0).
func refusalMessage(reason string, wait time.Duration) string {
	msg := refusals[reason].msg
	if wait > 0 {
		msg += "; try again in " + max(wait.Round(time.Second), time.Second).String()
	}
	return msg
}

// refuse answers a handshake or an RPC call refused for reason; wait (if
// > 0) says when to try again.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, reason string, wait time.Duration) {
	s.noteRefused(reason, connOf(r).source())
	writeHTTPError(w, refusals[reason].status, imqpb.Code_LIMIT_EXCEEDED, refusalMessage(reason, wait))
}

// noteRefused counts a refusal and logs it, at most once per reason per
// refusalLogEvery.
func (s *Server) noteRefused(reason string, src netip.Prefix) {
	s.m.refused.WithLabelValues(reason).Inc()
	s.warnLimited(reason, "connection refused", "reason", reason, "source", src.String())
}

// refusalLogEvery is the least time between two warnings of one reason
// (a refusal's, a failed authentication's): an attack does not flood the
// log. The next one says how many were left out.
const refusalLogEvery = 10 * time.Second

// logLimiter keeps the time of each reason's last warning.
type logLimiter struct {
	mu      sync.Mutex
	last    map[string]time.Time // Guarded by mu: by reason, a fixed set.
	skipped map[string]int       // Guarded by mu.
}

// maxLoggedAttr bounds each string attribute of a rate-limited warning: an
// error message can carry a client's text (a token's aud, up to a frame).
const maxLoggedAttr = 200

// warnLimited logs msg with attrs at Warn unless a warning of reason was
// logged within refusalLogEvery. attrs never hold a token or a key; their
// string values are cut to maxLoggedAttr bytes.
func (s *Server) warnLimited(reason, msg string, attrs ...any) {
	l := &s.logLimit
	now := time.Now()
	l.mu.Lock()
	if l.last == nil {
		l.last, l.skipped = map[string]time.Time{}, map[string]int{}
	}
	if now.Sub(l.last[reason]) < refusalLogEvery {
		l.skipped[reason]++
		l.mu.Unlock()
		return
	}
	l.last[reason] = now
	skipped := l.skipped[reason]
	l.skipped[reason] = 0
	l.mu.Unlock()
	for i, a := range attrs {
		if v, ok := a.(string); ok && i%2 == 1 && len(v) > maxLoggedAttr {
			attrs[i] = strings.ToValidUTF8(v[:maxLoggedAttr], "") + "..."
		}
	}
	s.log.Warn(msg, append(attrs, "left_out", skipped)...)
}

// connKey keys the request context's *countedConn (http.Server.ConnContext).
type connKey struct{}

func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// connOf returns the connection r came on (nil if not the listener's).
func connOf(r *http.Request) *countedConn {
	c, _ := r.Context().Value(connKey{}).(*countedConn)
	return c
}

// connState follows the HTTP server's connections: one idle between
// requests is pending (again), the first to be evicted, and is closed when
// it may not be; one that starts another request is pending still (until
// serveWS's connect or runRPC's key authenticates it), but no longer idle.
// A connection an API key was accepted on counts in the total only, not
// against its source (pendingPool.keyed).
func (l *limitListener) connState(nc net.Conn, st http.ConnState) {
	c, ok := nc.(*countedConn)
	if !ok {
		return
	}
	switch st {
	case http.StateActive:
		l.pending.activate(c)
	case http.StateIdle:
		if reason := c.pend(true); reason != "" {
			l.s.noteRefused(reason, c.src)
			c.Close()
		}
	}
}
