package gateway_test

import (
	"testing"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/testutil"
)

// TestRunShutdownConcurrent runs Run and Shutdown at the same time, over and
// over, standalone and in cluster mode: Run's start of its goroutines
// (wg.Add) must never run beside the wait for them (a data race the
// detector reports), both must return, and neither reports an error (Run
// must take a listener closed by Shutdown for the shutdown it is).
func TestRunShutdownConcurrent(t *testing.T) {
	for i := range 40 {
		cfg := gateway.DefaultConfig()
		cfg.Addr, cfg.InternalAddr, cfg.Dev = "127.0.0.1:0", "127.0.0.1:0", true
		if i%2 == 0 {
			cfg.QueueNode = testutil.ClosedAddr(t)
		} else {
			cfg.Member = &member.Config{BindAddr: "127.0.0.1:0", Cluster: "imq-gateway-test"}
		}
		gw, err := gateway.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		testutil.RunShutdown(t, gw)
	}
}
