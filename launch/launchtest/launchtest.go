package launchtest

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/launch"
)

// startTimeout bounds StartDev's wait for readiness and its shutdown at the
// end of the test.
const startTimeout = 5 * time.Second

// StartDev starts a one-process cluster (launch.LocalDevConfig: a queue node
// and a gateway on 127.0.0.1:0, no boss) after mod, which may be nil, has
// changed its configuration. It returns once the cluster is ready, failing
// the test if it does not start or is not ready within 5 s, and shuts it
// down when the test ends.
func StartDev(t testing.TB, mod func(*launch.DevConfig)) *launch.Dev {
	t.Helper()
	cfg := launch.LocalDevConfig()
	if mod != nil {
		mod(&cfg)
	}
	d, err := launch.StartDev(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		defer cancel()
		d.Shutdown(ctx)
	})
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return d
}

// WaitFor polls cond every 10 ms until it holds, failing the test, naming
// what it waited for, if it does not hold within timeout.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
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
