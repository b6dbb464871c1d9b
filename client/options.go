package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
)

// Option configures a Client; pass them to Dial.
type Option func(*options)

type options struct {
	token          string
	tokenFunc      func(context.Context) (string, error)
	user           string
	json           bool
	header         http.Header
	dialer         *websocket.Dialer
	logger         *slog.Logger
	backoffMin     time.Duration
	backoffMax     time.Duration
	pingInterval   time.Duration
	pingTimeout    time.Duration // 0: three ping intervals
	requestTimeout time.Duration
	bufferSize     int
	onStateChange  func(ConnState)
	reconnect      bool
}

func defaultOptions() options {
	return options{
		header:         http.Header{},
		logger:         slog.New(slog.DiscardHandler),
		backoffMin:     50 * time.Millisecond,
		backoffMax:     5 * time.Second,
		pingInterval:   10 * time.Second,
		requestTimeout: 10 * time.Second,
		bufferSize:     1024,
		reconnect:      true,
	}
}

func (o *options) validate() error {
	switch {
	case o.backoffMin <= 0 || o.backoffMax < o.backoffMin:
		return fmt.Errorf("imq: backoff bounds %v..%v: want 0 < min <= max", o.backoffMin, o.backoffMax)
	case o.pingInterval <= 0:
		return fmt.Errorf("imq: ping interval %v: want > 0", o.pingInterval)
	case o.pingTimeout != 0 && o.pingTimeout <= o.pingInterval:
		return fmt.Errorf("imq: ping timeout %v: want more than the ping interval %v", o.pingTimeout, o.pingInterval)
	case o.requestTimeout <= 0:
		return fmt.Errorf("imq: request timeout %v: want > 0", o.requestTimeout)
	case o.bufferSize < 0:
		return fmt.Errorf("imq: buffer size %d: want >= 0", o.bufferSize)
	case o.logger == nil:
		return errors.New("imq: nil logger")
	}
	if o.pingTimeout == 0 {
		o.pingTimeout = 3 * o.pingInterval
	}
	return nil
}

// WithToken sets the token sent in every connect: an HS256 JWT whose "sub"
// claim is the user id.
func WithToken(token string) Option {
	return func(o *options) { o.token = token }
}

// WithTokenFunc sets a function called for a fresh token before every
// connect, including reconnects; it overrides WithToken. An error from it
// counts as a failed attempt and is retried with backoff.
func WithTokenFunc(f func(ctx context.Context) (string, error)) Option {
	return func(o *options) { o.tokenFunc = f }
}

// WithUser authenticates as user id through the URL (?user=id), which only a
// gateway in development mode accepts.
func WithUser(id string) Option {
	return func(o *options) { o.user = id }
}

// WithJSON speaks the JSON form (subprotocol imq.v1.json, text frames)
// instead of protobuf. It is slower; it exists for debugging.
func WithJSON() Option {
	return func(o *options) { o.json = true }
}

// WithOrigin sets the Origin header of the WebSocket handshake.
func WithOrigin(origin string) Option {
	return func(o *options) { o.header.Set("Origin", origin) }
}

// WithHeader adds headers to the WebSocket handshake.
func WithHeader(h http.Header) Option {
	return func(o *options) {
		for k, vs := range h {
			for _, v := range vs {
				o.header.Add(k, v)
			}
		}
	}
}

// WithDialer sets the WebSocket dialer (TLS, proxy, buffer sizes). The
// client uses a copy with its own Subprotocols.
func WithDialer(d *websocket.Dialer) Option {
	return func(o *options) { o.dialer = d }
}

// WithLogger sets the logger. The default discards everything.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithBackoff bounds the wait between reconnect attempts: the n-th wait is
// drawn uniformly from [0, min(maxWait, minWait·2ⁿ)], exponential backoff
// with full jitter, so that clients cut off together do not come back
// together. After a gateway's goodbye REASON_SHUTDOWN (it is going away and
// spreads its goodbyes itself) the first attempt waits only a jitter of at
// most 25ms (or minWait, if less). Defaults: 50ms and 5s.
func WithBackoff(minWait, maxWait time.Duration) Option {
	return func(o *options) { o.backoffMin, o.backoffMax = minWait, maxWait }
}

// WithPingInterval sets how often the client pings the server. Default 10s.
func WithPingInterval(d time.Duration) Option {
	return func(o *options) { o.pingInterval = d }
}

// WithPingTimeout sets how long the server may send nothing at all (no
// frame, no ping, no pong) before the client takes the connection for dead
// and reconnects. It must exceed the ping interval. Default: three ping
// intervals.
func WithPingTimeout(d time.Duration) Option {
	return func(o *options) { o.pingTimeout = d }
}

// WithRequestTimeout bounds each request, and each connect attempt, whose
// context has no deadline. Default 10s.
func WithRequestTimeout(d time.Duration) Option {
	return func(o *options) { o.requestTimeout = d }
}

// WithBufferSize sets how many updates each subscription's channel buffers
// (about 150 bytes each, allocated by Join, plus the payloads held). When
// the buffer is full the connection waits for the application; see
// Subscription.Updates. Default 1024.
func WithBufferSize(n int) Option {
	return func(o *options) { o.bufferSize = n }
}

// WithOnStateChange sets a function called on every change of connection
// state. It runs on the client's own goroutine: it must return quickly and
// must not call Close.
func WithOnStateChange(f func(ConnState)) Option {
	return func(o *options) { o.onStateChange = f }
}

// WithReconnect sets whether the client reconnects after losing its
// connection (default true). Without it, a lost connection closes the client.
func WithReconnect(on bool) Option {
	return func(o *options) { o.reconnect = on }
}
