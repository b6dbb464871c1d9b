package gateway

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
)

// Config configures a gateway. A zero field takes its default from
// DefaultConfig unless its comment says otherwise.
type Config struct {
	// Addr is the client listen address: /ws, the admin RPC (/rpc/v1/) and
	// /healthz, nothing else ("127.0.0.1:8080"; port 0 picks a free port,
	// see Server.Addr). In cluster mode it is advertised in the membership
	// for operators to see (member.Meta.ClientAddr).
	Addr string
	// InternalAddr is the internal listen address, for operators and the
	// cluster only: /metrics, /healthz, /varz, /v1/table and kicks passed
	// on by other gateways ("127.0.0.1:8081"; port 0 picks a free port, see
	// Server.InternalAddr). Keep it off the public network. In cluster mode
	// it is the HTTP address advertised in the membership, where the boss
	// reads /varz and other gateways pass on kicks; a host bound on every
	// interface (0.0.0.0) is advertised at the gossip address's host.
	InternalAddr string
	// GatewayID names this gateway process to queue nodes and, in cluster
	// mode, in the membership. Default: random.
	GatewayID string
	// QueueNode is the link address of the one queue node owning every
	// queue, in standalone mode. Required unless Member is set; empty when
	// it is.
	QueueNode string
	// Member, if set, runs the gateway in cluster mode: it joins the
	// cluster's membership (role gateway, its id GatewayID, advertising
	// InternalAddr as its HTTP address and Addr as its client address),
	// follows the bucket table that the boss publishes, keeps one link to
	// each queue node in the table and routes every queue operation to the
	// queue's owner; an operation answered MOVED is sent again, once the
	// table caught up, without the client noticing. Until the first table
	// arrives operations are answered UNAVAILABLE. Its Logger defaults to
	// Logger; its OnChange, if set, runs before the gateway's own handling.
	// nil: standalone mode, one static queue node (QueueNode) owning every
	// queue, as in imq dev and tests.
	Member *member.Config
	// BossURL, in cluster mode, is where the gateway fetches the table
	// ("http://boss.internal:7900", say behind a load balancer) instead of
	// the boss that membership names. Empty: the newest live boss member.
	BossURL string
	// JWTSecret verifies HS256 connect tokens. A JWT secret, public keys,
	// a JWKS URL, AuthURL or Dev is required. Token rules: see JWTAudience,
	// JWTIssuer, JWTMaxAge and JWTAllowNoExp.
	JWTSecret []byte
	// JWTPublicKeys holds PEM public keys or certificates that verify
	// connect tokens signed by a login service: RSA of at least 2048 bits
	// verifies RS256 only, ECDSA P-256 ES256 only, P-384 ES384 only,
	// Ed25519 EdDSA only. Nil: none; given without a key (empty, or no
	// such PEM block) it is an error.
	JWTPublicKeys []byte
	// JWKSURL is a login service's JSON Web Key Set (RFC 7517), whose keys
	// verify connect tokens as JWTPublicKeys do, chosen by the token's kid.
	// https:// only, or http:// to a loopback host. Empty: none.
	JWKSURL string
	// JWKSRefresh is how often the JWKS is fetched again. Default 10 min.
	JWKSRefresh time.Duration
	// JWKSMinRefetch spaces the fetches that tokens naming an unknown key
	// id cause (a rotated key), so a flood of forged key ids costs the
	// login service one fetch per interval. Default 30 s.
	JWKSMinRefetch time.Duration
	// JWKSTimeout bounds one JWKS fetch, the answer read included.
	// Default 5 s.
	JWKSTimeout time.Duration
	// JWTAudience is this service's name in the tokens' aud claim: a token
	// must name it. Empty: a token must carry no aud at all (one that names
	// any audience is meant for another service).
	JWTAudience string
	// JWTIssuer, if set, must equal the tokens' iss claim. Empty: any iss.
	JWTIssuer string
	// JWTMaxAge bounds a token's lifetime: exp - iat, or exp - now for a
	// token without iat. Default 24 h.
	JWTMaxAge time.Duration
	// JWTAllowNoExp accepts tokens without an exp claim, which never
	// expire (JWTMaxAge does not apply to them). Default false: exp is
	// required.
	JWTAllowNoExp bool
	// AuthURL, if set, authenticates connect tokens through the backend: a
	// token that does not verify as a JWT (any token, without JWTSecret) is
	// POSTed as {"token": "..."} to this http:// or https:// URL; a 200
	// answer {"user": "<id>"} accepts it; a refusal ({"allow": false}, or
	// another status) is UNAUTHORIZED, with the answer's "reason" if it
	// gave one; no usable answer (unreachable, timeout, 5xx, 429, 408,
	// malformed) is a retryable UNAVAILABLE whose goodbye says reconnect.
	// Empty: no call-out.
	AuthURL string
	// AuthCalloutTimeout bounds one auth call-out, including the wait for a
	// free slot (see AuthCalloutConcurrency). Default 2 s.
	AuthCalloutTimeout time.Duration
	// AuthCalloutConcurrency bounds the auth call-outs in flight; further
	// connects wait for a slot within AuthCalloutTimeout. Default 64.
	AuthCalloutConcurrency int
	// APIKeys are the keys the admin RPC (POST /rpc/v1/<method>) accepts as
	// "Authorization: Bearer <secret>", each optionally limited to some
	// methods and queue prefixes (ParseAPIKey, ParseAPIKeys). Empty: the
	// admin RPC answers every call 401.
	APIKeys []APIKey
	// RPCMaxBody is the largest admin RPC request body, in bytes; a larger
	// one is answered 413 PAYLOAD_TOO_LARGE. Default 1 MiB.
	RPCMaxBody int
	// RPCTimeout bounds one admin RPC call, reading its body included (a
	// batch as a whole); past it the call is answered 504 TIMEOUT (the
	// outcome is unknown). Default 5 s.
	RPCTimeout time.Duration
	// RPCMaxInflight bounds the admin RPC calls in progress; further calls
	// are answered 429 LIMIT_EXCEEDED at once. Default 1024.
	RPCMaxInflight int
	// Dev also accepts a plain user id in the URL (?user=alice). Never in
	// production: anyone can be anyone.
	Dev bool
	// AllowedOrigins lists the Origin header values accepted on /ws, such as
	// "https://game.example.com"; "*" accepts any. Requests without an Origin
	// header (native clients, bots) are always accepted. Empty: only origins
	// whose host equals the request's Host.
	AllowedOrigins []string
	// MaxConnections bounds authenticated client connections. Zero: as
	// many as the open-file limit allows, less a reserve for links and
	// files and the MaxPending connections.
	MaxConnections int
	// MaxPending bounds the connections not yet authenticated (from accept
	// to a successful connect or an admin RPC call's API key; an HTTP
	// request in progress and an idle HTTP keep-alive connection count
	// too), apart from MaxConnections, so that sockets that never
	// authenticate cannot take the authenticated clients' places. Past it a
	// new connection takes the place of the oldest pending one (an idle
	// keep-alive one first), which is closed. Default: a quarter of
	// MaxConnections, at least 16. When the open-file capacity (the limit
	// less a reserve) cannot hold both pools, New lowers MaxPending to a
	// fifth of the capacity and MaxConnections to the rest, and logs both.
	MaxPending int
	// MaxPendingPerIP bounds the pending connections from one source (an
	// IPv4 address or an IPv6 /64); past it they are answered 429
	// LIMIT_EXCEEDED. Behind a proxy every client has the proxy's address:
	// raise it to MaxPending, or turn it off with a negative value.
	// Default 64.
	MaxPendingPerIP int
	// AuthFailuresPerIP is how many failed authentications (connect
	// answered UNAUTHORIZED) a source may have per minute, in a burst of as
	// many; an admin RPC call with a missing or wrong API key counts too.
	// A check starts while the source has budget left and costs one only
	// if it fails, so slow checks of valid tokens are never refused; checks
	// started together may overshoot, by at most MaxPendingPerIP, the
	// balance going down to -AuthFailuresPerIP. Without budget, connect is
	// answered LIMIT_EXCEEDED and new connections and RPC calls 429
	// LIMIT_EXCEEDED until it refills: from the floor, a next try after
	// (AuthFailuresPerIP+1)/AuthFailuresPerIP minutes, the full budget after
	// two. Negative: no limit. Default 60.
	AuthFailuresPerIP int
	// SendQueueBytes bounds the bytes queued for one client; past it the
	// client is a slow consumer and is disconnected.
	SendQueueBytes int
	// SendQueueFrames bounds the frames queued for one client, likewise.
	SendQueueFrames int
	// MaxFrameBytes is the largest frame a client may send; a larger one
	// closes the connection (PROTOCOL_ERROR). Frames up to it whose payload
	// exceeds MaxPayload are answered PAYLOAD_TOO_LARGE.
	MaxFrameBytes int
	// MaxPayload is the largest publish payload or state value, in bytes;
	// it should equal the queue nodes' limit.
	MaxPayload int
	// MaxSubscriptions bounds the queues one connection may join.
	MaxSubscriptions int
	// MaxInflight bounds one connection's requests awaiting a queue node.
	MaxInflight int
	// PingInterval is how often the gateway pings each client.
	PingInterval time.Duration
	// ClientTimeout closes a client that sent nothing (not even a pong) for
	// this long.
	ClientTimeout time.Duration
	// AuthTimeout closes a connection that has not authenticated in time.
	AuthTimeout time.Duration
	// WriteTimeout closes a client whose socket accepts no data for this long.
	WriteTimeout time.Duration
	// RequestTimeout fails a request the queue node has not answered in time.
	RequestTimeout time.Duration
	// LinkPingInterval is how often the gateway pings each queue node.
	LinkPingInterval time.Duration
	// LinkTimeout declares a queue node link dead when nothing arrived on it
	// for this long (its clients are told NODE_LOST). It must exceed twice
	// LinkPingInterval, and the queue nodes' LinkTimeout must exceed
	// LinkPingInterval too.
	LinkTimeout time.Duration
	// ClusterKeys are the secrets that authenticate the gateway's links to
	// queue nodes, each at least 16 bytes: the gateway proves it holds the
	// first (an HMAC over a fresh challenge; the key never travels) and
	// requires each node to prove it holds that same key, so a process
	// without it can neither take the gateway's requests nor pose as a
	// gateway. Every queue node must hold the first key in its own list.
	// Rotation: add the new key to every node's list, then put it first on
	// the gateways, then drop the old one. Empty: insecure mode, links
	// without authentication, which queue nodes holding keys refuse (and
	// which never talk to nodes holding keys).
	ClusterKeys [][]byte
	// ShutdownSpread is the window over which Shutdown says goodbye
	// (reason SHUTDOWN: reconnect, to any gateway) to its clients, one after
	// another evenly, so that the clients of a gateway going away come back
	// to the others over that time rather than in one burst of reconnects,
	// token checks and rejoins. Shutdown gives it at most half of the time
	// its context leaves; the rest flushes the goodbyes and closes. Zero:
	// every goodbye at once, as a zero field here is taken literally.
	// DefaultConfig: 3 s.
	ShutdownSpread time.Duration
	// Logger receives structured logs. Default: discard.
	Logger *slog.Logger
	// Registry receives the gateway's metrics. Default: a private registry.
	Registry *prometheus.Registry

	// The client listener's HTTP limits, unexported (tests shorten them).
	// Every request, headers and body, must arrive within clientRead (the
	// admin RPC gives its body RPCTimeout) and its answer be taken within
	// clientWrite; a WebSocket, once hijacked, sets deadlines of its own.
	// clientIdle closes a keep-alive connection idle between requests; it
	// holds a pending place meanwhile (admission.go). Defaults 10 s, 10 s
	// and 30 s.
	clientRead, clientWrite, clientIdle time.Duration
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Addr:              "127.0.0.1:8080",
		InternalAddr:      "127.0.0.1:8081",
		MaxPendingPerIP:   64,
		AuthFailuresPerIP: 60,
		clientRead:        10 * time.Second,
		clientWrite:       10 * time.Second,
		clientIdle:        30 * time.Second,
		SendQueueBytes:    1 << 20,
		SendQueueFrames:   4096,
		MaxFrameBytes:     256 << 10,
		MaxPayload:        64 << 10,
		MaxSubscriptions:  256,
		MaxInflight:       128,
		PingInterval:      20 * time.Second,
		ClientTimeout:     50 * time.Second,
		AuthTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		RequestTimeout:    5 * time.Second,
		LinkPingInterval:  link.DefaultPingInterval,
		LinkTimeout:       link.DefaultTimeout,

		JWKSRefresh:            10 * time.Minute,
		JWKSMinRefetch:         30 * time.Second,
		JWKSTimeout:            5 * time.Second,
		JWTMaxAge:              24 * time.Hour,
		AuthCalloutTimeout:     2 * time.Second,
		AuthCalloutConcurrency: 64,
		RPCMaxBody:             1 << 20,
		RPCTimeout:             5 * time.Second,
		RPCMaxInflight:         1024,
		ShutdownSpread:         3 * time.Second,
	}
}

