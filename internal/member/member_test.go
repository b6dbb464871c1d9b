package member

import (
	"bytes"
	"context"
	"log"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
)

func fastConfig(join ...string) Config {
	return Config{
		BindAddr: "127.0.0.1:0", Join: join, Cluster: "imq-test",
		ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond, SuspicionMult: 2,
		RejoinInterval: 200 * time.Millisecond,
	}
}

func startMember(t *testing.T, cfg Config, meta Meta) *Member {
	t.Helper()
	m, err := Start(cfg, meta)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Shutdown() })
	return m
}

func find(peers []Peer, id string) (Peer, bool) {
	for _, p := range peers {
		if p.Meta.ID == id {
			return p, true
		}
	}
	return Peer{}, false
}

func TestMembersSeeEachOtherAndTheirMetadata(t *testing.T) {
	var changes atomic.Int32
	bossCfg := fastConfig()
	bossCfg.OnChange = func() { changes.Add(1) }
	boss := startMember(t, bossCfg, Meta{Role: RoleBoss, ID: "boss", HTTPAddr: "127.0.0.1:7900"})
	node := startMember(t, fastConfig(boss.Addr()), Meta{Role: RoleQueueNode, ID: "qn-1", LinkAddr: "127.0.0.1:7100"})

	testutil.WaitFor(t, 5*time.Second, "the boss to see the node", func() bool { _, ok := find(boss.Peers(), "qn-1"); return ok })
	p, _ := find(boss.Peers(), "qn-1")
	if p.Meta.Role != RoleQueueNode || p.Meta.LinkAddr != "127.0.0.1:7100" || p.Meta.Started == 0 || p.Addr != node.Addr() {
		t.Fatalf("the boss sees %+v", p)
	}
	if b, ok := node.Boss(); !ok || b.Meta.HTTPAddr != "127.0.0.1:7900" {
		t.Fatalf("the node's boss is %+v, %v", b, ok)
	}
	testutil.WaitFor(t, 5*time.Second, "OnChange to run", func() bool { return changes.Load() > 0 })

	node.SetTable(7, "abc")
	testutil.WaitFor(t, 5*time.Second, "the table version to reach the boss", func() bool {
		p, _ := find(boss.Peers(), "qn-1")
		return p.Meta.TableVersion == 7
	})
}

func TestCrashedMemberIsDeclaredDead(t *testing.T) {
	boss := startMember(t, fastConfig(), Meta{Role: RoleBoss, ID: "boss"})
	node := startMember(t, fastConfig(boss.Addr()), Meta{Role: RoleQueueNode, ID: "qn-1"})
	startMember(t, fastConfig(boss.Addr()), Meta{Role: RoleGateway, ID: "gw-1"})
	testutil.WaitFor(t, 5*time.Second, "three members", func() bool { return len(boss.Peers()) == 3 })
	start := time.Now()
	node.Shutdown() // no leave message: as a SIGKILL
	bound := fastConfig().DetectionTime(3)
	// memberlist lets an unconfirmed suspicion last up to 6 times the
	// minimum; the bound for the test leaves room for that.
	testutil.WaitFor(t, 6*bound+2*time.Second, "the crashed node to be declared dead", func() bool {
		_, ok := find(boss.Peers(), "qn-1")
		return !ok
	})
	t.Logf("declared dead after %s (minimum detection time %s)", time.Since(start).Round(time.Millisecond), bound)
}

func TestGracefulLeaveIsSeenAtOnce(t *testing.T) {
	boss := startMember(t, fastConfig(), Meta{Role: RoleBoss, ID: "boss"})
	node, err := Start(fastConfig(boss.Addr()), Meta{Role: RoleQueueNode, ID: "qn-1"})
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, "two members", func() bool { return len(boss.Peers()) == 2 })
	if err := node.Close(time.Second); err != nil {
		t.Fatal(err)
	}
	// Well under the detection time: a leave is not a failure.
	testutil.WaitFor(t, fastConfig().DetectionTime(2)/2, "the leave to be seen", func() bool { return len(boss.Peers()) == 1 })
}

