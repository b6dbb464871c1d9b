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
	// Insecure records that the operator chose to run without a cluster key
	// (imq --insecure): /varz shows it, for whoever checks the cluster.
	Insecure bool
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
	// Logger receives structured logs. Default: discard.
	Logger *slog.Logger
	// Registry receives the boss's metrics. Default: a private registry.
	Registry *prometheus.Registry
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		HTTPAddr:          "127.0.0.1:7900",
		ID:                "boss",
		Member:            member.DefaultConfig(),
		ReconcileGrace:    10 * time.Second,
		PeerTimeout:       500 * time.Millisecond,
		TableFetchTimeout: 5 * time.Second,
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
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
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
