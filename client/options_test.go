package client

import (
	"context"
	"testing"
	"time"
)

func TestOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []Option
		ok   bool
	}{
		{"defaults", nil, true},
		{"backoff", []Option{WithBackoff(time.Millisecond, time.Second)}, true},
		{"backoff min > max", []Option{WithBackoff(time.Second, time.Millisecond)}, false},
		{"backoff zero", []Option{WithBackoff(0, time.Second)}, false},
		{"ping timeout below interval", []Option{WithPingInterval(time.Second), WithPingTimeout(time.Second)}, false},
		{"ping interval zero", []Option{WithPingInterval(0)}, false},
		{"request timeout zero", []Option{WithRequestTimeout(0)}, false},
		{"negative buffer", []Option{WithBufferSize(-1)}, false},
		{"unbuffered", []Option{WithBufferSize(0)}, true},
		{"nil logger", []Option{WithLogger(nil)}, false},
	} {
		o := defaultOptions()
		for _, opt := range tc.opts {
			opt(&o)
		}
		if err := o.validate(); (err == nil) != tc.ok {
			t.Errorf("%s: validate() = %v", tc.name, err)
		}
	}

	o := defaultOptions()
	WithPingInterval(2 * time.Second)(&o)
	if err := o.validate(); err != nil || o.pingTimeout != 6*time.Second {
		t.Errorf("default ping timeout = %v (%v), want 3 intervals", o.pingTimeout, err)
	}
}

func TestDialRejectsBadOptions(t *testing.T) {
	if _, err := Dial(context.Background(), "ws://127.0.0.1:1/ws", WithBufferSize(-1)); err == nil {
		t.Fatal("Dial accepted a negative buffer")
	}
}