func TestNewestBossWins(t *testing.T) {
	old := startMember(t, fastConfig(), Meta{Role: RoleBoss, ID: "boss", HTTPAddr: "old"})
	time.Sleep(5 * time.Millisecond) // Started is in ms
	newer := startMember(t, fastConfig(old.Addr()), Meta{Role: RoleBoss, ID: "boss", HTTPAddr: "new"})
	gw := startMember(t, fastConfig(old.Addr()), Meta{Role: RoleGateway, ID: "gw-1"})
	testutil.WaitFor(t, 5*time.Second, "three members", func() bool { return len(gw.Peers()) == 3 })
	if b, _ := gw.Boss(); b.Meta.HTTPAddr != "new" || b.Name != newer.Name() {
		t.Fatalf("boss is %+v", b)
	}
}

func TestMemberRejoinsARestartedBoss(t *testing.T) {
	boss := startMember(t, fastConfig(), Meta{Role: RoleBoss, ID: "boss"})
	addr := boss.Addr()
	gw := startMember(t, fastConfig(addr), Meta{Role: RoleGateway, ID: "gw-1"})
	testutil.WaitFor(t, 5*time.Second, "two members", func() bool { return len(gw.Peers()) == 2 })
	boss.Shutdown()
	testutil.WaitFor(t, 10*time.Second, "the boss to be declared dead", func() bool { _, ok := gw.Boss(); return !ok })
	cfg := fastConfig()
	cfg.BindAddr = addr // the same address, as `imq boss` restarted
	again := startMember(t, cfg, Meta{Role: RoleBoss, ID: "boss"})
	// Nobody told the new boss about the gateway: the gateway finds it.
	testutil.WaitFor(t, 5*time.Second, "the gateway to rejoin", func() bool { _, ok := find(again.Peers(), "gw-1"); return ok })
}

// TestProbeTimeoutDefault: without a ProbeTimeout, any ProbeInterval is
// valid (the timeout is half of it, at most 500 ms); a timeout given
// explicitly must still be shorter than the interval.
func TestProbeTimeoutDefault(t *testing.T) {
	for _, c := range []struct {
		interval, timeout, want time.Duration
	}{
		{time.Second, 0, 500 * time.Millisecond},
		{5 * time.Second, 0, 500 * time.Millisecond},
		{200 * time.Millisecond, 0, 100 * time.Millisecond},
		{200 * time.Millisecond, 150 * time.Millisecond, 150 * time.Millisecond},
	} {
		cfg := DefaultConfig()
		cfg.ProbeInterval, cfg.ProbeTimeout = c.interval, c.timeout
		if err := cfg.Validate(); err != nil {
			t.Errorf("interval %v, timeout %v: %v", c.interval, c.timeout, err)
		}
		cfg.setDefaults()
		if cfg.ProbeTimeout != c.want {
			t.Errorf("interval %v, timeout %v: the timeout is %v, want %v", c.interval, c.timeout, cfg.ProbeTimeout, c.want)
		}
	}
	if got := DefaultConfig().DetectionTime(3); got != 5500*time.Millisecond {
		t.Errorf("default detection time %v, want 5.5s", got)
	}
	cfg := DefaultConfig()
	cfg.ProbeInterval, cfg.ProbeTimeout = 200*time.Millisecond, 500*time.Millisecond
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "probe timeout (500ms) must be shorter than the probe interval (200ms)") {
		t.Errorf("an explicit timeout longer than the interval: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{BindAddr: "nohost"}, "gossip address"},
		{Config{Join: []string{"x:y"}}, "join address"},
		{Config{ProbeInterval: time.Second, ProbeTimeout: 2 * time.Second}, "probe timeout"},
		{Config{SuspicionMult: -1}, "suspicion"},
		// --probe-interval 1ns: the derived timeout rounds to zero.
		{Config{ProbeInterval: time.Nanosecond}, "probe interval 1ns is too short: the probe timeout, half of it, rounds to zero; give at least 1ms"},
		{Config{ProbeInterval: -time.Second}, "probe interval -1s: must be positive"},
	} {
		err := c.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want an error about %s", c.cfg, err, c.want)
		}
	}
	if _, err := Start(fastConfig(), Meta{Role: RoleGateway}); err == nil {
		t.Error("a member without an id started")
	}
	if _, err := Start(fastConfig(), Meta{Role: RoleGateway, ID: strings.Repeat("x", 600)}); err == nil {
		t.Error("metadata over memberlist's limit was accepted")
	}
}

