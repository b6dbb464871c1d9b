package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
	"github.com/imq-dev/imq/loadtest"
)

// The operations tests (issue 11, "Done when"): the cluster changes shape
// under `imq loadtest` traffic — a queue node added, every node and gateway
// restarted in turn, a node paused past failure detection — and no room is
// lost: the load test reports no violation, no room lost, and exactly-once
// delivery in every room. The boss moves buckets by live hand-off
// (--handoff, docs/handoff.md).

// opsOperatorKey is the boss's operator key in these tests, given to it in
// a file (--operator-key-file), never on its command line.
const opsOperatorKey = "e2e-operator-key-0123456789abcdef"

// opsStopTimeout bounds a process's orderly exit (a drained queue node, a
// gateway telling its clients to reconnect) before it is killed.
const opsStopTimeout = 15 * time.Second

// startOpsCluster starts a boss that moves buckets by hand-off, with an
// operator key, and the queue nodes and gateways (development mode, an
// admin RPC key for queue_info), with fast failure detection; and waits
// until every queue node serves its share of buckets, no move pending.
// bossArgs go to the boss besides.
func startOpsCluster(t testing.TB, nodes, gateways int, bossArgs ...string) *launch.Cluster {
	t.Helper()
	keyFile := filepath.Join(t.TempDir(), "operator-key")
	if err := os.WriteFile(keyFile, []byte(opsOperatorKey), 0o600); err != nil {
		t.Fatal(err)
	}
	c := launchtest.StartCluster(t, launch.ClusterConfig{
		QueueNodes: nodes, Gateways: gateways, Dev: true,
		APIKeys:     []string{apiKey + " methods=queue_info"},
		ClusterArgs: gossipArgs,
		BossArgs:    append([]string{"--handoff", "--operator-key-file", keyFile}, bossArgs...),
	})
	ctx := testutil.Context(t, 45*time.Second) // the first moves, of empty buckets
	for _, n := range c.Nodes {
		if err := c.WaitServing(ctx, n.Name); err != nil {
			t.Fatalf("the cluster did not settle: %v", err)
		}
	}
	return c
}

// startLoad runs cfg's load test in the background, its progress lines in
// the test's log; wait returns its report.
func startLoad(t *testing.T, cfg loadtest.Config) (wait func() *loadtest.Report) {
	t.Helper()
	cfg.Out = launchtest.LogWriter{T: t}
	j := launchtest.Background(t, func(ctx context.Context) (*loadtest.Report, error) { return loadtest.Run(ctx, cfg) })
	// The run's duration, connect timeout, settle and drain steps, and slack.
	bound := time.Duration(cfg.Scenario.Duration) + cfg.ConnectTimeout + cfg.SettleTimeout + 2*cfg.Drain + 30*time.Second
	return func() *loadtest.Report { return j.Wait(t, bound) }
}

// opsLoad is the load of these tests: rooms enough that every node holds
// several, a few bots each chatting (history) and setting their keys
// (state), a little churn so that joins happen during moves, on every
// gateway; strict, so that one bot that cannot connect fails the run.
func opsLoad(c *launch.Cluster, ns string, rooms int, dur time.Duration) loadtest.Config {
	cfg := loadtest.DefaultConfig()
	cfg.URL = strings.Join(c.URLs(), ",")
	cfg.Scenario = loadtest.Scenario{
		Rooms: rooms, BotsPerRoom: 4, ChatRate: 2, StateRate: 0.5, ChurnRate: 1,
		MessageSize: 64, RampRate: 200, Duration: loadtest.Duration(dur), Namespace: ns,
	}
	cfg.ConnectTimeout = 10 * time.Second // a gateway restart takes a second or two
	cfg.Drain = 10 * time.Second
	cfg.SettleTimeout = 10 * time.Second
	return cfg
}

