package queuenode

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
)

// Config configures a queue node. The zero value of a field means its default
// from DefaultConfig unless the field says otherwise.
type Config struct {
	// NodeID names this node in logs, to gateways and, in cluster mode, in
	// the bucket table and membership: it must be unique in the cluster and
	// stay the same across restarts of the node. Default: "node-" plus the
	// link address.
	NodeID string
	// LinkAddr is the TCP address gateways connect to ("127.0.0.1:7100";
	// port 0 picks a free port, see Server.LinkAddr). In cluster mode the
	// bound address is advertised in the membership (and so in the bucket
	// table) as is: bind a host gateways can reach, not 0.0.0.0.
	LinkAddr string
	// Limits bound each queue.
	Limits Limits
	// MaxQueues bounds the queues held by this node.
	MaxQueues int
	// MaxNodeBytes bounds the bytes of all the node's queues together, as
	// Queue.Bytes counts them (history, state, and an overhead per queue
	// and mount). A write that needs room past it first evicts the oldest
	// history across the node (down to 7/8 of the budget, or, when state
	// holds more than that, what the write needs plus 1/64 of the budget);
	// when history cannot make room (state is never evicted) the write, or
	// the queue it would create, is refused with LIMIT_EXCEEDED at once.
	// Queues emptied by eviction stay until the idle sweep (IdleTTL). The
	// Go heap is larger than the bytes counted (protobuf structs, maps,
	// garbage not yet collected: about twice as much under a flood), so
	// leave room. Zero means the default, 1 GiB, which a machine with 4 GB
	// of RAM holds; give a dedicated node about a third of its RAM. At
	// least 1 MiB and 4 × Limits.MaxPayload.
	MaxNodeBytes int64
	// MaxQueueCreates bounds the queues one user's requests may create per
	// minute (a token bucket of that size, refilled at that rate); more are
	// refused with LIMIT_EXCEEDED. It bounds creations, not bytes: what
	// the queues hold is bounded by Limits per queue and by MaxNodeBytes.
	// The limiter tracks at most 65,536 users at a time; past that, users
	// it does not track are refused until it forgets some (at most a minute
	// after they stop creating). Backend (admin RPC) requests are exempt.
	// Zero means the default, 600: ten a second, far more than a player
	// joins rooms, while a script creating fresh queues is stopped within
	// a minute. Negative: no limit.
	MaxQueueCreates int
	// IdleTTL is how long a queue with no subscribers and no traffic is kept.
	IdleTTL time.Duration
	// LinkBuffer bounds the bytes queued for one gateway; a gateway that falls
	// this far behind has its link closed (its clients are told and rejoin).
	LinkBuffer int
	// LinkTimeout closes a gateway link on which nothing arrived for this
	// long (gateways ping every few seconds); the gateway's subscribers are
	// removed.
	LinkTimeout time.Duration
	// LinkHandshakeTimeout closes a link whose peer has not completed the
	// handshake (hello, and its proof of the cluster key) within this
	// long after it connected. Until then no frame over 4 KiB is read.
	// Zero means the default, 5s.
	LinkHandshakeTimeout time.Duration
	// MaxLinkHandshakes bounds the incoming link handshakes in flight
	// (connections accepted whose peer has not yet proved the cluster
	// key). When all are taken, the oldest one's connection is closed to
	// admit the new one: a flood of idle sockets costs a bounded amount
	// of memory and file descriptors, and a gateway holding the key,
	// which finishes within a round trip or two, still links. Links this
	// node dials (hand-offs) and the membership are not counted. Zero
	// means the default, 256.
	MaxLinkHandshakes int
	// MaxLinkHandshakesPerAddr bounds those from one IP address; a
	// connection over it is closed at once. Gateways behind one NAT
	// address share it. Zero means the default, 16.
	MaxLinkHandshakesPerAddr int
	// ClusterKeys are the secrets that authenticate links, each at least
	// 16 bytes: a gateway (or node) dialling this node must prove it holds
	// one of them (an HMAC over a fresh challenge; the key never travels),
	// and the node proves back, under the key that verified, before either
	// reads a request. Several keys rotate one: the node accepts any, so
	// add the new key here first, then make it the first key of every
	// dialer, then drop the old one. Empty: insecure mode, links without
	// authentication: anyone who reaches LinkAddr can join any queue and
	// publish as any user. A node with keys refuses dialers without, and
	// one without keys refuses dialers with them.
	ClusterKeys [][]byte
	// Member, if set, runs the node in cluster mode: it joins the cluster's
	// membership as a queue node, learns the bucket table from the boss and
	// serves only the queues whose bucket it owns (others are answered
	// MOVED). Its Logger defaults to Logger; its OnChange, if set, runs
	// before the node's own handling. nil: standalone, the node owns every
	// queue and has no table (imq queuenode without --join, imq dev, tests).
	Member *member.Config
	// InternalAddr is the internal HTTP listen address, for operators and
	// the cluster only: /metrics, /healthz, /varz and /v1/table (see
	// HandleHTTP; "127.0.0.1:7101" in `imq queuenode`; port 0 picks a free
	// port, see Server.InternalAddr). In cluster mode it is the HTTP
	// address advertised in the membership, where the boss reads /varz and
	// /v1/table; a host bound on every interface (0.0.0.0) is advertised at
	// the gossip address's host. Empty: no internal listener (the caller
	// may serve HandleHTTP's mux itself; the boss then shows no /varz).
	InternalAddr string
	// Callouts ask backends about client operations on the queues under
	// their prefixes (see Callout and ParseCallout); for a queue under
	// several prefixes the longest wins, and a queue under none has no
	// call-outs. Backend (admin RPC) requests never make call-outs. Prefixes
	// must differ. Empty: no call-outs. Leave notifications are sent
	// asynchronously and may arrive after a later join's call-out: a backend
	// tracking presence orders hooks by their "seq" (see Callout).
	//
	// A session may have at most 64 operations on one queue waiting for
	// call-outs (the running one included), and a gateway link 4096 in all,
	// within LinkBuffer bytes; more are answered LIMIT_EXCEEDED. One whose
	// turn comes after its gateway's deadline is answered TIMEOUT without
	// asking the backend or running. Leaves are exempt from these limits.
	Callouts []Callout
	// OwnedState lists queue-name prefixes (each starts with "/" and begins
	// some valid queue name) under which state keys belong to users: a
	// client may set or delete only the key equal to its user id or keys
	// starting with "<user>/" (on every state mount of the queue); any
	// other key is refused with FORBIDDEN before any call-out. Backend
	// (admin RPC) writes and join call-out seeds may write any key. Empty:
	// any client may write any key (subject to call-outs).
	OwnedState []string
	// CalloutTimeout bounds one call-out, from asking for a connection slot
	// (see CalloutConcurrency) to the end of the answer. Default: 2s.
	CalloutTimeout time.Duration
	// CalloutConcurrency bounds the call-outs in flight to one backend host
	// (scheme, host and port of Callout.URL). Up to 16 times as many wait
	// for a slot within CalloutTimeout; beyond that a call-out fails at
	// once. Default: 64.
	CalloutConcurrency int
	// CalloutFailOpen is the policy when a join, publish or set_state call-out fails (a
	// timeout, a connection error, a non-2xx status, an answer that is not
	// the expected JSON or over 1 MiB, too many call-outs waiting): true lets
	// the operation through as if allowed; false (the default) refuses it
	// with UNAVAILABLE (retryable: the backend refused nothing), "the
	// backend did not answer: ...". DENIED is only the backend's own no.
	CalloutFailOpen bool
	// HandoffHoldBytes bounds the requests one bucket this node is handing
	// off holds while frozen (docs/handoff.md, steps 1 and 5): after the
	// new owner's ack they are answered MOVED in order (the gateway sends
	// them again there) and leaves without a reply forwarded to it; if the
	// hand-off fails they run here. Past it a request is answered
	// UNAVAILABLE (retryable; leaves are always held). At least 4 ×
	// Limits.MaxPayload, at most LinkBuffer: the held leaves go out on a
	// node link of that buffer, and after a failed hand-off the held
	// requests run at once, their answers on gateway links of that buffer.
	// Zero means the default, 16 MiB, raised to 4 × Limits.MaxPayload and
	// lowered to LinkBuffer.
	HandoffHoldBytes int
	// HandoffTimeout bounds one outgoing hand-off from dialling the new
	// owner to its ack (the dial, the freeze, streaming the bucket's
	// queues, its install); past it the node keeps the bucket and tries again later.
	// Keep it below the boss's --move-timeout, which gives the move up.
	// Default: 30s.
	HandoffTimeout time.Duration
	// HandoffRetry is how long a bucket whose hand-off failed waits before
	// it is tried again (if the table still marks it moving), and how often
	// the node looks for moves it missed. Default: 2s.
	HandoffRetry time.Duration
	// HandoffGrace is how long the old owner keeps a handed-off bucket's
	// entry after it holds a table that gives the bucket to its new owner:
	// meanwhile it answers the bucket's requests MOVED and forwards its
	// leaves without a reply to the new owner (gateways that have not
	// fetched that table still send them here); after it the table
	// answers MOVED and a stale leave goes nowhere. Default: 3s.
	HandoffGrace time.Duration
	// AdoptHoldBytes and AdoptHoldTime bound the events of an adopted
	// bucket the new owner holds for one gateway that has not yet confirmed
	// the old owner's mark (BucketAdopted; docs/handoff.md, step 6), and
	// that gateway's requests for the bucket's queues, which wait behind
	// them: past
	// either, the gateway's subscriptions to the bucket's queues are ended
	// (QueueClosed MOVED, an honest rejoin). AdoptHoldTime is also how long
	// a confirmation that came before its bucket is kept. AdoptHoldBytes
	// is at least 4 × Limits.MaxPayload and at most LinkBuffer (the held
	// events go out at once on the confirmation: more would overflow the
	// gateway's link); zero means the default, 8 MiB, raised to 4 ×
	// Limits.MaxPayload and lowered to LinkBuffer. AdoptHoldTime default:
	// 10s.
	AdoptHoldBytes int
	AdoptHoldTime  time.Duration
	// Logger receives structured logs. Default: discard.
	Logger *slog.Logger
	// Registry receives the node's metrics. Default: a private registry.
	Registry *prometheus.Registry
	// Now is the clock. Default: time.Now.
	Now func() time.Time
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		LinkAddr:        "127.0.0.1:7100",
		Limits:          DefaultLimits(),
		MaxQueues:       1_000_000,
		MaxNodeBytes:    1 << 30,
		MaxQueueCreates: 600,
		IdleTTL:         60 * time.Second,
		LinkBuffer:      64 << 20,
		LinkTimeout:     imqlink.DefaultTimeout,

		LinkHandshakeTimeout:     imqlink.DefaultHandshakeTimeout,
		MaxLinkHandshakes:        imqlink.DefaultMaxHandshakes,
		MaxLinkHandshakesPerAddr: imqlink.DefaultMaxHandshakesPerAddr,

		CalloutTimeout:     2 * time.Second,
		CalloutConcurrency: 64,

		// HandoffHoldBytes and AdoptHoldBytes stay 0: their defaults
		// follow LinkBuffer and Limits.MaxPayload (see setDefaults).
		HandoffTimeout: 30 * time.Second,
		HandoffRetry:   2 * time.Second,
		HandoffGrace:   3 * time.Second,
		AdoptHoldTime:  10 * time.Second,
	}
}