func TestDetectionTimeDefaults(t *testing.T) {
	if got := DefaultConfig().DetectionTime(6); got != 5500*time.Millisecond {
		t.Fatalf("default detection time for 6 members is %s, documented 5.5s", got)
	}
}

func TestUnspecifiedAddressesAreAdvertisedReachable(t *testing.T) {
	boss := startMember(t, fastConfig(), Meta{Role: RoleBoss, ID: "boss"})
	node := startMember(t, fastConfig(boss.Addr()), Meta{Role: RoleQueueNode, ID: "qn-1", LinkAddr: "0.0.0.0:7100", HTTPAddr: ":7101"})
	if m := node.Meta(); m.LinkAddr != "127.0.0.1:7100" || m.HTTPAddr != "127.0.0.1:7101" {
		t.Fatalf("advertised %q and %q", m.LinkAddr, m.HTTPAddr)
	}
	gw := startMember(t, fastConfig(boss.Addr()), Meta{Role: RoleGateway, ID: "gw-1", HTTPAddr: "0.0.0.0:8081", ClientAddr: "[::]:8080"})
	if m := gw.Meta(); m.HTTPAddr != "127.0.0.1:8081" || m.ClientAddr != "127.0.0.1:8080" {
		t.Fatalf("gateway advertised internal %q, client %q", m.HTTPAddr, m.ClientAddr)
	}
	testutil.WaitFor(t, 5*time.Second, "the boss to see the node", func() bool {
		p, ok := find(boss.Peers(), "qn-1")
		return ok && p.Meta.LinkAddr == "127.0.0.1:7100"
	})
}

// TestClusterKeyKeepsOutsidersOut: in a keyed cluster a member without
// the key, or with another key, cannot join: its join fails and nobody
// lists it, while a member holding the key (as its second, accepted one)
// joins.
func TestClusterKeyKeepsOutsidersOut(t *testing.T) {
	key, other := testKey(1), testKey(2)
	keyed := fastConfig()
	keyed.Keys = [][]byte{key}
	boss := startMember(t, keyed, Meta{Role: RoleBoss, ID: "boss"})

	for _, tc := range []struct {
		id   string
		keys [][]byte
	}{
		{"gw-no-key", nil},
		{"gw-wrong-key", [][]byte{other}},
	} {
		cfg := fastConfig(boss.Addr()) // it keeps trying, as a member given --join does
		cfg.Keys = tc.keys
		out := startMember(t, cfg, Meta{Role: RoleGateway, ID: tc.id})
		if _, err := out.Join([]string{boss.Addr()}); err == nil {
			t.Errorf("%s joined a keyed cluster", tc.id)
		}
	}
	in := fastConfig(boss.Addr())
	in.Keys = [][]byte{key, other}
	startMember(t, in, Meta{Role: RoleGateway, ID: "gw-in"})
	testutil.WaitFor(t, 5*time.Second, "the keyed gateway to join", func() bool { _, ok := find(boss.Peers(), "gw-in"); return ok })
	time.Sleep(5 * fastConfig().RejoinInterval) // the outsiders' rejoins
	for _, id := range []string{"gw-no-key", "gw-wrong-key"} {
		if _, ok := find(boss.Peers(), id); ok {
			t.Errorf("%s joined a keyed cluster", id)
		}
	}
	for _, keys := range [][][]byte{{[]byte("short")}, {key, make([]byte, 20)}} {
		if err := (Config{Keys: keys}).Validate(); err == nil {
			t.Errorf("keys of %d and %d bytes accepted", len(keys[0]), len(keys[len(keys)-1]))
		}
	}
}

