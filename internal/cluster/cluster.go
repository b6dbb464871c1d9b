package cluster

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
)

// DefaultLeaveTimeout bounds the graceful leave at shutdown.
const DefaultLeaveTimeout = time.Second

// Config configures a Cluster.
type Config struct {
	// Member configures the membership. Its OnChange, if set, still runs
	// on every change, before the cluster's own handling.
	Member member.Config
	// Meta is what this process advertises: role, id and addresses. Its
	// table version and sum are the cluster's to set (after each install).
	Meta member.Meta
	// BossURL, if set, is where to fetch the table ("http://lb:7900"; a
	// trailing slash is ignored) instead of the newest boss member's
	// address: a load balancer in front of the boss, say.
	BossURL string
	// Install makes next the table the service works by; it is required.
	// old is the table installed before. It runs for each newer table, in
	// version order and never concurrently, on the goroutine that installs
	// (Run's, or Install's caller), and must finish its work before it
	// returns: WaitVersion's waiters are released after it.
	Install func(old, next *bucket.Table)
	// OnPeers, if set, runs with the live members (this one included) after
	// the membership changes, and once when Start has joined; on one
	// goroutine at a time.
	OnPeers func(peers []member.Peer)
	// PollWait is how long one long poll waits for a newer table. Zero:
	// DefaultPollWait.
	PollWait time.Duration
	// LeaveTimeout bounds the graceful leave. Zero: DefaultLeaveTimeout.
	LeaveTimeout time.Duration
	// Logger; nil discards.
	Logger *slog.Logger
	// Client fetches the table; nil: one with no overall timeout (each
	// poll's context bounds it).
	Client *http.Client
}

// Cluster is a process's membership and its copy of the bucket table.
type Cluster struct {
	cfg    Config
	log    *slog.Logger
	member atomic.Pointer[member.Member] // set once Start has joined; nil before

	peersMu sync.Mutex // one membersChanged at a time

	installMu sync.Mutex                   // one Install at a time
	table     atomic.Pointer[bucket.Table] // the table installed last
	mu        sync.Mutex
	installed chan struct{} // closed and replaced after each install; guarded by mu
	kick      chan struct{} // cap 1: fetch now
}

// Start joins the membership as cfg.Meta says; unreachable seeds are not an
// error (the member keeps trying). Run follows the boss's table; Leave
// leaves. The cluster holds bucket.Empty() until the first table arrives.
func Start(cfg Config) (*Cluster, error) {
	if cfg.Install == nil {
		return nil, errNoInstall
	}
	if cfg.PollWait <= 0 {
		cfg.PollWait = DefaultPollWait
	}
	if cfg.LeaveTimeout <= 0 {
		cfg.LeaveTimeout = DefaultLeaveTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{}
	}
	cfg.BossURL = strings.TrimRight(cfg.BossURL, "/")
	c := &Cluster{cfg: cfg, log: cfg.Logger, installed: make(chan struct{}), kick: make(chan struct{}, 1)}
	c.table.Store(bucket.Empty())

	mc := cfg.Member
	if mc.Logger == nil {
		mc.Logger = cfg.Logger
	}
	userOnChange := mc.OnChange
	mc.OnChange = func() {
		if userOnChange != nil {
			userOnChange()
		}
		c.membersChanged()
	}
	meta := cfg.Meta
	meta.TableVersion, meta.TableSum = 0, ""
	m, err := member.Start(mc, meta)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	c.member.Store(m)
	c.membersChanged() // changes reported before the store were skipped
	return c, nil
}

// Member returns the membership: Peers, Name, Addr, Meta.
func (c *Cluster) Member() *member.Member { return c.member.Load() }

// BossURL returns the base URL of the boss's API: the configured one, else
// that of the boss every member follows (member.NewestBoss), if it
// advertises an HTTP address; false while none is known.
func (c *Cluster) BossURL() (string, bool) {
	return bossURL(c.cfg.BossURL, c.member.Load().Peers())
}

// bossURL is BossURL's choice among peers.
func bossURL(override string, peers []member.Peer) (string, bool) {
	if override != "" {
		return override, true
	}
	boss, ok := member.NewestBoss(peers)
	if !ok || boss.Meta.HTTPAddr == "" {
		return "", false
	}
	return "http://" + boss.Meta.HTTPAddr, true
}

// Leave leaves the membership gracefully, within the leave timeout, so that
// the others see "left" at once rather than after the failure detector's
// time. It is idempotent: later calls do nothing and return nil. A failed
// leave is logged and returned.
func (c *Cluster) Leave() error {
	err := c.member.Load().Close(c.cfg.LeaveTimeout)
	if err != nil {
		c.log.Warn("leaving the cluster", "err", err)
	}
	return err
}

// membersChanged runs after membership changes, on the membership's
// goroutine (and once from Start): a peer that gossips a newer table than
// the one installed means the boss has one for us, so the watcher asks now
// rather than at the end of its poll; then the service hears of the peers.
func (c *Cluster) membersChanged() {
	m := c.member.Load()
	if m == nil {
		return // still in Start, which calls again
	}
	c.peersMu.Lock()
	defer c.peersMu.Unlock()
	peers := m.Peers()
	if newerPeer(peers, c.Table().Version()) {
		c.Kick()
	}
	if c.cfg.OnPeers != nil {
		c.cfg.OnPeers(peers)
	}
}

// newerPeer reports whether a peer holds a table version newer than v.
func newerPeer(peers []member.Peer, v uint64) bool {
	for _, p := range peers {
		if p.Meta.TableVersion > v {
			return true
		}
	}
	return false
}
