package testutil

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"
)

// pollInterval is how often WaitFor and WaitForNoError check their
// condition.
const pollInterval = 10 * time.Millisecond

// WaitFor polls cond every 10 ms until it holds, failing the test, naming
// what it waited for, if it does not hold within timeout.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(pollInterval)
	}
}

// WaitForNoError polls cond every 10 ms until it returns nil, failing the
// test with cond's last error if it does not within timeout: for a wait
// whose failure is best explained by what was still wrong.
func WaitForNoError(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(pollInterval)
	}
}

// Context returns a context that ends after d or when the test ends,
// whichever comes first.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ClosedAddr returns a host:port on 127.0.0.1 where nothing listens: a port
// that was free a moment ago, for a test that needs a refused connection or
// an address to give a process to listen on.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// ClosedURL returns a WebSocket URL (ws://127.0.0.1:port/ws) where nothing
// listens; see ClosedAddr.
func ClosedURL(t testing.TB) string {
	t.Helper()
	return "ws://" + ClosedAddr(t) + "/ws"
}

// SyncBuffer is an io.Writer that a server, a process's output or a logger
// may write while the test reads it. The zero value is ready to use; it is
// safe for concurrent use.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

// Write appends p to the buffer.
func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// CaptureLogs returns a logger whose records at level and above go, in
// slog's text format (level=WARN msg="..." key=value), to the returned
// buffer, for a test that checks what a server logged.
func CaptureLogs(level slog.Leveler) (*slog.Logger, *SyncBuffer) {
	buf := new(SyncBuffer)
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: level})), buf
}

// Service is what RunShutdown starts and stops: a gateway, a queue node
// or a boss.
type Service interface {
	Run(ctx context.Context) error
	Shutdown(ctx context.Context) error
}

// RunShutdown calls s.Run and, beside it at once, s.Shutdown: both must
// return (within 5 s) without an error. Run in a loop under the race
// detector, it catches a Run that starts goroutines beside Shutdown's wait
// for them.
func RunShutdown(t testing.TB, s Service) {
	t.Helper()
	ran := make(chan error, 1)
	go func() { ran <- s.Run(context.Background()) }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Shutdown")
	}
}
