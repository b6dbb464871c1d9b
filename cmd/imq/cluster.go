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
and log files, and stops them all (gateways first) on Ctrl-C. Gateways run in
development mode unless --jwt-secret is given.

Flags after -- go to every process, e.g. -- --probe-interval 200ms.`)
	var cfg launch.ClusterConfig
	var verbose bool
	fs.IntVar(&cfg.QueueNodes, "queuenodes", 2, "queue nodes to start")
	fs.IntVar(&cfg.Gateways, "gateways", 2, "gateways to start")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for logs and the boss's data (default: a new temporary directory)")
	fs.StringVar(&cfg.JWTSecret, "jwt-secret", "", "HS256 secret for the gateways (default: development mode, ?user= accepted)")
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
	cfg.ClusterArgs = rest
	if verbose {
		cfg.Output = os.Stderr
	}
	ctx, stop := signalContext()
	defer stop()
	start := time.Now()
	c, err := launch.StartCluster(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("stopping the cluster")
		c.Stop(shutdownTimeout)
	}()
	fmt.Printf("imq %s: local cluster running (%s to start)\n\n", versionString(), time.Since(start).Round(time.Millisecond))
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
	fmt.Printf("\nTry: imq loadtest --url %s\nPress Ctrl-C to stop.\n", strings.Join(c.URLs(), ","))
	exited := make(chan *launch.Process, 1)
	for _, p := range append(append([]*launch.Process{c.Boss}, c.Nodes...), c.Gateways...) {
		go func() {
			<-p.Done()
			select {
			case exited <- p:
			default:
			}
		}()
	}
	select {
	case <-ctx.Done():
		return nil
	case p := <-exited:
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("%s exited (code %d); see %s", p.Name, p.ExitCode(), p.LogPath())
	}
}
