// Package member makes a process a member of an IMQ cluster: a
// hashicorp/memberlist node whose metadata says its role (boss, queue node or
// gateway), its id and its addresses. Members find each other through seed
// addresses, gossip, and declare a silent member dead after the failure
// detection time (see Config.DetectionTime); every process learns who is
// alive without asking the boss.
package member

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Role is what a member does in the cluster.
type Role string

// The roles.
const (
	RoleBoss      Role = "boss"
	RoleQueueNode Role = "queuenode"
	RoleGateway   Role = "gateway"
)

// Meta is what a member tells the others about itself. It travels as JSON in
// memberlist's node metadata, which holds at most 512 bytes.
type Meta struct {
	Role Role   `json:"role"`
	ID   string `json:"id"`
	// LinkAddr is where a queue node takes gateway links.
	LinkAddr string `json:"link,omitempty"`
	// HTTPAddr is the member's internal HTTP address: /healthz, /varz,
	// /metrics and /v1/table (the boss's API; a gateway's and a queue node's
	// internal listener, where the boss fetches /varz and a gateway passes
	// on kicks). Never a client-facing address.
	HTTPAddr string `json:"http,omitempty"`
	// ClientAddr is where a gateway serves clients (/ws, /rpc/v1/), for
	// operators to see; empty for other roles.
	ClientAddr string `json:"client,omitempty"`
	// Started (Unix ms) tells two incarnations of one id apart: the newer
	// wins.
	Started int64 `json:"started"`
	// TableVersion is the bucket table version the member holds, and
	// TableSum its contents' bucket.Table.Sum.
	TableVersion uint64 `json:"table,omitempty"`
	TableSum     string `json:"sum,omitempty"`
}

// Config configures membership. A zero field takes its default from
// DefaultConfig.
type Config struct {
	// BindAddr is the gossip address (TCP and UDP, the same port;
	// "127.0.0.1:7946"). Port 0 picks a free one: see Member.Addr.
	BindAddr string
	// Join lists members to join through (host:port of their gossip
	// address); usually the boss. Empty: this member starts a cluster.
	Join []string
	// Cluster names the cluster: members of differently named clusters
	// ignore each other. Default "imq".
	Cluster string
	// Keys, if set, encrypt and authenticate all gossip (each 16, 24 or 32
	// bytes: AES-128, -192 or -256): only members holding one can join,
	// read membership or claim a role. The first encrypts what this member
	// sends; any of them decrypts what it receives, so that the key can be
	// rotated without stopping the cluster (see README, "Key rotation").
	// Empty: gossip in the clear, for trusted networks only.
	Keys [][]byte
	// ProbeInterval is how often each member probes a random other one.
	ProbeInterval time.Duration
	// ProbeTimeout is how long a probe waits for its ack before asking
	// other members to probe indirectly; shorter than ProbeInterval.
	// Zero: half of ProbeInterval, at most 500 ms (memberlist's LAN
	// setting), so that a shorter ProbeInterval alone is valid.
	ProbeTimeout time.Duration
	// SuspicionMult scales how long a suspected member has to refute before
	// it is declared dead: SuspicionMult × max(1, log10(members)) probe
	// intervals at the least.
	SuspicionMult int
	// RejoinInterval is how often a member that sees no boss (or nobody)
	// tries its Join addresses again, so that a restarted boss is found.
	RejoinInterval time.Duration
	// Logger receives memberlist's logs at their levels. Default: discard.
	Logger *slog.Logger
	// OnChange, if set, runs after members join, leave, die or change
	// their metadata: on one goroutine, never concurrently, and coalesced
	// (one run may cover several changes). Read Peers in it.
	OnChange func()
}

// minProbeInterval is the shortest probe interval worth suggesting: below
// it memberlist would probe faster than a loopback round trip.
const minProbeInterval = time.Millisecond

// maxDefaultProbeTimeout caps the default ProbeTimeout: memberlist's LAN
// setting.
const maxDefaultProbeTimeout = 500 * time.Millisecond

// DefaultConfig returns the documented defaults: memberlist's LAN settings,
// which declare a killed member dead in about DetectionTime (5.5 s in a
// small cluster).
func DefaultConfig() Config {
	return Config{
		BindAddr:       "127.0.0.1:7946",
		Cluster:        "imq",
		ProbeInterval:  time.Second,
		ProbeTimeout:   0, // half of ProbeInterval, at most maxDefaultProbeTimeout: 500 ms
		SuspicionMult:  4,
		RejoinInterval: 5 * time.Second,
	}
}

