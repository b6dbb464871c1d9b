package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/launch"
)

func runBoss(args []string) error {
	fs := newFlagSet("boss", `Runs the boss: it watches cluster membership (queue nodes and gateways join
its gossip address with --join), owns the bucket table that maps queues to
queue nodes, rebalances it as nodes come and go, and serves it at /v1/table.
Operators see every member at /v1/nodes. While the boss is down the cluster
keeps routing by its last table; nothing is rebalanced until it is back.`)
	cfg := boss.DefaultConfig()
	var join listFlag
	var lf commonFlags
	var kf clusterKeyFlags
	fs.StringVar(&cfg.HTTPAddr, "addr", cfg.HTTPAddr, "HTTP listen address of the API: /v1/table, /v1/nodes, /metrics, /healthz and /varz (internal: for operators, gateways and queue nodes; keep it off the public network)")
	fs.StringVar(&cfg.ID, "id", cfg.ID, "boss id in the cluster membership")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory where the bucket table is persisted, such as /var/lib/imq/boss (empty: the table does not survive a restart of the boss and is recovered from the members)")
	fs.DurationVar(&cfg.ReconcileGrace, "reconcile-grace", cfg.ReconcileGrace, "after a restart, how long to wait to hear from the cluster before removing queue nodes the boss does not see")
	fs.DurationVar(&cfg.PeerTimeout, "peer-timeout", cfg.PeerTimeout, "how long /v1/nodes waits for each member's /varz")
	var operatorKey string
	fs.StringVar(&operatorKey, "operator-key", "", "bearer token of the operators' actions (POST /v1/nodes/ID/drain and undrain; imq drain), at least 16 bytes; several, separated by commas or newlines (one a line in a file), are all accepted, to rotate one; empty: those answer 403, GETs stay open")
	fs.BoolVar(&cfg.Handoff, "handoff", cfg.Handoff, "move buckets by live hand-off: mark them moving and flip each when its owner reports it; --handoff=false: buckets move at once and their queues start afresh on the new owner")
	fs.IntVar(&cfg.MaxMoves, "max-moves", cfg.MaxMoves, "with --handoff: most buckets moving at once, cluster-wide")
	fs.DurationVar(&cfg.MoveTimeout, "move-timeout", cfg.MoveTimeout, "with --handoff: a move not reported done within this is given up and tried again later")
	memberFlags(fs, &cfg.Member, "127.0.0.1:7946", &join)
	kf.register(fs)
	lf.register(fs)
	lf.registerReady(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	clusterKeys, err := kf.clusterKeys()
	if err != nil {
		return err
	}
	cfg.Member.Keys, cfg.ClusterKeys = clusterKeys, clusterKeys
	log, stopProfiling, err := lf.setup()
	if err != nil {
		return err
	}
	defer stopProfiling()
	kf.warn(log)
	cfg.Member.Join, cfg.Member.Logger, cfg.Logger = join, log, log
	cfg.OperatorKeys = operatorKeys(operatorKey)
	cfg.Registry = prometheus.NewRegistry()
	obs.Register(cfg.Registry)
	b, err := boss.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	ready := launch.Ready{Role: "boss", ID: cfg.ID, Addrs: map[string]string{"http": b.Addr(), "gossip": b.GossipAddr()}}
	return serve(ctx, log, &lf, ready, b.Run, b.Shutdown)
}