// TestClusterKeyRotation: the key is rotated in three rolling restarts,
// old → [old, new] → [new, old] → new, and members of neighbouring steps
// talk to each other: the first key encrypts, every key decrypts. Skipping
// the first step fails: a member holding only the old key cannot read what
// the new primary encrypts.
func TestClusterKeyRotation(t *testing.T) {
	old, new := testKey(1), testKey(2)
	for _, tc := range []struct {
		name       string
		boss, join [][]byte
		talk       bool
	}{
		{"step 1: old and [old, new]", [][]byte{old}, [][]byte{old, new}, true},
		{"step 2: [old, new] and [new, old]", [][]byte{old, new}, [][]byte{new, old}, true},
		{"step 3: [new, old] and new", [][]byte{new, old}, [][]byte{new}, true},
		{"step 1 skipped: old and [new, old]", [][]byte{old}, [][]byte{new, old}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bc := fastConfig()
			bc.Keys = tc.boss
			boss := startMember(t, bc, Meta{Role: RoleBoss, ID: "boss"})
			jc := fastConfig()
			jc.Keys = tc.join
			m := startMember(t, jc, Meta{Role: RoleQueueNode, ID: "qn-1"})
			_, err := m.Join([]string{boss.Addr()})
			if !tc.talk {
				if err == nil {
					t.Fatal("joined")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			testutil.WaitFor(t, 5*time.Second, "each to see the other", func() bool {
				_, a := find(boss.Peers(), "qn-1")
				_, b := find(m.Peers(), "boss")
				return a && b
			})
			// Probes both ways over a few intervals: neither is declared dead.
			time.Sleep(bc.DetectionTime(2))
			if _, ok := find(boss.Peers(), "qn-1"); !ok {
				t.Error("the boss lost the node")
			}
			if _, ok := find(m.Peers(), "boss"); !ok {
				t.Error("the node lost the boss")
			}
		})
	}
}

// testKey returns a 32-byte key whose bytes are all b.
func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// recordHandler keeps the level and message of every record.
type recordHandler struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = append(h.recs, r)
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) levelOf(msg string) (slog.Level, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.recs {
		if r.Message == msg {
			return r.Level, true
		}
	}
	return 0, false
}

// TestCloseIsQuiet: memberlist's errors are errors while the member runs;
// once it closes, what memberlist's timers log as they race the closed
// socket ("use of closed network connection") is debug, not an ERROR line
// at every Ctrl-C.
func TestCloseIsQuiet(t *testing.T) {
	h := &recordHandler{}
	cfg := fastConfig()
	cfg.Logger = slog.New(h)
	m := startMember(t, cfg, Meta{Role: RoleGateway, ID: "gw-1"})
	mlLog := log.New(m.logw, "", 0) // as memberlist's config holds it
	mlLog.Printf("[ERR] memberlist: Failed to send gossip to 127.0.0.1:1: connection refused")
	if l, ok := h.levelOf("memberlist: Failed to send gossip to 127.0.0.1:1: connection refused"); !ok || l != slog.LevelError {
		t.Fatalf("a memberlist error while running is logged at %v (found %v), want ERROR", l, ok)
	}
	if err := m.Close(time.Second); err != nil {
		t.Fatal(err)
	}
	mlLog.Printf("[ERR] memberlist: Failed to send indirect UDP ping: write udp 127.0.0.1:1->127.0.0.1:2: use of closed network connection")
	if l, ok := h.levelOf("memberlist: Failed to send indirect UDP ping: write udp 127.0.0.1:1->127.0.0.1:2: use of closed network connection"); !ok || l != slog.LevelDebug {
		t.Fatalf("a memberlist error after Close is logged at %v (found %v), want DEBUG", l, ok)
	}
}
