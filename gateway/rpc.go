package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// The admin RPC: POST /rpc/v1/<method> with a JSON object, authenticated by
// an API key, answering a JSON result or {"error": {code, message,
// retryable}}. The contract (methods, statuses, data encoding) is
// docs/openapi.json; this file holds the HTTP side (keys, request ids, body
// limits, the in-flight bound, errors, logs, metrics), rpc_methods.go the
// methods, rpc_call.go the call to a queue's node and rpc_kick.go kick.

// RPCPath is where the admin RPC is served: RPCPath + method.
const RPCPath = "/rpc/v1/"

// maxRequestID bounds an X-Request-Id the caller sends; a longer or
// unprintable one is replaced by a generated one.
const maxRequestID = 128

// maxLoggedMethod bounds an unknown method name in the call's log line.
const maxLoggedMethod = 64

// unreadBodyWait bounds the reading of what is left of the body of a call
// refused before its body was read (net/http reads it so that the
// connection can serve another request).
const unreadBodyWait = time.Second

// rpcMethod runs one method: it decodes params strictly, checks them and
// the caller's key, and returns the result object or an error.
type rpcMethod func(s *Server, ctx context.Context, rc *rpcCall, params []byte) (any, error)

// rpcMethods is every method by name; init fills it, since batch refers to
// it.
var rpcMethods map[string]rpcMethod

func init() {
	rpcMethods = map[string]rpcMethod{
		"publish":      (*Server).rpcPublish,
		"set_state":    (*Server).rpcSetState,
		"delete_state": (*Server).rpcDeleteState,
		"get_state":    (*Server).rpcGetState,
		"history":      (*Server).rpcHistory,
		"queue_info":   (*Server).rpcQueueInfo,
		"kick":         (*Server).rpcKick,
		"broadcast":    (*Server).rpcBroadcast,
		"batch":        (*Server).rpcBatch,
	}
}

