package launch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/queuenode"
)

// DevConfig configures a one-process cluster: one queue node and one
// gateway, and with Boss a boss that gives the node every bucket, as in a
// real cluster.
type DevConfig struct {
	Gateway   gateway.Config
	QueueNode queuenode.Config
	// Boss, if not nil, runs a boss in the process; the node and the gateway
	// join it (gossip on free loopback ports) and route by its table.
	// nil: the gateway is wired straight to the node (standalone mode).
	Boss *boss.Config
	// ClusterKeys are the services' cluster keys, primary first: they key
	// the gossip between them (Boss.Member.Keys is replaced) and, unless
	// QueueNode or Gateway has its own (a non-nil list; empty for none),
	// their links. Default: a new random key per StartDev, which nothing
	// outside the process needs.
	ClusterKeys [][]byte
	Logger      *slog.Logger
}

// Dev is a running one-process cluster.
type Dev struct {
	Boss    *boss.Boss // nil in standalone mode
	Node    *queuenode.Server
	Gateway *gateway.Server
	errc    chan error
}

// StartDev starts the services, all serving in the background, with one
// metrics registry served at /metrics on the gateway's internal listener
// (and the queue node's). The queue node gets an internal listener of its
// own (on a free loopback port unless QueueNode.InternalAddr says), so that
// the boss's /v1/nodes shows its /varz as for every other member.
func StartDev(cfg DevConfig) (*Dev, error) {
	reg := prometheus.NewRegistry()
	obs.Register(reg)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if len(cfg.ClusterKeys) == 0 {
		cfg.ClusterKeys = [][]byte{NewClusterKey()}
	}
	d := &Dev{errc: make(chan error, 3)}
	var join *member.Config
	if cfg.Boss != nil {
		bc := *cfg.Boss
		bc.Registry, bc.Logger, bc.Member.Keys, bc.ClusterKeys = reg, cfg.Logger, cfg.ClusterKeys, cfg.ClusterKeys
		bc.Ephemeral = true // it lives and dies with this process's node and gateway
		if bc.Member.BindAddr == "" {
			bc.Member.BindAddr = "127.0.0.1:0"
		}
		b, err := boss.New(bc)
		if err != nil {
			return nil, err
		}
		d.Boss = b
		join = &member.Config{BindAddr: "127.0.0.1:0", Join: []string{b.GossipAddr()}, Cluster: bc.Member.Cluster, Keys: cfg.ClusterKeys}
	}
	nc := cfg.QueueNode
	if nc.ClusterKeys == nil { // a non-nil empty list: a node without a key
		nc.ClusterKeys = cfg.ClusterKeys
	}
	nc.Registry, nc.Logger = reg, cfg.Logger
	if nc.InternalAddr == "" {
		nc.InternalAddr = "127.0.0.1:0"
	}
	if join != nil {
		mc := *join
		nc.Member = &mc
	}
	node, err := queuenode.New(nc)
	if err != nil {
		d.Shutdown(context.Background())
		return nil, err
	}
	d.Node = node
	gc := cfg.Gateway
	if gc.ClusterKeys == nil {
		gc.ClusterKeys = cfg.ClusterKeys
	}
	gc.Registry, gc.Logger = reg, cfg.Logger
	if join != nil {
		mc := *join
		gc.Member, gc.QueueNode = &mc, ""
	} else {
		gc.QueueNode = node.LinkAddr()
	}
	gw, err := gateway.New(gc)
	if err != nil {
		d.Shutdown(context.Background())
		return nil, err
	}
	d.Gateway = gw
	if d.Boss != nil {
		go func() { d.errc <- d.Boss.Run(context.Background()) }()
	}
	go func() { d.errc <- node.Run(context.Background()) }()
	go func() { d.errc <- gw.Run(context.Background()) }()
	return d, nil
}

// URL returns the WebSocket URL clients connect to.
func (d *Dev) URL() string { return "ws://" + d.Gateway.Addr() + "/ws" }

// Err returns a channel that receives a service's error if one stops on its
// own.
func (d *Dev) Err() <-chan error { return d.errc }

// Shutdown stops the gateway (clients are told to reconnect), then the
// node, then the boss.
func (d *Dev) Shutdown(ctx context.Context) error {
	var errs []error
	if d.Gateway != nil {
		errs = append(errs, d.Gateway.Shutdown(ctx))
	}
	if d.Node != nil {
		errs = append(errs, d.Node.Shutdown(ctx))
	}
	if d.Boss != nil {
		errs = append(errs, d.Boss.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// LocalDevConfig returns a one-process cluster for tests and trials: both
// services on 127.0.0.1 with ports the OS picks (their internal listeners
// too), the gateway in development mode (?user= accepted) saying its
// goodbyes at shutdown all at once.
func LocalDevConfig() DevConfig {
	gc := gateway.DefaultConfig()
	gc.Addr, gc.InternalAddr, gc.Dev = "127.0.0.1:0", "127.0.0.1:0", true
	gc.ShutdownSpread = 0 // one gateway: no other takes its clients, so spreading their goodbyes gains nothing
	nc := queuenode.DefaultConfig()
	nc.LinkAddr, nc.InternalAddr = "127.0.0.1:0", "127.0.0.1:0"
	return DevConfig{Gateway: gc, QueueNode: nc}
}

// WaitReady waits until the gateway is healthy (with a boss: it has the
// table and its link to the node is up), or ctx ends.
func (d *Dev) WaitReady(ctx context.Context) error {
	url := "http://" + d.Gateway.Addr() + "/healthz"
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gateway not ready: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
