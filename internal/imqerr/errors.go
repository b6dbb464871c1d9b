// Package imqerr is the one typed error that crosses process boundaries: a
// code from the documented imqpb.Code enum, a human message, and whether a
// retry may succeed. Clients, the gateway, the queue node and the admin RPC all
// speak it; nobody matches error strings.
//
// It imports only proto/ and is safe for concurrent use (values are immutable).
package imqerr

import (
	"errors"
	"fmt"

	imqpb "github.com/imq-dev/imq/proto"
)

// Error is an error with a protocol code.
type Error struct {
	Code    imqpb.Code
	Message string
}

// New returns an *Error with a formatted message.
func New(code imqpb.Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code.String()
	}
	return e.Code.String() + ": " + e.Message
}

// Retryable reports whether sending the same request again later may succeed.
func (e *Error) Retryable() bool { return Retryable(e.Code) }

// Retryable reports whether a request that failed with code may succeed if
// sent again later without change.
func Retryable(code imqpb.Code) bool {
	switch code {
	case imqpb.Code_UNAVAILABLE, imqpb.Code_TIMEOUT, imqpb.Code_MOVED, imqpb.Code_LIMIT_EXCEEDED:
		return true
	}
	return false
}

// CodeOf returns the code of err: OK for nil, the code of an *Error anywhere
// in its chain, INTERNAL otherwise.
func CodeOf(err error) imqpb.Code {
	if err == nil {
		return imqpb.Code_OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return imqpb.Code_INTERNAL
}

// From converts err to an *Error, wrapping foreign errors as INTERNAL.
func From(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: imqpb.Code_INTERNAL, Message: err.Error()}
}
