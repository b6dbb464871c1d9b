package queuenode_test

import (
	"github.com/imq-dev/imq/internal/testutil"
	"testing"

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
		testutil.RunShutdown(t, n)
	}
}
