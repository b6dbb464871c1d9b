package client

import (
	"errors"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// backoff returns how long to wait before attempt n (from 0): a uniform draw
// from [0, min(hi, lo·2ⁿ)], "full jitter" (AWS Architecture Blog,
// "Exponential Backoff And Jitter"). rnd(n) returns a value in [0, n), as
// rand.Int64N does.
func backoff(lo, hi time.Duration, attempt int, rnd func(int64) int64) time.Duration {
	ceil := lo
	for range attempt {
		if ceil >= hi/2 {
			ceil = hi
			break
		}
		ceil *= 2
	}
	return time.Duration(rnd(int64(min(ceil, hi)) + 1))
}

// goAwayJitter bounds the wait before reconnecting after a goodbye that asks
// the client to come back at once (reconnectAtOnce): a little jitter keeps
// clients told in the same instant apart.
const goAwayJitter = 25 * time.Millisecond

// reconnectWait returns how long to wait before the first attempt to
// replace a connection that ended with cause, and counts the attempt: after
// a goodbye asking to come back at once (reconnectAtOnce), a jitter of at
// most goAwayJitter (and lo), attempt starting over; otherwise the backoff
// of attempt. It is the one place that decides the reconnect delay.
func reconnectWait(cause error, lo, hi time.Duration, attempt *int, rnd func(int64) int64) time.Duration {
	if reconnectAtOnce(cause) {
		*attempt = 0
		return time.Duration(rnd(int64(min(goAwayJitter, lo)) + 1))
	}
	d := backoff(lo, hi, *attempt, rnd)
	*attempt++
	return d
}

// reconnectAtOnce reports whether a connection that ended with cause is to
// be replaced without backoff: a gateway going away (goodbye SHUTDOWN with
// reconnect) spreads its goodbyes over its clients itself, and any other
// gateway can take the client now, so waiting out a backoff would only
// lengthen the client's gap. A failed first attempt backs off as usual.
func reconnectAtOnce(cause error) bool {
	g, ok := errors.AsType[*GoodbyeError](cause)
	return ok && g.Reconnect && g.Reason == imqpb.Reason_REASON_SHUTDOWN
}