// Defaults of the hold byte bounds, before setDefaults fits them to the
// link buffer and the payload limit.
const (
	defaultHandoffHoldBytes = 16 << 20
	defaultAdoptHoldBytes   = 8 << 20
)

func (c *Config) setDefaults() {
	d := DefaultConfig()
	if c.LinkAddr == "" {
		c.LinkAddr = d.LinkAddr
	}
	if c.Limits == (Limits{}) {
		c.Limits = d.Limits
	}
	if c.MaxQueues == 0 {
		c.MaxQueues = d.MaxQueues
	}
	if c.MaxNodeBytes == 0 {
		c.MaxNodeBytes = d.MaxNodeBytes
	}
	if c.MaxQueueCreates == 0 {
		c.MaxQueueCreates = d.MaxQueueCreates
	}
	if c.IdleTTL == 0 {
		c.IdleTTL = d.IdleTTL
	}
	if c.LinkBuffer == 0 {
		c.LinkBuffer = d.LinkBuffer
	}
	if c.LinkTimeout == 0 {
		c.LinkTimeout = d.LinkTimeout
	}
	if c.LinkHandshakeTimeout == 0 {
		c.LinkHandshakeTimeout = d.LinkHandshakeTimeout
	}
	if c.MaxLinkHandshakes == 0 {
		c.MaxLinkHandshakes = d.MaxLinkHandshakes
	}
	if c.MaxLinkHandshakesPerAddr == 0 {
		c.MaxLinkHandshakesPerAddr = d.MaxLinkHandshakesPerAddr
	}
	if c.CalloutTimeout == 0 {
		c.CalloutTimeout = d.CalloutTimeout
	}
	if c.CalloutConcurrency == 0 {
		c.CalloutConcurrency = d.CalloutConcurrency
	}
	if c.HandoffHoldBytes == 0 {
		c.HandoffHoldBytes = min(max(defaultHandoffHoldBytes, 4*c.Limits.MaxPayload), c.LinkBuffer)
	}
	if c.HandoffTimeout == 0 {
		c.HandoffTimeout = d.HandoffTimeout
	}
	if c.HandoffRetry == 0 {
		c.HandoffRetry = d.HandoffRetry
	}
	if c.HandoffGrace == 0 {
		c.HandoffGrace = d.HandoffGrace
	}
	if c.AdoptHoldBytes == 0 {
		c.AdoptHoldBytes = min(max(defaultAdoptHoldBytes, 4*c.Limits.MaxPayload), c.LinkBuffer)
	}
	if c.AdoptHoldTime == 0 {
		c.AdoptHoldTime = d.AdoptHoldTime
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Upper bounds validate puts on limits that are multiplied: far above any
// real use, low enough not to overflow.
const (
	maxCalloutConcurrency = 1 << 16
	maxPayloadLimit       = 1 << 30
)

func (c *Config) validate() error {
	l := c.Limits
	var errs []error
	positive := func(name string, v int) {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %d", name, v))
		}
	}
	positive("history length", l.HistoryLen)
	positive("history bytes", l.HistoryBytes)
	positive("max payload", l.MaxPayload)
	positive("max mounts", l.MaxMounts)
	positive("max state keys", l.MaxStateKeys)
	positive("max state value", l.MaxStateValue)
	positive("max state bytes", l.MaxStateBytes)
	positive("max subscribers", l.MaxSubscribers)
	positive("max replay bytes", l.MaxReplayBytes)
	positive("max join bytes", l.MaxJoinBytes)
	if l.MaxJoinBytes > imqlink.MaxFrame/2 {
		errs = append(errs, fmt.Errorf("max join bytes (%d) must be at most half the link frame limit (%d)", l.MaxJoinBytes, imqlink.MaxFrame))
	}
	if l.MaxReplayBytes > l.MaxJoinBytes {
		errs = append(errs, fmt.Errorf("max replay bytes (%d) must not exceed max join bytes (%d)", l.MaxReplayBytes, l.MaxJoinBytes))
	}
	positive("max queues", c.MaxQueues)
	if least := int64(max(minNodeBytes, 4*l.MaxPayload)); c.MaxNodeBytes < least {
		errs = append(errs, fmt.Errorf("max node bytes must be at least %d (1 MiB, and 4 payloads), got %d", least, c.MaxNodeBytes))
	}
	positive("link buffer", c.LinkBuffer)
	if l.HistoryAge < 0 {
		errs = append(errs, fmt.Errorf("history age must not be negative, got %s", l.HistoryAge))
	}
	if c.LinkTimeout <= 0 {
		errs = append(errs, fmt.Errorf("link timeout must be positive, got %s", c.LinkTimeout))
	}
	if c.LinkHandshakeTimeout <= 0 {
		errs = append(errs, fmt.Errorf("link handshake timeout must be positive, got %s", c.LinkHandshakeTimeout))
	}
	positive("max link handshakes", c.MaxLinkHandshakes)
	positive("max link handshakes per address", c.MaxLinkHandshakesPerAddr)
	if err := imqlink.ValidateKeys(c.ClusterKeys); err != nil {
		errs = append(errs, err)
	}
	if c.IdleTTL < time.Second {
		errs = append(errs, fmt.Errorf("idle TTL must be at least 1s, got %s", c.IdleTTL))
	}
	if c.LinkBuffer < 4*l.MaxPayload {
		errs = append(errs, fmt.Errorf("link buffer (%d bytes) must hold at least 4 payloads of %d bytes", c.LinkBuffer, l.MaxPayload))
	}
	if c.CalloutTimeout <= 0 {
		errs = append(errs, fmt.Errorf("callout timeout must be positive, got %s", c.CalloutTimeout))
	}
	positive("callout concurrency", c.CalloutConcurrency)
	if c.CalloutConcurrency > maxCalloutConcurrency { // callout.go multiplies it (calloutWaitFactor)
		errs = append(errs, fmt.Errorf("callout concurrency must be at most %d, got %d", maxCalloutConcurrency, c.CalloutConcurrency))
	}
	if l.MaxPayload > maxPayloadLimit { // multiplied below: keep it from overflowing
		errs = append(errs, fmt.Errorf("max payload must be at most %d bytes (1 GiB), got %d", maxPayloadLimit, l.MaxPayload))
	}
	for _, b := range []struct {
		name string
		v    int
	}{{"handoff hold bytes", c.HandoffHoldBytes}, {"adopt hold bytes", c.AdoptHoldBytes}} {
		if b.v < 4*l.MaxPayload {
			errs = append(errs, fmt.Errorf("%s (%d) must hold at least 4 payloads of %d bytes", b.name, b.v, l.MaxPayload))
		}
		if b.v > c.LinkBuffer {
			errs = append(errs, fmt.Errorf("%s (%d) must not exceed the link buffer (%d bytes), which carries them on", b.name, b.v, c.LinkBuffer))
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"handoff timeout", c.HandoffTimeout}, {"handoff retry", c.HandoffRetry}, {"handoff grace", c.HandoffGrace}, {"adopt hold time", c.AdoptHoldTime}} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", d.name, d.v))
		}
	}
	prefixes := make(map[string]bool, len(c.Callouts))
	for _, co := range c.Callouts {
		if err := co.validate(); err != nil {
			errs = append(errs, err)
		}
		if prefixes[co.Prefix] {
			errs = append(errs, fmt.Errorf("callout prefix %q is configured twice", co.Prefix))
		}
		prefixes[co.Prefix] = true
	}
	for _, p := range c.OwnedState {
		if err := validPrefix(p); err != nil {
			errs = append(errs, fmt.Errorf("owned-state prefix: %w", err))
		}
	}
	if c.Member != nil {
		if err := c.Member.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("queuenode config: %w", err)
	}
	return nil
}