// rpcMethodNames returns the method names, sorted.
func rpcMethodNames() []string {
	names := make([]string, 0, len(rpcMethods))
	for n := range rpcMethods {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// rpcCall is what a method knows of the HTTP call it serves.
type rpcCall struct {
	key    *apiKey
	id     string // request id
	signed bool   // a kick passed on by another gateway (rpc_kick.go), not a backend's call
}

// rpcError is an error answered with an HTTP status other than its code's.
type rpcError struct {
	status int
	err    *imqerr.Error
}

func (e *rpcError) Error() string { return e.err.Error() }
func (e *rpcError) Unwrap() error { return e.err }

// errorBody is the JSON error object, in a response and in a batch's or a
// broadcast's results.
type errorBody struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
}

func errorBodyOf(err error) *errorBody {
	e := imqerr.From(err)
	return &errorBody{Code: e.Code.String(), Message: e.Message, Retryable: e.Retryable()}
}

// rpcStatus is the HTTP status that answers code.
func rpcStatus(code imqpb.Code) int {
	switch code {
	case imqpb.Code_OK:
		return http.StatusOK
	case imqpb.Code_BAD_REQUEST, imqpb.Code_INVALID_QUEUE_NAME, imqpb.Code_INVALID_MOUNT,
		imqpb.Code_NOT_CONNECTED, imqpb.Code_ALREADY_CONNECTED:
		return http.StatusBadRequest
	case imqpb.Code_UNKNOWN_MESSAGE, imqpb.Code_NOT_FOUND:
		return http.StatusNotFound
	case imqpb.Code_UNAUTHORIZED:
		return http.StatusUnauthorized
	case imqpb.Code_FORBIDDEN, imqpb.Code_DENIED:
		return http.StatusForbidden
	case imqpb.Code_WRONG_MOUNT_TYPE, imqpb.Code_NOT_JOINED:
		return http.StatusConflict
	case imqpb.Code_PAYLOAD_TOO_LARGE:
		return http.StatusRequestEntityTooLarge
	case imqpb.Code_LIMIT_EXCEEDED:
		return http.StatusTooManyRequests
	case imqpb.Code_UNAVAILABLE, imqpb.Code_MOVED:
		return http.StatusServiceUnavailable
	case imqpb.Code_TIMEOUT:
		return http.StatusGatewayTimeout
	}
	return http.StatusInternalServerError
}

// serveRPC answers POST /rpc/v1/<method> on the client listener, called
// with an API key.
func (s *Server) serveRPC(w http.ResponseWriter, r *http.Request) { s.serveCall(w, r, false) }

// serveSignedKick answers POST /rpc/v1/kick on the internal listener: a
// kick another gateway passed on, signed (rpc_kick.go).
func (s *Server) serveSignedKick(w http.ResponseWriter, r *http.Request) { s.serveCall(w, r, true) }

// serveCall runs an admin RPC call, then writes the answer, counts it and
// logs one line. signed: the call is a passed-on kick, which must be
// signed; else it must carry an API key.
func (s *Server) serveCall(w http.ResponseWriter, r *http.Request, signed bool) {
	start := time.Now()
	id := requestID(r.Header.Get("X-Request-Id"))
	w.Header().Set("X-Request-Id", id)
	method := strings.TrimPrefix(r.URL.Path, RPCPath)
	label, logMethod := method, method
	if rpcMethods[method] == nil {
		label = "unknown"
		if len(logMethod) > maxLoggedMethod { // any caller, key or not, picks the path
			logMethod = strings.ToValidUTF8(logMethod[:maxLoggedMethod], "") + "..."
		}
	}
	release := func() {}
	result, keyIndex, err := s.runRPC(w, r, method, id, signed, &release)
	defer release() // after the answer is written: the slot bounds the writes too

	status, code := http.StatusOK, imqpb.Code_OK
	var body any = result
	if err != nil {
		e := imqerr.From(err)
		code, status = e.Code, rpcStatus(e.Code)
		if re, ok := errors.AsType[*rpcError](err); ok {
			status = re.status
		}
		body = map[string]*errorBody{"error": errorBodyOf(e)}
		if status == http.StatusUnauthorized && !signed {
			w.Header().Set("WWW-Authenticate", `Bearer realm="imq"`)
		}
		if status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", http.MethodPost)
		}
	}
	rc := http.NewResponseController(w)
	rc.SetWriteDeadline(time.Now().Add(s.cfg.RPCTimeout))
	defer rc.SetWriteDeadline(time.Time{}) // the connection may serve more requests
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	if werr := enc.Encode(body); werr != nil {
		s.log.Debug("rpc answer not written", "request_id", id, "err", werr)
	}

	d := time.Since(start)
	s.m.rpcRequests.WithLabelValues(label, code.String()).Inc()
	s.m.rpcSeconds.WithLabelValues(label).Observe(d.Seconds())
	attrs := []slog.Attr{
		slog.String("method", logMethod), slog.Int("status", status), slog.String("code", code.String()),
		slog.Duration("duration", d), slog.String("request_id", id),
	}
	if keyIndex > 0 {
		attrs = append(attrs, slog.Int("api_key", keyIndex)) // which configured key, never the key
	}
	if err != nil && status >= 500 {
		attrs = append(attrs, slog.String("error", imqerr.From(err).Message))
	}
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "rpc call", attrs...)
}

