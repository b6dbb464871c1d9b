package e2e

import (
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
)

// cluster is a standalone queue node and a gateway wired to it
// (--queuenode), as separate imq processes started through launch, which
// learns their addresses from their ready files.
type cluster struct {
	t    *testing.T
	node *launch.Process
	gw   *launch.Process
}

const e2eSecret = "e2e-secret-0123456789abcdef"

// startCluster starts the queue node and the gateway, the gateway with
// gwArgs besides the cluster's flags, and returns once the gateway's link
// to the node is up.
func startCluster(t *testing.T, gwArgs ...string) *cluster {
	t.Helper()
	c := &cluster{t: t}
	c.node = launchtest.StartProcess(t, "queuenode", nil, "queuenode", "--link-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0")
	c.gw = c.startGateway("gateway", nil, gwArgs...)
	return c
}

// startGateway starts one more gateway wired to the node, in development
// mode, and returns once its link to the node is up. Its environment holds
// the tests' JWT secret unless env (added to it) says another; args come
// after the cluster's flags, so they may override them ("--addr").
func (c *cluster) startGateway(name string, env []string, args ...string) *launch.Process {
	c.t.Helper()
	args = append([]string{"gateway", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--queuenode", c.node.Addr("link"), "--dev"}, args...)
	gw := launchtest.StartProcess(c.t, name, append([]string{"IMQ_JWT_SECRET=" + e2eSecret}, env...), args...)
	waitHealthy(c.t, gw)
	return gw
}

// killGateway kills the gateway with SIGKILL and waits for its exit.
func (c *cluster) killGateway() { c.gw.Stop(syscall.SIGKILL, 10*time.Second) }

// restartGateway starts the killed or stopped gateway again, on the
// addresses it had, and returns once its link to the node is up.
func (c *cluster) restartGateway() {
	c.t.Helper()
	if err := c.gw.Restart(testutil.Context(c.t, 30*time.Second)); err != nil {
		c.t.Fatal(err)
	}
	waitHealthy(c.t, c.gw)
}

func (c *cluster) url() string { return wsURL(c.gw) }

// wsURL returns a gateway's WebSocket URL.
func wsURL(gw *launch.Process) string { return "ws://" + gw.Addr("http") + "/ws" }

// waitHealthy waits up to 15 s for p's /healthz to answer 200.
func waitHealthy(t *testing.T, p *launch.Process) {
	t.Helper()
	if err := p.WaitHealthy(testutil.Context(t, 15*time.Second)); err != nil {
		t.Fatal(err)
	}
}