func (c *Config) setDefaults() {
	d := DefaultConfig()
	if c.BindAddr == "" {
		c.BindAddr = d.BindAddr
	}
	if c.Cluster == "" {
		c.Cluster = d.Cluster
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = d.ProbeInterval
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = min(c.ProbeInterval/2, maxDefaultProbeTimeout)
	}
	if c.SuspicionMult == 0 {
		c.SuspicionMult = d.SuspicionMult
	}
	if c.RejoinInterval == 0 {
		c.RejoinInterval = d.RejoinInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports settings memberlist cannot work with.
func (c Config) Validate() error {
	derivedTimeout := c.ProbeTimeout == 0
	c.setDefaults()
	var errs []error
	if _, _, err := splitHostPort(c.BindAddr); err != nil {
		errs = append(errs, fmt.Errorf("gossip address %q: %v", c.BindAddr, err))
	}
	for _, j := range c.Join {
		if _, _, err := splitHostPort(j); err != nil {
			errs = append(errs, fmt.Errorf("join address %q: %v", j, err))
		}
	}
	switch {
	case c.ProbeInterval < 0:
		errs = append(errs, fmt.Errorf("probe interval %s: must be positive", c.ProbeInterval))
	case c.ProbeTimeout < 0:
		errs = append(errs, fmt.Errorf("probe timeout %s: must be positive", c.ProbeTimeout))
	case derivedTimeout && c.ProbeTimeout == 0:
		errs = append(errs, fmt.Errorf("probe interval %s is too short: the probe timeout, half of it, rounds to zero; "+
			"give at least %s (the tests use 200ms)", c.ProbeInterval, minProbeInterval))
	case c.ProbeTimeout >= c.ProbeInterval:
		errs = append(errs, fmt.Errorf("probe timeout (%s) must be shorter than the probe interval (%s)", c.ProbeTimeout, c.ProbeInterval))
	}
	if c.RejoinInterval < 0 {
		errs = append(errs, fmt.Errorf("rejoin interval %s: must be positive", c.RejoinInterval))
	}
	if c.SuspicionMult < 1 {
		errs = append(errs, fmt.Errorf("suspicion multiplier must be at least 1, got %d", c.SuspicionMult))
	}
	for i, k := range c.Keys {
		if n := len(k); n != 16 && n != 24 && n != 32 {
			errs = append(errs, fmt.Errorf("cluster key %d is %d bytes; want 16, 24 or 32", i+1, n))
		}
	}
	if len(c.Cluster) > memberlist.LabelMaxSize {
		errs = append(errs, fmt.Errorf("cluster name is %d bytes; at most %d", len(c.Cluster), memberlist.LabelMaxSize))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("membership: %w", err)
	}
	return nil
}

// DetectionTime estimates how long the members take to declare a killed
// member of a cluster of n dead: a probe interval, the probe's timeout and
// the suspicion it cannot refute. With the defaults and up to 10 members:
// 1 s + 0.5 s + 4 s = 5.5 s. Measured (BENCHMARKS.md): 5.2–6.4 s, the rest
// being the wait for the dead member's turn in the probers' round-robin.
// memberlist lets a suspicion that too few members confirm last up to 6
// times longer.
func (c Config) DetectionTime(n int) time.Duration {
	c.setDefaults()
	scale := math.Max(1, math.Log10(math.Max(1, float64(n))))
	suspicion := time.Duration(float64(c.SuspicionMult) * scale * float64(c.ProbeInterval))
	return c.ProbeInterval + c.ProbeTimeout + suspicion
}

// Peer is a live member as this one sees it: alive, or suspected but not
// yet declared dead.
type Peer struct {
	Name string // memberlist's name: role, id and a per-process nonce
	Addr string // gossip address
	Meta Meta
}

// Member is this process's membership.
type Member struct {
	cfg  Config
	ml   *memberlist.Memberlist
	log  *slog.Logger
	self string
	addr string // gossip address
	logw *logWriter

	mu    sync.Mutex
	meta  Meta            // guarded by mu
	peers map[string]Peer // live members by name, from the event delegate; guarded by mu

	changed chan struct{} // cap 1: a change to report
	update  chan struct{} // cap 1: our metadata changed
	stop    chan struct{}
	wg      sync.WaitGroup
	once    sync.Once
}

// Start joins the cluster as meta says (Started is set here). Unreachable
// Join addresses are not an error: the member keeps trying them every
// RejoinInterval.
func Start(cfg Config, meta Meta) (*Member, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if meta.Role == "" || meta.ID == "" {
		return nil, errors.New("membership: a member needs a role and an id")
	}
	meta.Started = time.Now().UnixMilli()
	var nonce [4]byte
	rand.Read(nonce[:])
	m := &Member{
		cfg: cfg, log: cfg.Logger, meta: meta, peers: map[string]Peer{},
		self:    fmt.Sprintf("%s/%s/%s", meta.Role, meta.ID, hex.EncodeToString(nonce[:])),
		changed: make(chan struct{}, 1), update: make(chan struct{}, 1), stop: make(chan struct{}),
	}
	if b, _ := json.Marshal(meta); len(b) > memberlist.MetaMaxSize-64 {
		return nil, fmt.Errorf("membership: metadata is %d bytes; ids and addresses must be shorter", len(b))
	}
	host, port, _ := splitHostPort(cfg.BindAddr)
	mc := memberlist.DefaultLANConfig()
	mc.Name = m.self
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertiseAddr, mc.AdvertisePort = "", port
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		mc.AdvertiseAddr = host
	}
	mc.Label = cfg.Cluster
	if len(cfg.Keys) > 0 {
		// GossipVerifyIncoming stays on: unencrypted gossip is refused.
		kr, err := memberlist.NewKeyring(cfg.Keys, cfg.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("membership: %w", err)
		}
		mc.Keyring = kr
	}
	mc.ProbeInterval, mc.ProbeTimeout, mc.SuspicionMult = cfg.ProbeInterval, cfg.ProbeTimeout, cfg.SuspicionMult
	mc.TCPTimeout = max(2*cfg.ProbeInterval, time.Second)
	mc.Delegate = delegate{m}
	mc.Events = events{m}
	m.logw = &logWriter{log: cfg.Logger}
	mc.Logger = log.New(m.logw, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("membership: %w", err)
	}
	m.ml = ml
	// Read once, now: memberlist rewrites its local node under its own lock
	// (metadata updates), so later reads of it would race.
	n := ml.LocalNode()
	m.addr = net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
	// A service bound to every interface (0.0.0.0:7100) is reached at the
	// address this member gossips from.
	m.mu.Lock()
	before := m.meta
	m.meta.LinkAddr = reachable(m.meta.LinkAddr, n.Addr)
	m.meta.HTTPAddr = reachable(m.meta.HTTPAddr, n.Addr)
	m.meta.ClientAddr = reachable(m.meta.ClientAddr, n.Addr)
	changed := m.meta != before
	m.mu.Unlock()
	if changed { // before joining anyone: nobody has seen the old metadata
		if err := ml.UpdateNode(cfg.ProbeInterval); err != nil {
			ml.Shutdown()
			return nil, fmt.Errorf("membership: %w", err)
		}
	}
	if len(cfg.Join) > 0 {
		if _, err := ml.Join(cfg.Join); err != nil {
			m.log.Warn("could not join the cluster yet; retrying", "join", cfg.Join, "err", err)
		}
	}
	m.wg.Add(1)
	go func() { // ends at Close
		defer m.wg.Done()
		m.loop()
	}()
	m.log.Info("cluster member", "name", m.self, "gossip", m.Addr(), "join", cfg.Join)
	return m, nil
}

// Addr returns the gossip address others join through.
func (m *Member) Addr() string { return m.addr }

// Name returns this member's memberlist name.
func (m *Member) Name() string { return m.self }

// Meta returns this member's metadata.
func (m *Member) Meta() Meta {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.meta
}

// SetTable records the bucket table version this member holds and its sum,
// and gossips them (in the background).
func (m *Member) SetTable(v uint64, sum string) {
	m.mu.Lock()
	same := m.meta.TableVersion == v && m.meta.TableSum == sum
	m.meta.TableVersion, m.meta.TableSum = v, sum
	m.mu.Unlock()
	if !same {
		select {
		case m.update <- struct{}{}:
		default:
		}
	}
}

// Peers returns the live members, this one included, sorted by name.
// Members whose metadata is not IMQ's are left out.
func (m *Member) Peers() []Peer {
	m.mu.Lock()
	out := make([]Peer, 0, len(m.peers))
	for _, p := range m.peers {
		out = append(out, p)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// track records n as memberlist reports it: memberlist calls the event
// delegate with n locked, so this is the one safe place to read it (the
// nodes Members returns change under the reader).
func (m *Member) track(n *memberlist.Node, live bool) {
	var meta Meta
	ok := json.Unmarshal(n.Meta, &meta) == nil && meta.Role != "" && meta.ID != ""
	m.mu.Lock()
	if live && ok {
		m.peers[n.Name] = Peer{Name: n.Name, Addr: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))), Meta: meta}
	} else {
		delete(m.peers, n.Name)
	}
	m.mu.Unlock()
	m.notify()
}