// checkNoRoomLost fails the test unless the run was clean: no violation
// (order, duplicates, gaps, missing or duplicated deliveries, diverged
// state), no room lost but those in mayLose, every bot connected, no
// subscription ended by the server, and everything published arrived (none
// in flight at the end). It also checks that the run checked something.
func checkNoRoomLost(t *testing.T, rep *loadtest.Report, mayLose []string) {
	t.Helper()
	var sum bytes.Buffer
	rep.WriteSummary(&sum)
	t.Logf("load test report:\n%s", sum.String())
	if err := rep.Err(); err != nil {
		t.Errorf("load test failed: %v", err)
	}
	if n := rep.TotalViolations(); n > 0 {
		t.Errorf("%d violations: %v", n, rep.Violations)
	}
	v := rep.Verify
	var lost []string
	for _, room := range v.LostRooms {
		if !slices.Contains(mayLose, room) {
			lost = append(lost, room)
		}
	}
	if len(lost) > 0 {
		t.Errorf("%d rooms lost (recreated in a new epoch: history, state and offsets gone): %v", len(lost), lost)
	}
	if v.Missing > 0 || v.Duplicated > 0 || v.InFlight > 0 {
		t.Errorf("exactly once: %d missing, %d duplicated, %d still in flight at the end (of %d expected)", v.Missing, v.Duplicated, v.InFlight, v.Expected)
	}
	for reason, n := range rep.Disconnects {
		if strings.HasPrefix(reason, "unsubscribed_") || reason == "closed_by_server" {
			t.Errorf("bots were taken out of their rooms: %s ×%d", reason, n)
		}
	}
	c := rep.Counters
	if c.ConnectFailed > 0 || c.Connects != int64(rep.BotsPlanned) {
		t.Errorf("%d of %d bots connected, %d failed: %s", c.Connects, rep.BotsPlanned, c.ConnectFailed, rep.ConnectError)
	}
	if c.Publishes == 0 || v.Expected == 0 || v.Delivered != v.Expected {
		t.Errorf("nothing checked: %d publishes, %d of %d expected deliveries", c.Publishes, v.Delivered, v.Expected)
	}
	if len(rep.Errors) > 0 {
		t.Logf("failed requests (retried by the bots, not losses): %v", rep.Errors)
	}
}

// roomOwners returns which node owns each room of the scenario in t.
func roomOwners(t *bucket.Table, s loadtest.Scenario) map[string]string {
	out := make(map[string]string, s.Rooms)
	for i := range s.Rooms {
		out[s.Room(i)] = ownerOf(t, s.Room(i))
	}
	return out
}

