package launchtest

import (
	"context"
	"testing"
	"time"
)

// Job is work running in the background while a test changes the cluster
// under it, such as a load test (loadtest.Run: launchtest cannot import
// loadtest, whose tests import launchtest).
type Job[T any] struct {
	done chan struct{}
	res  T
	err  error
}

// Background runs f in a goroutine and returns at once. f's context ends
// when the test ends, and the test's cleanup waits for f to return.
func Background[T any](t testing.TB, f func(context.Context) (T, error)) *Job[T] {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	j := &Job[T]{done: make(chan struct{})}
	go func() {
		defer close(j.done)
		j.res, j.err = f(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-j.done
	})
	return j
}

// Wait waits up to bound for f to return and returns its result, failing
// the test if it returned an error or did not return in time.
func (j *Job[T]) Wait(t testing.TB, bound time.Duration) T {
	t.Helper()
	select {
	case <-j.done:
	case <-time.After(bound):
		t.Fatalf("background work still running after %v", bound)
	}
	if j.err != nil {
		t.Fatal(j.err)
	}
	return j.res
}

// LogWriter is an io.Writer that sends each write to the test's log, such
// as a load test's progress lines (loadtest.Config.Out).
type LogWriter struct{ T testing.TB }

func (w LogWriter) Write(p []byte) (int, error) {
	w.T.Logf("%s", p)
	return len(p), nil
}