func (c *Config) setDefaults() {
	d := DefaultConfig()
	set := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	if c.Addr == "" {
		c.Addr = d.Addr
	}
	if c.InternalAddr == "" {
		c.InternalAddr = d.InternalAddr
	}
	set(&c.MaxPendingPerIP, d.MaxPendingPerIP)
	set(&c.AuthFailuresPerIP, d.AuthFailuresPerIP)
	set(&c.SendQueueBytes, d.SendQueueBytes)
	set(&c.SendQueueFrames, d.SendQueueFrames)
	set(&c.MaxFrameBytes, d.MaxFrameBytes)
	set(&c.MaxPayload, d.MaxPayload)
	set(&c.MaxSubscriptions, d.MaxSubscriptions)
	set(&c.MaxInflight, d.MaxInflight)
	setD(&c.PingInterval, d.PingInterval)
	setD(&c.ClientTimeout, d.ClientTimeout)
	setD(&c.AuthTimeout, d.AuthTimeout)
	setD(&c.WriteTimeout, d.WriteTimeout)
	setD(&c.RequestTimeout, d.RequestTimeout)
	setD(&c.LinkPingInterval, d.LinkPingInterval)
	setD(&c.LinkTimeout, d.LinkTimeout)
	setD(&c.JWKSRefresh, d.JWKSRefresh)
	setD(&c.JWKSMinRefetch, d.JWKSMinRefetch)
	setD(&c.JWKSTimeout, d.JWKSTimeout)
	setD(&c.JWTMaxAge, d.JWTMaxAge)
	setD(&c.AuthCalloutTimeout, d.AuthCalloutTimeout)
	set(&c.AuthCalloutConcurrency, d.AuthCalloutConcurrency)
	set(&c.RPCMaxBody, d.RPCMaxBody)
	setD(&c.RPCTimeout, d.RPCTimeout)
	setD(&c.clientRead, d.clientRead)
	setD(&c.clientWrite, d.clientWrite)
	setD(&c.clientIdle, d.clientIdle)
	set(&c.RPCMaxInflight, d.RPCMaxInflight)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
}