// Boss returns the live boss, the newest if there are two (a restarted boss
// before its old incarnation is declared dead).
func (m *Member) Boss() (Peer, bool) { return NewestBoss(m.Peers()) }

// NewestBoss returns the boss among peers that every member follows: the
// newest (latest Started; on a tie, the first in peers), and false if
// there is none.
func NewestBoss(peers []Peer) (Peer, bool) {
	var boss Peer
	found := false
	for _, p := range peers {
		if p.Meta.Role == RoleBoss && (!found || p.Meta.Started > boss.Meta.Started) {
			boss, found = p, true
		}
	}
	return boss, found
}

// Join joins the cluster through addrs (gossip addresses) now.
func (m *Member) Join(addrs []string) (int, error) { return m.ml.Join(addrs) }

// Close leaves the cluster gracefully (the others see "left" at once rather
// than waiting for the failure detector), within timeout, and stops.
func (m *Member) Close(timeout time.Duration) error {
	var err error
	m.once.Do(func() {
		m.logw.closing.Store(true)
		close(m.stop)
		m.wg.Wait()
		err = m.ml.Leave(timeout)
		if e := m.ml.Shutdown(); err == nil {
			err = e
		}
	})
	return err
}

// Shutdown stops without leaving, as a crash would: the others declare this
// member dead after the detection time. For tests, and for fatal paths.
func (m *Member) Shutdown() error {
	var err error
	m.once.Do(func() {
		m.logw.closing.Store(true)
		close(m.stop)
		m.wg.Wait()
		err = m.ml.Shutdown()
	})
	return err
}

