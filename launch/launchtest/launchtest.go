package launchtest

import (
	"context"
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
