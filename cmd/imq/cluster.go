package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/imq-dev/imq/launch"
)

func runCluster(args []string) error {
	fs := newFlagSet("cluster", `Starts a local cluster of separate processes on 127.0.0.1: a boss, N queue
nodes and M gateways joined to it, all on free ports. It prints their addresses
and log files, and supervises them: a process that exits (kill one to watch
failover) is restarted on the same addresses, after 0.5 s doubling up to 30 s
while it keeps failing, and the others keep running. Ctrl-C stops them all,
gateways first. Gateways run in development mode unless --jwt-secret is given.
The processes share a cluster key made for the run. Secrets reach them in
their environment, never on their command line.

Flags after -- go to every process, e.g. -- --probe-interval 200ms.`)
	var cfg launch.ClusterConfig
	var verbose bool
	var origins listFlag
	var apiKeys apiKeysFlag // checked here, before anything starts
	fs.IntVar(&cfg.QueueNodes, "queuenodes", 2, "queue nodes to start")
	fs.IntVar(&cfg.Gateways, "gateways", 2, "gateways to start")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for logs and the boss's data (default: a new temporary directory)")
	fs.StringVar(&cfg.JWTSecret, "jwt-secret", "", "HS256 secret for the gateways (not given: development mode, ?user= accepted)")
	fs.Var(&apiKeys, "api-key", `the gateways' admin RPC key: "SECRET[ methods=...][ prefixes=...]", repeatable (as imq gateway --api-key); `+apiKeysListHelp)
	fs.Var(&origins, "allowed-origins", "the gateways' --allowed-origins: Origin values allowed on /ws, comma-separated or repeated; * allows any")
	fs.StringVar(&cfg.OperatorKey, "operator-key", "", "the boss's operator key, for imq drain (not given: one is made for the run and printed)")
	fs.StringVar(&cfg.Host, "host", "127.0.0.1", "address every process listens on")
	fs.BoolVar(&verbose, "verbose", false, "copy every process's log lines to stderr")
	var rest []string
	if i := slices.Index(args, "--"); i >= 0 {
		args, rest = args[:i], args[i+1:]
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg.Dev = cfg.JWTSecret == ""
	specs, err := apiKeys.specs()
	if err != nil {
		return err
	}
	cfg.APIKeys, cfg.AllowedOrigins = specs, origins
	// Consumed: the processes get them from cfg, not twice by inheritance.
	madeKey := cfg.OperatorKey == ""
	if madeKey {
		cfg.OperatorKey = launch.NewOperatorKey()
	}
	for _, v := range []string{"IMQ_JWT_SECRET", "IMQ_JWT_SECRET_FILE", "IMQ_API_KEY", "IMQ_API_KEY_FILE", "IMQ_API_KEYS", "IMQ_OPERATOR_KEY", "IMQ_OPERATOR_KEY_FILE"} {
		os.Unsetenv(v)
	}
	cfg.ClusterArgs = rest
	if verbose {
		cfg.Output = os.Stderr
	}
	ctx, stop := signalContext()
	defer stop()
	tempDir := cfg.Dir == "" // StartCluster makes one
	start := time.Now()
	c, err := launch.StartCluster(ctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			return nil // Ctrl-C while starting: StartCluster stopped what it started
		}
		return fmt.Errorf("cluster: %w", err)
	}
	fmt.Printf("imq cluster: local cluster running (version %s, %s to start)\n\n", versionString(), time.Since(start).Round(time.Millisecond))
	tw := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tPID\tADDRESSES\tLOG")
	row := func(p *launch.Process, addrs ...string) {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", p.Name, p.Role, p.PID(), strings.Join(addrs, "  "), p.LogPath())
	}
	row(c.Boss, "api http://"+c.Boss.Addr("http")+"/v1/nodes", "gossip "+c.Boss.Addr("gossip"))
	for _, n := range c.Nodes {
		row(n, "link "+n.Addr("link"), "internal http://"+n.Addr("internal")+"/varz")
	}
	for _, g := range c.Gateways {
		ws := "ws://" + g.Addr("http") + "/ws"
		if cfg.Dev {
			ws += "?user=alice"
		}
		row(g, ws, "internal http://"+g.Addr("internal")+"/varz")
	}
	tw.Flush()
	url, token, secret := c.URLs()[0], "", ""
	if !cfg.Dev {
		token, secret = " --token-file FILE_WITH_A_JWT", " --secret-file FILE_WITH_THE_JWT_SECRET"
	}
	fmt.Printf("\nTry:      imq sub /room/1 --url %s%s   (and imq pub /room/1 hello --url ... in another terminal)\n", url, token)
	fmt.Printf("Load:     imq loadtest --url %s%s\n", strings.Join(c.URLs(), ","), secret)
	fmt.Printf("Drain:    %s imq drain %s --wait --boss http://%s   (kill -TERM a queue node: it drains, then is restarted and undrains)\n",
		operatorKeyHint(cfg.OperatorKey, madeKey), c.Nodes[0].Name, c.Boss.Addr("http"))
	fmt.Printf("Logs:     %s (kept when the cluster stops)\n", c.Dir())
	fmt.Printf("Kill a process to watch failover: it is restarted. Press Ctrl-C to stop.\n")
	c.Supervise(ctx, launch.SuperviseConfig{Logf: func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "imq cluster: "+format+"\n", args...)
	}})
	fmt.Println("imq cluster: stopping (gateways first)")
	c.Stop(shutdownTimeout)
	// The logs are what a user reads after watching failover: they stay,
	// and the user is told where, and how to remove a directory they did
	// not choose.
	if tempDir {
		fmt.Printf("imq cluster: logs and the boss's data kept in %s (remove with: rm -r %s)\n", c.Dir(), c.Dir())
	} else {
		fmt.Printf("imq cluster: logs and the boss's data kept in %s\n", c.Dir())
	}
	return nil
}