// loop reports changes, gossips metadata updates and rejoins when alone or
// without a boss.
func (m *Member) loop() {
	rejoin := time.NewTicker(m.cfg.RejoinInterval)
	defer rejoin.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-m.changed:
			if m.cfg.OnChange != nil {
				m.cfg.OnChange()
			}
		case <-m.update:
			if err := m.ml.UpdateNode(m.cfg.ProbeInterval); err != nil {
				m.log.Debug("gossip metadata update", "err", err)
			}
		case <-rejoin.C:
			if len(m.cfg.Join) == 0 {
				continue
			}
			if _, ok := m.Boss(); ok && m.ml.NumMembers() > 1 {
				continue
			}
			if n, err := m.ml.Join(m.cfg.Join); err != nil {
				m.log.Debug("rejoin failed", "join", m.cfg.Join, "err", err)
			} else {
				m.log.Info("rejoined the cluster", "through", n)
			}
		}
	}
}

func (m *Member) notify() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// delegate gives memberlist our metadata; IMQ sends no user messages.
type delegate struct{ m *Member }

func (d delegate) NodeMeta(limit int) []byte {
	b, _ := json.Marshal(d.m.Meta())
	if len(b) > limit {
		return nil // Start checked the size; a table version cannot grow it past 64 bytes
	}
	return b
}
func (delegate) NotifyMsg([]byte)                           {}
func (delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (delegate) LocalState(join bool) []byte                { return nil }
func (delegate) MergeRemoteState(buf []byte, join bool)     {}

// events wakes the change reporter; memberlist calls these under its locks,
// so they must not block.
type events struct{ m *Member }

func (e events) NotifyJoin(n *memberlist.Node)   { e.m.track(n, true) }
func (e events) NotifyLeave(n *memberlist.Node)  { e.m.track(n, false) }
func (e events) NotifyUpdate(n *memberlist.Node) { e.m.track(n, true) }

// logWriter turns memberlist's "[LEVEL] memberlist: text" lines into slog
// records at that level; from Close or Shutdown on, at debug level.
// memberlist's timers race its own shutdown: a gossip or an indirect ping
// already under way when the socket closes is logged as an error ("use of
// closed network connection"), and an orderly exit is no error.
type logWriter struct {
	log     *slog.Logger
	closing atomic.Bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	line := bytes.TrimSpace(p)
	level := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{"[DEBUG] ": slog.LevelDebug, "[INFO] ": slog.LevelInfo, "[WARN] ": slog.LevelWarn, "[ERR] ": slog.LevelError} {
		if bytes.HasPrefix(line, []byte(prefix)) {
			level, line = l, line[len(prefix):]
			break
		}
	}
	line = bytes.TrimPrefix(line, []byte("memberlist: "))
	if w.closing.Load() {
		level = slog.LevelDebug
	}
	w.log.Log(context.Background(), level, "memberlist: "+string(line))
	return len(p), nil
}

// reachable replaces an unspecified host in addr (0.0.0.0, ::, empty) with
// ip.
func reachable(addr string, ip net.IP) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if h := net.ParseIP(host); host != "" && (h == nil || !h.IsUnspecified()) {
		return addr
	}
	return net.JoinHostPort(ip.String(), port)
}

func splitHostPort(addr string) (string, int, error) {
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(ps)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port %q", ps)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	return host, port, nil
}
