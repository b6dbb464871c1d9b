// Package launch composes IMQ services in one process: `imq dev` and the
// end-to-end tests use it. It sits above the services (it imports gateway/
// and queuenode/; nothing below imports it).
package launch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/queuenode"
)

// DevConfig configures a one-process cluster: one queue node and one gateway.
type DevConfig struct {
	Gateway   gateway.Config
	QueueNode queuenode.Config
	Logger    *slog.Logger
}

// Dev is a running one-process cluster.
type Dev struct {
	Node    *queuenode.Server
	Gateway *gateway.Server
	errc    chan error
}

// StartDev starts a queue node and a gateway wired to it, both serving in the
// background, with one metrics registry served on the gateway's listener.
func StartDev(cfg DevConfig) (*Dev, error) {
	reg := prometheus.NewRegistry()
	obs.Register(reg)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	nc := cfg.QueueNode
	nc.Registry, nc.Logger = reg, cfg.Logger
	node, err := queuenode.New(nc)
	if err != nil {
		return nil, err
	}
	gc := cfg.Gateway
	gc.Registry, gc.Logger = reg, cfg.Logger
	gc.QueueNode = node.LinkAddr()
	gw, err := gateway.New(gc)
	if err != nil {
		node.Shutdown(context.Background())
		return nil, err
	}
	d := &Dev{Node: node, Gateway: gw, errc: make(chan error, 2)}
	go func() { d.errc <- node.Run(context.Background()) }()
	go func() { d.errc <- gw.Run(context.Background()) }()
	return d, nil
}

// URL returns the WebSocket URL clients connect to.
func (d *Dev) URL() string { return "ws://" + d.Gateway.Addr() + "/ws" }

// Err returns a channel that receives a service's error if one stops on its
// own.
func (d *Dev) Err() <-chan error { return d.errc }

// Shutdown stops the gateway (clients are told to reconnect), then the node.
func (d *Dev) Shutdown(ctx context.Context) error {
	return errors.Join(d.Gateway.Shutdown(ctx), d.Node.Shutdown(ctx))
}

// LocalDevConfig returns a one-process cluster for tests and trials: both
// services on 127.0.0.1 with ports the OS picks, the gateway in development
// mode (?user= accepted).
func LocalDevConfig() DevConfig {
	gc := gateway.DefaultConfig()
	gc.Addr, gc.Dev = "127.0.0.1:0", true
	nc := queuenode.DefaultConfig()
	nc.LinkAddr = "127.0.0.1:0"
	return DevConfig{Gateway: gc, QueueNode: nc}
}

// WaitReady waits until the gateway is healthy, that is its link to the
// queue node is up, or ctx ends.
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
