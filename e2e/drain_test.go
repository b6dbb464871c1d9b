package e2e

import (
	"encoding/base64"
	"net/http"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/bucket"
	imqcluster "github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
)

// tableNodeIDs lists the ids of t's nodes.
func tableNodeIDs(t *bucket.Table) []string {
	var ids []string
	for _, n := range t.Nodes() {
		ids = append(ids, n.ID)
	}
	return ids
}

// fetchTable is bossTable for a goroutine: nil when the boss does not
// answer.
func fetchTable(c *launch.Cluster) *bucket.Table {
	resp, err := http.Get("http://" + c.Boss.Addr("http") + imqcluster.TablePath)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	tb, err := imqcluster.DecodeTable(resp.Body)
	if err != nil {
		return nil
	}
	return tb
}

// bossDraining is the boss's draining set, from its /varz.
func bossDraining(t *testing.T, c *launch.Cluster) []string {
	t.Helper()
	var v struct {
		Draining []string `json:"draining"`
	}
	getJSON(t, "http://"+c.Boss.Addr("http")+"/varz", &v)
	return v.Draining
}

// drainedLive reports whether the boss's /v1/nodes shows queue node id
// live and drained.
func drainedLive(t *testing.T, c *launch.Cluster, id string) bool {
	t.Helper()
	var v boss.NodesView
	getJSON(t, "http://"+c.Boss.Addr("http")+"/v1/nodes", &v)
	return slices.ContainsFunc(v.Members, func(m boss.MemberView) bool {
		return m.ID == id && m.State == boss.StateAlive && m.Status == boss.StatusDrained
	})
}

// TestQueueNodeSIGTERMDrains: a queue node told to stop with SIGTERM asks
// the boss to drain it (signed with the cluster key: no operator key), so
// the boss's table stops listing it while it still runs, and exits 0
// within its --drain-timeout. Started again, it undrains itself; with
// --start-drained it stays drained. The boss runs with hand-off off, so the
// buckets move at once: this tests the plumbing, whatever the hand-off.
func TestQueueNodeSIGTERMDrains(t *testing.T) {
	key := launch.NewClusterKey()
	c := launchtest.StartCluster(t, launch.ClusterConfig{
		QueueNodes: 2, Gateways: 1, Dev: true, ClusterKeys: [][]byte{key},
		ClusterArgs: append([]string{"--log-level", "debug"}, gossipArgs...),
		BossArgs:    []string{"--handoff=false"},
		NodeArgs:    []string{"--drain-timeout", "20s"},
	})
	qn1 := c.Nodes[0]

	// Watch the boss's table until qn-1 exits: did it drop qn-1 first?
	droppedWhileRunning := make(chan bool, 1)
	go func() {
		for {
			tb := fetchTable(c)
			running := qn1.ExitCode() == -1 // read after the table
			if tb != nil && !slices.Contains(tableNodeIDs(tb), "qn-1") {
				droppedWhileRunning <- running
				return
			}
			select {
			case <-qn1.Done():
				droppedWhileRunning <- false
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	if err := qn1.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-qn1.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("qn-1 did not exit within 30 s of SIGTERM (--drain-timeout 20s)")
	}
	if code := qn1.ExitCode(); code != 0 {
		t.Fatalf("qn-1 exited %s after SIGTERM, want 0", qn1.ExitStatus())
	}
	if !<-droppedWhileRunning {
		t.Fatal("the boss's table still listed qn-1 when it exited: it did not drain first")
	}
	t.Logf("qn-1 drained and exited in %s", time.Since(start).Round(time.Millisecond))
	if d := bossDraining(t, c); !slices.Equal(d, []string{"qn-1"}) {
		t.Fatalf("boss draining %v after qn-1's SIGTERM, want [qn-1]", d)
	}
	if log, _ := os.ReadFile(qn1.LogPath()); !strings.Contains(string(log), "drained; stopping") {
		t.Fatalf("qn-1's log does not say it drained:\n%s", log)
	}

	// --start-drained: the same id comes back and stays out of the layout.
	keyEnv := []string{"IMQ_CLUSTER_KEY=" + base64.StdEncoding.EncodeToString(key)}
	kept := launchtest.StartProcess(t, "qn-1-kept", keyEnv, append([]string{"queuenode", "--id", "qn-1", "--start-drained",
		"--link-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", c.Boss.Addr("gossip")},
		gossipArgs...)...)
	testutil.WaitFor(t, 15*time.Second, "the boss to see qn-1 (kept drained) live", func() bool {
		return drainedLive(t, c, "qn-1")
	})
	for range 10 { // an undrain at start would land within this
		if d := bossDraining(t, c); !slices.Equal(d, []string{"qn-1"}) {
			t.Fatalf("boss draining %v with qn-1 started --start-drained", d)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ids := tableNodeIDs(bossTable(t, c)); slices.Contains(ids, "qn-1") {
		t.Fatalf("qn-1 started --start-drained got buckets: table nodes %v", ids)
	}
	kept.Stop(syscall.SIGTERM, 15*time.Second) // drained already: it stops at once
	if code := kept.ExitCode(); code != 0 {
		t.Fatalf("qn-1 (kept drained) exited %s", kept.ExitStatus())
	}

	// Started again as itself, it undrains itself and gets buckets back.
	if err := c.Restart(testutil.Context(t, 30*time.Second), qn1); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 15*time.Second, "qn-1 undrained and back in the table", func() bool {
		return len(bossDraining(t, c)) == 0 && slices.Contains(tableNodeIDs(bossTable(t, c)), "qn-1")
	})
	if err := c.WaitRouting(testutil.Context(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
}