// TestScaleOutUnderLoad: boss + 2 queue nodes + 2 gateways under load; a
// third queue node joins mid-run and takes its share of buckets by
// hand-off, rooms of the load among them. No room is lost, nothing is
// missed or duplicated.
func TestScaleOutUnderLoad(t *testing.T) {
	c := startOpsCluster(t, 2, 2)
	ctx := testutil.Context(t, 3*time.Minute)
	cfg := opsLoad(c, "/ops/scale", 24, 25*time.Second)
	before, err := c.Table(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wait := startLoad(t, cfg)

	time.Sleep(8 * time.Second) // bots joined, rooms with history and state
	qn3, err := c.AddQueueNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitServing(ctx, qn3.Name); err != nil {
		t.Errorf("the new node got no buckets by hand-off: %v", err)
	}
	rep := wait()
	after, err := c.Table(ctx)
	if err != nil {
		t.Fatal(err)
	}
	checkNoRoomLost(t, rep, nil)

	if h := launch.HoldingOf(after, qn3.Name); h.Owned == 0 {
		t.Errorf("%s holds no buckets at the end (table v%d): %+v", qn3.Name, after.Version(), h)
	}
	from, to := roomOwners(before, cfg.Scenario), roomOwners(after, cfg.Scenario)
	var moved []string
	for room, owner := range to {
		if owner == qn3.Name {
			moved = append(moved, fmt.Sprintf("%s (%s→%s)", room, from[room], owner))
		}
	}
	if len(moved) == 0 {
		t.Errorf("no room of the load moved to %s: the test moved nothing that was in use", qn3.Name)
	}
	t.Logf("rooms moved to %s under load: %v", qn3.Name, moved)
}

// TestRollingRestartUnderLoad: under load, every queue node in turn is
// drained through the boss, stopped, started again as a new process with
// the same id and undrained; then every gateway is stopped with SIGTERM
// and started again. No room is lost; the bots stay in their rooms
// (reconnecting after a gateway restart, resuming without a gap).
func TestRollingRestartUnderLoad(t *testing.T) {
	c := startOpsCluster(t, 2, 2)
	ctx := testutil.Context(t, 3*time.Minute)
	cfg := opsLoad(c, "/ops/roll", 24, 35*time.Second)
	wait := startLoad(t, cfg)
	end := time.Now().Add(time.Duration(cfg.Scenario.Duration))

	time.Sleep(5 * time.Second)
	for _, n := range c.Nodes {
		t0 := time.Now()
		if err := c.RollQueueNode(ctx, n, opsOperatorKey, opsStopTimeout); err != nil {
			t.Fatalf("rolling %s: %v", n.Name, err)
		}
		t.Logf("%s drained, restarted and serving again in %v", n.Name, time.Since(t0).Round(time.Millisecond))
	}
	for _, g := range c.Gateways {
		t0 := time.Now()
		if err := c.RollGateway(ctx, g, opsStopTimeout); err != nil {
			t.Fatalf("rolling %s: %v", g.Name, err)
		}
		t.Logf("%s restarted in %v", g.Name, time.Since(t0).Round(time.Millisecond))
	}
	if left := time.Until(end); left < 3*time.Second {
		t.Errorf("the restarts took past the load's end (%v left): the last ones were not under load", left)
	}
	checkNoRoomLost(t, wait(), nil)
}

// TestPausedNodeUnderLoad: a queue node is paused (SIGSTOP) past failure
// detection, so the boss gives its buckets to the other node, then
// continued (SIGCONT). The rooms that lived on the healthy node keep their
// queue: the same epoch and creation time (queue_info), nothing lost,
// missed or duplicated; only the paused node's rooms may be lost (honestly:
// the bots were told). The returning node gets buckets back by hand-off.
func TestPausedNodeUnderLoad(t *testing.T) {
	c := startOpsCluster(t, 2, 2)
	ctx := testutil.Context(t, 3*time.Minute)
	cfg := opsLoad(c, "/ops/pause", 24, 25*time.Second)
	cfg.AbortErrors = 0.5 // requests to the paused node's rooms time out while it is paused
	wait := startLoad(t, cfg)
	time.Sleep(5 * time.Second)

	victim := c.Nodes[0]
	gw := c.Gateways[0].Addr("http")
	infos := map[string]queueInfo{}
	var onVictim, spared []string
	for i := range cfg.Scenario.Rooms {
		room := cfg.Scenario.Room(i)
		qi := queueInfoOf(t, gw, room)
		infos[room] = qi
		if qi.Node == victim.Name {
			onVictim = append(onVictim, room)
		} else {
			spared = append(spared, room)
		}
	}
	if len(onVictim) == 0 || len(spared) == 0 {
		t.Fatalf("want rooms on and off %s: %d and %d", victim.Name, len(onVictim), len(spared))
	}

	if err := victim.Pause(); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	t.Cleanup(func() { victim.Resume() }) // a stopped process cannot stop
	if _, err := c.WaitHolding(ctx, victim.Name, "declared lost", func(h launch.Holding) bool { return h.Owned == 0 }); err != nil {
		victim.Resume()
		t.Fatal(err)
	}
	t.Logf("%s paused; out of the table after %v", victim.Name, time.Since(paused).Round(time.Millisecond))
	time.Sleep(2 * time.Second) // paused well past detection
	if err := victim.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitServing(ctx, victim.Name); err != nil {
		t.Errorf("the returning node got no buckets back by hand-off: %v", err)
	}
	rep := wait()

	for _, room := range spared {
		was, now := infos[room], queueInfoOf(t, gw, room)
		if now.Epoch != was.Epoch || now.CreatedMs != was.CreatedMs {
			t.Errorf("%s (on %s, not paused) was recreated: epoch %d created %d, then epoch %d created %d on %s",
				room, was.Node, was.Epoch, was.CreatedMs, now.Epoch, now.CreatedMs, now.Node)
		}
		if now.Head < was.Head {
			t.Errorf("%s (on %s, not paused): head went back from %d to %d", room, was.Node, was.Head, now.Head)
		}
	}
	checkNoRoomLost(t, rep, onVictim)
	t.Logf("rooms on the paused node: %d (lost: %d), on the other: %d", len(onVictim), rep.Verify.RoomsLost, len(spared))
}

// queueInfo is the part of the admin RPC's queue_info result these tests
// read.
type queueInfo struct {
	Epoch     uint64 `json:"epoch"`
	Head      uint64 `json:"head"`
	Node      string `json:"node"`
	CreatedMs int64  `json:"created_ms"`
}

// queueInfoOf asks the gateway at addr (its client listener) for queue's
// queue_info with the tests' API key.
func queueInfoOf(t *testing.T, addr, queue string) queueInfo {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"queue": queue})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/rpc/v1/queue_info", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("queue_info %s: %v", queue, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("queue_info %s: %s: %s", queue, resp.Status, b)
	}
	var qi queueInfo
	if err := json.Unmarshal(b, &qi); err != nil {
		t.Fatalf("queue_info %s: %v", queue, err)
	}
	return qi
}
