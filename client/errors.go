package client

import (
	"errors"

	"github.com/imq-dev/imq/internal/reasons"
	imqpb "github.com/imq-dev/imq/proto"
)

var (
	// ErrClosed is returned by every call on a client that was closed, by
	// Close or for good by the server. Client.Err says why.
	ErrClosed = errors.New("imq: client closed")

	// ErrConnectionLost fails a request whose connection broke before its
	// reply arrived. The outcome is unknown: a publish may or may not have
	// happened, so the client never resends it; the application decides.
	// IsRetryable reports true for it.
	ErrConnectionLost = errors.New("imq: connection lost; outcome unknown")

	// ErrTimeout fails a request that was sent but not answered before its
	// context (or the request timeout) ended. As with ErrConnectionLost the
	// outcome is unknown. The error also matches the context's error.
	ErrTimeout = errors.New("imq: no reply in time; outcome unknown")

	// ErrAlreadyJoined is returned by Join for a queue that this client has
	// joined already. Leave it first to join it with other mounts.
	ErrAlreadyJoined = errors.New("imq: queue already joined")

	// errSubprotocol means the server did not pick the subprotocol asked for:
	// a deployment mismatch that retrying will not fix.
	errSubprotocol = errors.New("imq: server did not accept the subprotocol")

	// errStale is what sending on a connection that already died returns:
	// nothing was sent, so the request waits for the next connection.
	errStale = errors.New("imq: connection already closed")
)

// Error is a request refused by the server, or by the client before sending
// it, with a code from the protocol's single error enum. Use errors.As:
//
//	var e *client.Error
//	if errors.As(err, &e) && e.Code == imqpb.Code_UNAUTHORIZED { ... }
type Error struct {
	Code    imqpb.Code
	Message string
	// Retryable says whether the same request may succeed if sent again
	// later, as the server judged it.
	Retryable bool
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "imq: " + e.Code.String()
	}
	return "imq: " + e.Code.String() + ": " + e.Message
}

// GoodbyeError is the server's reason for closing the connection, as its
// last message said. Reconnect is the server's flag; whether the client
// reconnects is the reason's: never for a terminal one (KICKED,
// AUTH_TIMEOUT, PROTOCOL_ERROR), always for a retryable one, and the flag
// for AUTH_FAILED (a refused token, or an auth backend that failed) and
// for a reason this client does not know. When it does not, the client
// closes for good and Client.Err returns an error wrapping this one.
type GoodbyeError struct {
	Reason    imqpb.Reason
	Message   string
	Reconnect bool
}

func (e *GoodbyeError) Error() string {
	if e.Message == "" {
		return "imq: server closed the connection: " + e.Reason.String()
	}
	return "imq: server closed the connection: " + e.Reason.String() + ": " + e.Message
}

// IsRetryable reports whether sending the same request again later may
// succeed: for an *Error the server said so, and for ErrConnectionLost or
// ErrTimeout the request may not have arrived (but may have: a publish sent
// again can appear twice).
func IsRetryable(err error) bool {
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Retryable
	}
	return errors.Is(err, ErrConnectionLost) || errors.Is(err, ErrTimeout)
}

// replyError converts a refused reply to an *Error, or returns nil for OK.
func replyError(r *imqpb.Reply) error {
	if r.GetCode() == imqpb.Code_OK {
		return nil
	}
	return &Error{Code: r.GetCode(), Message: r.GetMessage(), Retryable: r.GetRetryable()}
}

// fatal reports whether connecting again cannot help: the credentials or the
// origin were refused, the server's goodbye gave a reason not to come back
// (the reasons table, internal/reasons: a terminal reason whatever the
// flag, the flag for a reason left to the server), or it speaks another
// protocol.
func fatal(err error) bool {
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Code == imqpb.Code_UNAUTHORIZED || e.Code == imqpb.Code_FORBIDDEN
	}
	if g, ok := errors.AsType[*GoodbyeError](err); ok {
		return !reasons.Of(g.Reason).Again(g.Reconnect)
	}
	return errors.Is(err, errSubprotocol)
}

// atOnce reports whether err is a goodbye whose reason asks the client to
// reconnect at once (the gateway is going away), rather than after the
// backoff grown by earlier failures.
func atOnce(err error) bool {
	g, ok := errors.AsType[*GoodbyeError](err)
	return ok && reasons.Of(g.Reason).AtOnce()
}

// reasonOf returns the server's reason carried by err, if any.
func reasonOf(err error) imqpb.Reason {
	if g, ok := errors.AsType[*GoodbyeError](err); ok {
		return g.Reason
	}
	return imqpb.Reason_REASON_UNSPECIFIED
}
