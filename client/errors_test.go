package client

import (
	"errors"
	"fmt"
	"testing"

	imqpb "github.com/imq-dev/imq/proto"
)

func TestErrors(t *testing.T) {
	refused := replyError(&imqpb.Reply{Id: 1, Code: imqpb.Code_UNAVAILABLE, Message: "node down", Retryable: true})
	wrapped := fmt.Errorf("join: %w", refused)
	var e *Error
	if !errors.As(wrapped, &e) || e.Code != imqpb.Code_UNAVAILABLE || e.Message != "node down" || !e.Retryable {
		t.Fatalf("errors.As(%v) = %+v", wrapped, e)
	}
	if got, want := refused.Error(), "imq: UNAVAILABLE: node down"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if replyError(&imqpb.Reply{Id: 1}) != nil {
		t.Error("OK reply is an error")
	}

	lost := fmt.Errorf("%w: %w", ErrConnectionLost, errors.New("EOF"))
	for _, tc := range []struct {
		err             error
		retryable, last bool
	}{
		{wrapped, true, false},
		{lost, true, false},
		{&Error{Code: imqpb.Code_UNAUTHORIZED}, false, true},
		{&Error{Code: imqpb.Code_FORBIDDEN}, false, true},
		{&Error{Code: imqpb.Code_INTERNAL}, false, false},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_KICKED}, false, true},
		{fmt.Errorf("%w: %w", ErrConnectionLost, &GoodbyeError{Reason: imqpb.Reason_REASON_SHUTDOWN, Reconnect: true}), true, false},
		{fmt.Errorf("%w: x", errSubprotocol), false, true},
		{ErrClosed, false, false},
	} {
		if got := IsRetryable(tc.err); got != tc.retryable {
			t.Errorf("IsRetryable(%v) = %v", tc.err, got)
		}
		if got := fatal(tc.err); got != tc.last {
			t.Errorf("fatal(%v) = %v", tc.err, got)
		}
	}
	if got := reasonOf(fmt.Errorf("x: %w", &GoodbyeError{Reason: imqpb.Reason_REASON_SHUTDOWN})); got != imqpb.Reason_REASON_SHUTDOWN {
		t.Errorf("reasonOf = %v", got)
	}
	if !errors.Is(closedError(&GoodbyeError{}), ErrClosed) || closedError(ErrClosed) != ErrClosed {
		t.Error("closedError does not wrap ErrClosed")
	}
}