// runRPC authenticates, reads and runs one call. It takes an in-flight slot
// and sets *release to give it back.
func (s *Server) runRPC(w http.ResponseWriter, r *http.Request, method, id string, signed bool, release *func()) (result any, keyIndex int, err error) {
	bodyRead := false
	defer func() {
		if !bodyRead {
			// Refused before its body was read: net/http reads what is
			// left of it before it sends the answer, with no deadline of
			// its own, so a caller without a key could trickle a body and
			// hold the connection for good. Past this the connection is
			// closed after the answer instead.
			http.NewResponseController(w).SetReadDeadline(time.Now().Add(unreadBodyWait))
		}
	}()
	if r.Method != http.MethodPost {
		return nil, 0, &rpcError{http.StatusMethodNotAllowed, imqerr.New(imqpb.Code_BAD_REQUEST, "the admin RPC takes POST, not %s", r.Method)}
	}
	if signed {
		return s.runSignedKick(w, r, id, release, &bodyRead)
	}
	// A wrong key is a failed authentication like a bad connect token: it
	// spends the source's budget (admission.go), and a source that spent
	// it is refused before its key is looked at.
	src := connOf(r).source()
	if ok, wait := s.authLimit.allowed(src, time.Now()); !ok {
		s.noteRefused(refusedAuthFailures, src)
		return nil, 0, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "%s", refusalMessage(refusedAuthFailures, wait))
	}
	key, err := s.rpcAuth(r)
	if err != nil {
		s.authLimit.charge(src, time.Now())
		s.warnLimited("rpc_unauthorized", "admin RPC call refused", "source", r.RemoteAddr, "error", imqerr.From(err).Message)
		return nil, 0, err
	}
	connOf(r).unpendKeyed() // a key holder's connection: authenticated, and off its source's pending count from now on
	run := rpcMethods[method]
	if run == nil {
		return nil, key.index, imqerr.New(imqpb.Code_UNKNOWN_MESSAGE, "unknown method %q (methods: %s)", method, strings.Join(rpcMethodNames(), ", "))
	}
	if !key.allowsMethod(method) {
		return nil, key.index, imqerr.New(imqpb.Code_FORBIDDEN, "this API key may not call %s", method)
	}
	select {
	case s.rpcSlots <- struct{}{}:
		*release = func() { <-s.rpcSlots }
	default:
		return nil, key.index, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "the gateway has %d admin RPC calls in progress; retry later", s.cfg.RPCMaxInflight)
	}

	deadline := time.Now().Add(s.cfg.RPCTimeout)
	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	defer cancel()
	body, err := s.readRPCBody(w, r, deadline, int64(s.cfg.RPCMaxBody))
	bodyRead = true
	if err != nil {
		return nil, key.index, err
	}
	if !utf8.Valid(body) {
		// JSON text is UTF-8 (RFC 8259). encoding/json would turn a bad
		// byte in a string into U+FFFD (another state key than the one
		// sent) and keep it in a raw data value (which then reads back as
		// data_base64).
		return nil, key.index, imqerr.New(imqpb.Code_BAD_REQUEST, "the request body is not valid UTF-8, as JSON must be; send raw bytes as data_base64 or value_base64")
	}
	rc := &rpcCall{key: key, id: id}
	result, err = run(s, ctx, rc, body)
	return result, key.index, err
}

// runSignedKick checks and runs a kick another gateway passed on. The body
// (a kick's is small: maxKickBody) is read before anything else, within
// RPCTimeout, and the signature checked before the call takes an in-flight
// slot: a caller without a key holds none while it trickles a body.
func (s *Server) runSignedKick(w http.ResponseWriter, r *http.Request, id string, release *func(), bodyRead *bool) (any, int, error) {
	if len(s.apiKeys) == 0 {
		return nil, 0, imqerr.New(imqpb.Code_UNAUTHORIZED, "the admin RPC is off: no API keys are configured on this gateway")
	}
	h := r.Header.Get("Authorization")
	scheme, rest, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, kickScheme) {
		return nil, 0, imqerr.New(imqpb.Code_UNAUTHORIZED, "the internal listener takes only kicks another gateway signed (Authorization: %s); call the admin RPC on the client port", kickScheme)
	}
	sig, err := parseKickSignature(rest)
	if err != nil {
		return nil, 0, err
	}
	now := time.Now()
	deadline := now.Add(s.cfg.RPCTimeout)
	s.kickReads.Add(1)
	body, err := s.readRPCBody(w, r, deadline, maxKickBody)
	s.kickReads.Add(-1)
	*bodyRead = true
	if err != nil {
		return nil, 0, err
	}
	key := findKeyByID(s.apiKeys, sig.keyID)
	if err := sig.verify(key, body, now); err != nil {
		s.warnLimited("kick_unauthorized", "passed-on kick refused", "source", r.RemoteAddr, "error", imqerr.From(err).Message)
		return nil, 0, err
	}
	if err := s.kickSigs.take(sig.sig, now); err != nil {
		s.warnLimited("kick_replayed", "passed-on kick refused", "source", r.RemoteAddr, "error", imqerr.From(err).Message)
		return nil, key.index, err
	}
	if !utf8.Valid(body) {
		return nil, key.index, imqerr.New(imqpb.Code_BAD_REQUEST, "the request body is not valid UTF-8")
	}
	select {
	case s.rpcSlots <- struct{}{}:
		*release = func() { <-s.rpcSlots }
	default:
		return nil, key.index, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "the gateway has %d admin RPC calls in progress; retry later", s.cfg.RPCMaxInflight)
	}
	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	defer cancel()
	result, err := s.rpcKick(ctx, &rpcCall{key: key, id: id, signed: true}, body)
	return result, key.index, err
}

