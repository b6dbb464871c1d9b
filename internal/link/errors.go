package link

import (
	"errors"
	"sync"
	"time"
)

var (
	// ErrOverflow: a frame did not fit in the connection's send buffer
	// (Config.SendBuffer). It was not queued.
	ErrOverflow = errors.New("link send buffer full")
	// ErrClosed: the connection is closed; the frame was not queued.
	ErrClosed = errors.New("link closed")
	// ErrFrameTooLarge: a frame's header announced more than the limit.
	ErrFrameTooLarge = errors.New("link frame too large")
)

// Reason names why a handshake failed: a metric label and a log attribute,
// from the fixed set below.
type Reason string

// The reasons a handshake fails.
const (
	// ReasonTimeout: the handshake did not finish within
	// Config.HandshakeTimeout.
	ReasonTimeout Reason = "timeout"
	// ReasonClosed: the connection ended or failed during the handshake.
	ReasonClosed Reason = "closed"
	// ReasonMalformed: a frame too large, not decodable, or not the one the
	// handshake expects next.
	ReasonMalformed Reason = "malformed"
	// ReasonVersion: the ends speak no common protocol version.
	ReasonVersion Reason = "version"
	// ReasonMode: one end has cluster keys and the other runs without
	// (insecure mode).
	ReasonMode Reason = "mode"
	// ReasonAuth: a MAC did not verify: the peer does not hold the key, or
	// replayed another connection's exchange.
	ReasonAuth Reason = "auth"
	// ReasonPeer: the peer's role is not one this end accepts, or its id is
	// empty or too long.
	ReasonPeer Reason = "peer"
	// ReasonRefused: the acceptor refused the dialer's hello (its HelloAck
	// says why).
	ReasonRefused Reason = "refused"
)

// Reasons lists every Reason, for metrics to start at zero.
var Reasons = []Reason{ReasonTimeout, ReasonClosed, ReasonMalformed, ReasonVersion, ReasonMode, ReasonAuth, ReasonPeer, ReasonRefused}

// HandshakeError is a failed handshake: why, and what happened.
type HandshakeError struct {
	Reason Reason
	Err    error
}

func (e *HandshakeError) Error() string { return "link handshake: " + e.Err.Error() }
func (e *HandshakeError) Unwrap() error { return e.Err }

// ReasonOf returns the reason of a handshake error in err's chain, or ""
// when err is not one (a TCP dial that failed, say).
func ReasonOf(err error) Reason {
	if he, ok := errors.AsType[*HandshakeError](err); ok {
		return he.Reason
	}
	return ""
}

// LogLimiter rate-limits the warnings of handshake failures, per kind (a
// Reason, a Shed): a port scan or a misconfigured peer does not flood the
// log. The zero value is ready for use, with a 10 s interval.
type LogLimiter struct {
	// Every is the least time between two warnings of one reason.
	// Zero: 10 s.
	Every time.Duration

	mu      sync.Mutex
	last    map[string]time.Time // Guarded by mu: by kind, a fixed set.
	skipped map[string]int       // Guarded by mu.
}

// Allow reports whether a warning of a kind may be logged at now and, if
// so, how many were left out since the last one. Kinds come from a fixed
// set (the Reasons, the Sheds), never from a peer.
func (l *LogLimiter) Allow(kind string, now time.Time) (ok bool, skipped int) {
	every := l.Every
	if every == 0 {
		every = 10 * time.Second
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last == nil {
		l.last, l.skipped = map[string]time.Time{}, map[string]int{}
	}
	if last, seen := l.last[kind]; seen && now.Sub(last) < every {
		l.skipped[kind]++
		return false, 0
	}
	l.last[kind] = now
	skipped = l.skipped[kind]
	l.skipped[kind] = 0
	return true, skipped
}