// Upper bounds of the limits validate accepts: far above any real use,
// low enough that nothing computed from them overflows.
const (
	maxPoolLimit  = 1 << 24        // connections: MaxConnections, MaxPending, per-IP limits
	maxCountLimit = 1 << 20        // per-connection and concurrency counts: MaxInflight, MaxSubscriptions...
	maxBytesLimit = 1 << 30        // sizes in bytes: MaxPayload, MaxFrameBytes, SendQueueBytes, RPCMaxBody
	maxAnnounced  = 24 * time.Hour // ping interval and client timeout, sent to clients in uint32 milliseconds
)

// minInterval is the shortest interval validate accepts for what runs
// periodically (pings, JWKS fetches).
const minInterval = 10 * time.Millisecond

func (c *Config) validate() error {
	var errs []error
	switch {
	case c.Member == nil && c.QueueNode == "":
		errs = append(errs, errors.New("a queue node address (standalone mode) or a cluster membership (cluster mode) is required"))
	case c.Member != nil && c.QueueNode != "":
		errs = append(errs, errors.New("a queue node address and a cluster membership exclude each other: in cluster mode the bucket table names the queue nodes"))
	case c.Member != nil:
		if err := c.Member.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if _, p, err := net.SplitHostPort(c.InternalAddr); err == nil && p != "0" && c.InternalAddr == c.Addr {
		errs = append(errs, fmt.Errorf("the internal address %s must differ from the client address", c.InternalAddr))
	}
	switch {
	case c.BossURL == "":
	case c.Member == nil:
		errs = append(errs, errors.New("a boss URL needs cluster mode (membership)"))
	case !strings.HasPrefix(c.BossURL, "http://") && !strings.HasPrefix(c.BossURL, "https://"):
		errs = append(errs, fmt.Errorf("boss URL %q must start with http:// or https://", c.BossURL))
	}
	if len(c.JWTSecret) == 0 && len(c.JWTPublicKeys) == 0 && c.JWKSURL == "" && c.AuthURL == "" && !c.Dev {
		errs = append(errs, errors.New("a JWT secret or an auth URL is required (or JWT public keys, a JWKS URL, or development mode)"))
	}
	if _, err := parseJWTPublicKeys(c.JWTPublicKeys); err != nil {
		errs = append(errs, err)
	}
	if c.JWKSURL != "" {
		if err := validJWKSURL(c.JWKSURL); err != nil {
			errs = append(errs, err)
		}
	}
	if c.AuthURL != "" {
		if u, err := url.Parse(c.AuthURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("auth URL %q must be an http:// or https:// URL", c.AuthURL))
		}
	}
	seen := make(map[string]int, len(c.APIKeys))
	for i, k := range c.APIKeys {
		if err := k.validate(); err != nil {
			errs = append(errs, fmt.Errorf("API key %d: %w", i+1, err))
		}
		if j, dup := seen[k.Secret]; dup {
			errs = append(errs, fmt.Errorf("API keys %d and %d have the same secret", j, i+1))
		}
		seen[k.Secret] = i + 1
	}
	if len(c.JWTSecret) > 0 && len(c.JWTSecret) < 16 {
		errs = append(errs, fmt.Errorf("the JWT secret is %d bytes; use at least 16", len(c.JWTSecret)))
	}
	for _, o := range c.AllowedOrigins {
		if o == "*" {
			continue
		}
		if u, err := url.Parse(o); err != nil || u.Scheme == "" || u.Host == "" || strings.TrimRight(u.Path, "/") != "" {
			errs = append(errs, fmt.Errorf("allowed origin %q is not scheme://host[:port]", o))
		}
	}
	for name, v := range map[string]int{
		"max connections": c.MaxConnections, "max pending": c.MaxPending, "send queue bytes": c.SendQueueBytes,
		"send queue frames": c.SendQueueFrames, "max frame bytes": c.MaxFrameBytes,
		"max payload": c.MaxPayload, "max subscriptions": c.MaxSubscriptions, "max inflight": c.MaxInflight,
		"auth call-out concurrency": c.AuthCalloutConcurrency, "RPC max body": c.RPCMaxBody, "RPC max inflight": c.RPCMaxInflight,
	} {
		if v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative, got %d", name, v))
		}
	}
	// Upper bounds keep the sums and conversions the gateway makes from
	// these (pool sizes, int32 counters, frame and queue sizes) from
	// overflowing, which would refuse every client.
	for name, v := range map[string]int{
		"max connections": c.MaxConnections, "max pending": c.MaxPending, "max pending per IP": c.MaxPendingPerIP,
		"auth failures per IP": c.AuthFailuresPerIP,
	} {
		if v > maxPoolLimit {
			errs = append(errs, fmt.Errorf("%s must be at most %d, got %d", name, maxPoolLimit, v))
		}
	}
	for name, v := range map[string]int{
		"max subscriptions": c.MaxSubscriptions, "max inflight": c.MaxInflight, "send queue frames": c.SendQueueFrames,
		"auth call-out concurrency": c.AuthCalloutConcurrency, "RPC max inflight": c.RPCMaxInflight,
	} {
		if v > maxCountLimit {
			errs = append(errs, fmt.Errorf("%s must be at most %d, got %d", name, maxCountLimit, v))
		}
	}
	for name, v := range map[string]int{
		"send queue bytes": c.SendQueueBytes, "max frame bytes": c.MaxFrameBytes, "max payload": c.MaxPayload, "RPC max body": c.RPCMaxBody,
	} {
		if v > maxBytesLimit {
			errs = append(errs, fmt.Errorf("%s must be at most %d bytes (1 GiB), got %d", name, maxBytesLimit, v))
		}
	}
	if c.MaxFrameBytes < c.MaxPayload+1024 {
		errs = append(errs, fmt.Errorf("max frame bytes (%d) must exceed max payload (%d) by at least 1024", c.MaxFrameBytes, c.MaxPayload))
	}
	if c.SendQueueBytes < c.MaxFrameBytes {
		errs = append(errs, fmt.Errorf("send queue bytes (%d) must hold at least one frame of %d bytes", c.SendQueueBytes, c.MaxFrameBytes))
	}
	for name, d := range map[string]time.Duration{
		"ping interval": c.PingInterval, "client timeout": c.ClientTimeout, "auth timeout": c.AuthTimeout,
		"write timeout": c.WriteTimeout, "request timeout": c.RequestTimeout,
		"link ping interval": c.LinkPingInterval, "link timeout": c.LinkTimeout,
		"auth call-out timeout": c.AuthCalloutTimeout, "RPC timeout": c.RPCTimeout,
		"JWKS refresh": c.JWKSRefresh, "JWKS minimum refetch interval": c.JWKSMinRefetch, "JWKS timeout": c.JWKSTimeout,
		"JWT max age": c.JWTMaxAge,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	for name, d := range map[string]time.Duration{
		"ping interval": c.PingInterval, "link ping interval": c.LinkPingInterval,
		"JWKS refresh": c.JWKSRefresh, "JWKS minimum refetch interval": c.JWKSMinRefetch,
	} {
		if d > 0 && d < minInterval { // they drive tickers and refetch loops: a nanosecond would spin or panic
			errs = append(errs, fmt.Errorf("%s must be at least %s, got %s", name, minInterval, d))
		}
	}
	if err := link.ValidateKeys(c.ClusterKeys); err != nil {
		errs = append(errs, err)
	}
	if c.LinkTimeout <= 2*c.LinkPingInterval {
		errs = append(errs, fmt.Errorf("link timeout (%s) must exceed twice the link ping interval (%s)", c.LinkTimeout, c.LinkPingInterval))
	}
	for name, d := range map[string]time.Duration{"ping interval": c.PingInterval, "client timeout": c.ClientTimeout} {
		if d > maxAnnounced {
			errs = append(errs, fmt.Errorf("%s must be at most %s, got %s", name, maxAnnounced, d))
		}
	}
	if c.ShutdownSpread < 0 {
		errs = append(errs, fmt.Errorf("shutdown spread must not be negative, got %s", c.ShutdownSpread))
	}
	if c.ClientTimeout <= c.PingInterval {
		errs = append(errs, fmt.Errorf("client timeout (%s) must exceed the ping interval (%s)", c.ClientTimeout, c.PingInterval))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("gateway config: %w", err)
	}
	return nil
}
