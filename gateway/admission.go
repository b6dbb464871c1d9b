package gateway

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// Admission: who may hold a connection. A connection is pending from accept
// until it authenticates (connect succeeds, or ?user= in development mode),
// and again whenever it holds a slot doing nothing: an HTTP keep-alive
// connection between requests. Pending connections are capped in total
// (Config.MaxPending) and per source address (Config.MaxPendingPerIP),
// apart from the authenticated ones (Config.MaxConnections), so sockets
// that never authenticate cannot keep real clients out until the auth
// timeout. Failed authentications are rate-limited per source address
// (Config.AuthFailuresPerIP). A source address is an IPv4 address or an
// IPv6 /64 (one subscriber's usual allocation).

// Refusal reasons, the label values of imq_gateway_connections_refused_total.
const (
	refusedFull         = "full"          // the authenticated pool is full
	refusedPending      = "pending"       // too many pending connections in total
	refusedPendingIP    = "pending_ip"    // too many pending connections from one address
	refusedAuthFailures = "auth_failures" // the address's failed-auth budget is spent
)

var refusedReasons = []string{refusedFull, refusedPending, refusedPendingIP, refusedAuthFailures}

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

// pendingPool counts pending connections, in total and by source.
type pendingPool struct {
	maxTotal int
	maxPerIP int // < 0: no per-source cap

	mu    sync.Mutex
	total int                  // Guarded by mu.
	bySrc map[netip.Prefix]int // Guarded by mu: sources with pending connections only, so bounded by maxTotal.
}

func newPendingPool(maxTotal, maxPerIP int) *pendingPool {
	return &pendingPool{maxTotal: maxTotal, maxPerIP: maxPerIP, bySrc: map[netip.Prefix]int{}}
}

// acquire takes a slot for a connection from src, or returns why not.
func (p *pendingPool) acquire(src netip.Prefix) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.maxPerIP >= 0 && p.bySrc[src] >= p.maxPerIP {
		return refusedPendingIP
	}
	if p.total >= p.maxTotal {
		return refusedPending
	}
	p.total++
	p.bySrc[src]++
	return ""
}

func (p *pendingPool) release(src netip.Prefix) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total--
	if n := p.bySrc[src] - 1; n > 0 {
		p.bySrc[src] = n
	} else {
		delete(p.bySrc, src)
	}
}

func (p *pendingPool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total
}

// maxAuthSources bounds the sources the failed-auth limiter remembers; past
// it, a source refilled to its burst is forgotten, else an arbitrary one
// (an attacker with more addresses than this gets fresh budgets, but
// cannot grow the gateway's memory).
const maxAuthSources = 1 << 16

// authLimiter is a token bucket per source: perMinute failed
// authentications a minute, a burst of as many.
type authLimiter struct {
	perMinute int // < 0: no limit

	mu      sync.Mutex
	buckets map[netip.Prefix]*authBucket // Guarded by mu.
}

type authBucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

func newAuthLimiter(perMinute int) *authLimiter {
	return &authLimiter{perMinute: perMinute, buckets: map[netip.Prefix]*authBucket{}}
}

// refill brings b up to now and returns its tokens.
func (a *authLimiter) refill(b *authBucket, now time.Time) float64 {
	b.tokens = min(float64(a.perMinute), b.tokens+now.Sub(b.at).Minutes()*float64(a.perMinute))
	b.at = now
	return b.tokens
}

// allowed reports whether src may try to authenticate: it has a failure to
// spend. It returns how long until it has one otherwise.
func (a *authLimiter) allowed(src netip.Prefix, now time.Time) (bool, time.Duration) {
	if a.perMinute < 0 {
		return true, 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.buckets[src]
	if b == nil {
		return true, 0
	}
	t := a.refill(b, now)
	if t >= 1 {
		return true, 0
	}
	return false, time.Duration((1 - t) / float64(a.perMinute) * float64(time.Minute))
}

// failed spends one of src's failures.
func (a *authLimiter) failed(src netip.Prefix, now time.Time) {
	if a.perMinute < 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.buckets[src]
	if b == nil {
		if len(a.buckets) >= maxAuthSources {
			a.evictLocked(now)
		}
		b = &authBucket{tokens: float64(a.perMinute), at: now}
		a.buckets[src] = b
	}
	a.refill(b, now)
	b.tokens = max(0, b.tokens-1)
}

// evictLocked forgets the sources whose bucket is full again, or one
// arbitrary source when none is.
func (a *authLimiter) evictLocked(now time.Time) {
	for k, b := range a.buckets {
		if a.refill(b, now) >= float64(a.perMinute) {
			delete(a.buckets, k)
		}
	}
	for k := range a.buckets {
		if len(a.buckets) < maxAuthSources {
			break
		}
		delete(a.buckets, k)
	}
}

// refusal answers a connection refused before it sent anything: written
// straight to the socket, as the HTTP answer its request will get.
func refusal(status int, msg string) []byte {
	body := `{"error":{"code":"LIMIT_EXCEEDED","message":` + strconv.Quote(msg) + `,"retryable":true}}` + "\n"
	return []byte("HTTP/1.1 " + strconv.Itoa(status) + " " + http.StatusText(status) +
		"\r\nContent-Type: application/json\r\nX-IMQ-Error: LIMIT_EXCEEDED\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body)
}

var (
	fullResponse      = refusal(http.StatusServiceUnavailable, "gateway is full")
	pendingResponse   = refusal(http.StatusServiceUnavailable, "too many connections are authenticating; try again")
	pendingIPResponse = refusal(http.StatusTooManyRequests, "too many unauthenticated connections from your address; authenticate or close them")
)

// refusalStatus is the HTTP status and message of a refusal at upgrade.
func refusalStatus(reason string) (int, string) {
	switch reason {
	case refusedPending:
		return http.StatusServiceUnavailable, "too many connections are authenticating; try again"
	case refusedPendingIP:
		return http.StatusTooManyRequests, "too many unauthenticated connections from your address; authenticate or close them"
	case refusedAuthFailures:
		return http.StatusTooManyRequests, "too many failed authentications from your address; try again later"
	}
	return http.StatusServiceUnavailable, "gateway is full"
}

// refuse answers an upgrade refused for reason.
func (s *Server) refuse(w http.ResponseWriter, reason string) {
	s.m.refused.WithLabelValues(reason).Inc()
	status, msg := refusalStatus(reason)
	s.httpError(w, status, imqpb.Code_LIMIT_EXCEEDED, msg)
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

// connState follows the HTTP server's connections: one serving a request is
// not pending (its request is bounded by timeouts), one idle between
// requests is, and is closed when that exceeds a cap. A hijacked one (a
// WebSocket) is the gateway's to track.
func (l *limitListener) connState(nc net.Conn, st http.ConnState) {
	c, ok := nc.(*countedConn)
	if !ok {
		return
	}
	switch st {
	case http.StateActive:
		c.unpend()
	case http.StateIdle:
		if reason := c.pend(); reason != "" {
			l.s.m.refused.WithLabelValues(reason).Inc()
			c.Close()
		}
	}
}