// rpcAuth finds the caller's API key, sent as Authorization: Bearer <key>.
// A kick signed by a gateway is not taken here: those go to the internal
// listener (serveSignedKick).
func (s *Server) rpcAuth(r *http.Request) (*apiKey, error) {
	if len(s.apiKeys) == 0 {
		return nil, imqerr.New(imqpb.Code_UNAUTHORIZED, "the admin RPC is off: no API keys are configured on this gateway (--api-key or IMQ_API_KEYS)")
	}
	h := r.Header.Get("Authorization")
	if h == "" {
		return nil, imqerr.New(imqpb.Code_UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>")
	}
	scheme, rest, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return nil, imqerr.New(imqpb.Code_UNAUTHORIZED, "the Authorization header must be \"Bearer <key>\"")
	}
	key := findKey(s.apiKeys, strings.TrimSpace(rest))
	if key == nil {
		return nil, imqerr.New(imqpb.Code_UNAUTHORIZED, "unknown API key")
	}
	return key, nil
}

// readRPCBody reads the body, at most limit bytes, by deadline.
func (s *Server) readRPCBody(w http.ResponseWriter, r *http.Request, deadline time.Time, limit int64) ([]byte, error) {
	tooLarge := imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "the request body is larger than %d bytes", limit)
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(deadline) // net/http reads an unread body before it answers: this bounds that too
	if r.ContentLength > limit {
		return nil, tooLarge
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err == nil {
		// Clear it: once the body is read, net/http reads on in the
		// background to notice a client that goes away, and that read
		// failing at the deadline would cancel the call's context (a 503
		// "cancelled" racing the 504 TIMEOUT).
		rc.SetReadDeadline(time.Time{})
		return b, nil
	}
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return nil, tooLarge
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return nil, imqerr.New(imqpb.Code_TIMEOUT, "the request body did not arrive within %s", s.cfg.RPCTimeout)
	}
	return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "reading the request body: %v", err)
}

// requestID returns the caller's request id when it is usable, else a new
// one.
func requestID(h string) string {
	if h != "" && len(h) <= maxRequestID && !strings.ContainsFunc(h, func(r rune) bool { return r < 0x20 || r > 0x7e }) {
		return h
	}
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ctxErr converts the end of a call's context to the caller's error.
func ctxErr(ctx context.Context, timeout time.Duration) error {
	// Past the deadline it is a timeout, even if a parent context was
	// cancelled a moment before the deadline's own timer fired.
	dl, ok := ctx.Deadline()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || ok && !time.Now().Before(dl) {
		return imqerr.New(imqpb.Code_TIMEOUT, "the call did not finish within %s; the outcome is unknown", timeout)
	}
	return imqerr.New(imqpb.Code_UNAVAILABLE, "the call was cancelled; the outcome is unknown")
}
