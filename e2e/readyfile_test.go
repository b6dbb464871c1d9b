package e2e

import (
	"maps"
	"net"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
)

// readyKinds are the address kinds each role's ready file holds.
var readyKinds = map[string][]string{
	"boss":      {"gossip", "http"},
	"queuenode": {"gossip", "internal", "link"},
	"gateway":   {"gossip", "http", "internal"},
	"dev":       {"boss", "http", "internal", "link", "node_internal"},
}

// checkReady checks that r describes a process of role with id and pid
// whose addresses are bound ports (not :0), of the kinds its role has.
func checkReady(t *testing.T, r launch.Ready, role, id string, pid int) {
	t.Helper()
	if r.Role != role || r.ID != id || r.PID != pid {
		t.Errorf("ready file of %s: role %q id %q pid %d, want %q %q %d", id, r.Role, r.ID, r.PID, role, id, pid)
	}
	if kinds := slices.Sorted(maps.Keys(r.Addrs)); !slices.Equal(kinds, readyKinds[role]) {
		t.Errorf("ready file of %s: address kinds %v, want %v", id, kinds, readyKinds[role])
	}
	for kind, addr := range r.Addrs {
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "0" {
			t.Errorf("ready file of %s: %s address %q is not a bound host:port", id, kind, addr)
		}
	}
}

// TestClusterReadyFiles: every process of imq cluster writes its ready
// file, launch reads its addresses from it, a restarted process writes a
// fresh one (not the killed incarnation's, which stays behind), and a
// stopped process removes its own.
func TestClusterReadyFiles(t *testing.T) {
	c := startLocalCluster(t, 1, 1)
	path := (*launch.Process).ReadyPath
	for _, p := range []*launch.Process{c.Boss, c.Nodes[0], c.Gateways[0]} {
		r, err := launch.ReadReady(path(p))
		if err != nil {
			t.Fatal(err)
		}
		checkReady(t, r, p.Role, p.Name, p.PID())
		for kind, addr := range r.Addrs {
			if p.Addr(kind) != addr {
				t.Errorf("%s: launch has %s address %q, the ready file %q", p.Name, kind, p.Addr(kind), addr)
			}
		}
	}

	node := c.Nodes[0]
	before, _ := launch.ReadReady(path(node))
	node.Signal(syscall.SIGKILL)
	<-node.Done()
	if _, err := os.Stat(path(node)); err != nil {
		t.Fatalf("a killed process cannot remove its ready file, yet: %v", err)
	}
	if err := c.Restart(testutil.Context(t, 20*time.Second), node); err != nil {
		t.Fatal(err)
	}
	after, err := launch.ReadReady(path(node))
	if err != nil {
		t.Fatal(err)
	}
	checkReady(t, after, "queuenode", node.Name, node.PID())
	if after.PID == before.PID {
		t.Errorf("the restarted node's ready file still has the killed one's pid %d", before.PID)
	}
	if !maps.Equal(after.Addrs, before.Addrs) {
		t.Errorf("restarted on addresses %v, want the old ones %v", after.Addrs, before.Addrs)
	}
	if err := c.WaitRouting(testutil.Context(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}

	gw := c.Gateways[0]
	gw.Stop(syscall.SIGTERM, 10*time.Second)
	if _, err := os.Stat(path(gw)); !os.IsNotExist(err) {
		t.Errorf("a gateway that stopped left its ready file: %v", err)
	}
}

// TestDevReadyFile: imq dev writes its addresses to --ready-file (launch
// gives it one and waits for it) and removes it when it stops.
func TestDevReadyFile(t *testing.T) {
	dev := launchtest.StartProcess(t, "dev", nil, "dev", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--boss-addr", "127.0.0.1:0",
		"--link-addr", "127.0.0.1:0")
	r, err := launch.ReadReady(dev.ReadyPath())
	if err != nil {
		t.Fatal(err)
	}
	checkReady(t, r, "dev", "dev", dev.PID())
	dev.Stop(syscall.SIGTERM, 15*time.Second)
	if _, err := os.Stat(dev.ReadyPath()); !os.IsNotExist(err) {
		t.Errorf("imq dev stopped and left its ready file: %v", err)
	}
}
