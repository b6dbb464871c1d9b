package queuenode_test

import (
	"context"
	"testing"
	"time"

	"github.com/imq-dev/imq/queuenode"
)

// TestRunShutdownConcurrent runs Run and Shutdown at the same time, over and
// over: Run's start of its goroutines (wg.Add) must never run beside
// Shutdown's wait for them (a data race the detector reports), and both
// must return.
func TestRunShutdownConcurrent(t *testing.T) {
	for range 50 {
		cfg := queuenode.DefaultConfig()
		cfg.LinkAddr, cfg.InternalAddr = "127.0.0.1:0", "127.0.0.1:0"
		n, err := queuenode.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ran := make(chan error, 1)
		go func() { ran <- n.Run(context.Background()) }()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := n.Shutdown(ctx); err != nil {
			t.Fatalf("shutdown: %v", err)
		}
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Fatalf("run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Run did not return after Shutdown")
		}
	}
}
