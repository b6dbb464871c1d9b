package boss

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/internal/member"
)

// Config configures a boss. A zero field takes its default from
// DefaultConfig unless its comment says otherwise.
type Config struct {
	// HTTPAddr is the HTTP listen address serving /v1/table, /v1/nodes,
	// /metrics, /healthz and /varz ("127.0.0.1:7900"; port 0 picks a free
	// port, see Boss.Addr). Members learn it from the boss's metadata.
	HTTPAddr string
	// ID names the boss in membership. Default "boss".
	ID string
	// Member configures the boss's membership. BindAddr defaults to
	// "127.0.0.1:7946"; Join lists seed members to join through (optional:
	// members join the boss). Member.Logger defaults to Logger. OnChange, if
	// set, runs before the boss's own handling of each change.
	Member member.Config
	// DataDir is the directory holding boss-state.json, the persisted table
	// and peers (created if missing). Empty: nothing is persisted, and a
	// restarted boss recovers the table from the members only.
	DataDir string
	// Ephemeral says that running without a DataDir is intended: the boss
	// shares a process with the rest of its cluster (imq dev), which starts
	// and stops with it, so there is nothing to recover after a restart.
	// The boss then does not warn that DataDir is empty. Default false.
	Ephemeral bool
	// ReconcileGrace is how long a boss restarted with a persisted table
	// waits to hear from the cluster before removing the nodes it does not
	// see (it stops waiting as soon as a join through its persisted peers or
	// seeds succeeds). It should exceed the members' rejoin interval.
	// Default 10 s.
	ReconcileGrace time.Duration
	// PeerTimeout bounds fetching one member's /varz for /v1/nodes.
	// Default 500 ms.
	PeerTimeout time.Duration
	// TableFetchTimeout bounds fetching a member's table when it holds a
	// newer version than the boss. Default 5 s.
	TableFetchTimeout time.Duration
	// Handoff turns on two-phase moves (docs/handoff.md): a bucket whose
	// owner is alive is marked moving in the published table, and changes
	// owner only when the owner reports the hand-off (POST /v1/handoff).
	// Default true (DefaultConfig; a Config literal has it false). False:
	// buckets move at once, their queues starting afresh on the new owner.
	Handoff bool
	// MaxMoves bounds how many buckets are marked moving at once,
	// cluster-wide, so hand-off traffic is bounded (with Handoff). Default 8.
	MaxMoves int
	// MoveTimeout is how long a marked move may take before the boss gives
	// it up (removes the mark; it is tried again later). Default 60 s.
	MoveTimeout time.Duration
	// ClusterKeys verify the signature of hand-off reports and of members'
	// drain and undrain requests (internal/clusterauth): any of them is
	// accepted, so a key can be rotated. Empty: the boss runs insecure,
	// accepts unsigned reports and drains only with an operator key.
	ClusterKeys [][]byte
	// OperatorKeys are the bearer tokens of the operators' actions (POST
	// /v1/nodes/{id}/drain and undrain), each at least MinOperatorKeyLen
	// bytes of a random token (not a passphrase); any of them is accepted,
	// so a key can be rotated. They are compared by their SHA-256 digests
	// in constant time, which tells a caller nothing of their length.
	// Empty:
	// those actions answer 403 unless signed with a cluster key (a member's,
	// see ClusterKeys); every GET stays open and read-only.
	OperatorKeys [][]byte
	// Logger receives structured logs. Default: discard.
	Logger *slog.Logger
	// Registry receives the boss's metrics. Default: a private registry.
	Registry *prometheus.Registry
}

// MinOperatorKeyLen is the shortest operator key accepted, in bytes.
const MinOperatorKeyLen = 16

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		HTTPAddr:          "127.0.0.1:7900",
		ID:                "boss",
		Member:            member.DefaultConfig(),
		ReconcileGrace:    10 * time.Second,
		PeerTimeout:       500 * time.Millisecond,
		TableFetchTimeout: 5 * time.Second,
		Handoff:           true,
		MaxMoves:          8,
		MoveTimeout:       60 * time.Second,
	}
}

func (c *Config) setDefaults() {
	d := DefaultConfig()
	if c.HTTPAddr == "" {
		c.HTTPAddr = d.HTTPAddr
	}
	if c.ID == "" {
		c.ID = d.ID
	}
	if c.ReconcileGrace == 0 {
		c.ReconcileGrace = d.ReconcileGrace
	}
	if c.PeerTimeout == 0 {
		c.PeerTimeout = d.PeerTimeout
	}
	if c.TableFetchTimeout == 0 {
		c.TableFetchTimeout = d.TableFetchTimeout
	}
	if c.MaxMoves == 0 {
		c.MaxMoves = d.MaxMoves
	}
	if c.MoveTimeout == 0 {
		c.MoveTimeout = d.MoveTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Member.Logger == nil {
		c.Member.Logger = c.Logger
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
}

func (c *Config) validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
		errs = append(errs, fmt.Errorf("HTTP address %q: %v", c.HTTPAddr, err))
	}
	if strings.ContainsAny(c.ID, "/ \t\n") {
		errs = append(errs, fmt.Errorf("id %q must not contain slashes or spaces", c.ID))
	}
	for name, d := range map[string]time.Duration{
		"reconcile grace": c.ReconcileGrace, "peer timeout": c.PeerTimeout, "table fetch timeout": c.TableFetchTimeout,
		"move timeout": c.MoveTimeout,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	if c.MaxMoves < 1 {
		errs = append(errs, fmt.Errorf("max moves must be at least 1, got %d", c.MaxMoves))
	}
	for i, k := range c.ClusterKeys {
		if len(k) == 0 {
			errs = append(errs, fmt.Errorf("cluster key %d is empty", i+1))
		}
	}
	for i, k := range c.OperatorKeys {
		if len(k) < MinOperatorKeyLen {
			errs = append(errs, fmt.Errorf("operator key %d has %d bytes, want at least %d: use a random token, such as the output of `openssl rand -base64 32`", i+1, len(k), MinOperatorKeyLen))
		}
	}
	if err := c.Member.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("boss config: %w", err)
	}
	return nil
}
