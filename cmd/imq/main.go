// Command imq is the IMQ server: one binary whose subcommands run a gateway, a
// queue node, or a whole development cluster in one process.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/boss"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/queuenode"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usage is imq --help; its list of secret flags comes from secretNames.
var usage = `imq is a real-time pub/sub queue server for online games.

Usage: imq <command> [flags]

Commands:
  dev        run a boss, a queue node and a gateway in one process on localhost
  cluster    run a local cluster as separate processes: a boss, N queue nodes, M gateways
  boss       run the boss: membership, the bucket table, the operators' API
  gateway    run a gateway: client WebSockets, routed to queue nodes by the table
  queuenode  run a queue node: queues in RAM, served to gateways
  loadtest   run bots against a cluster and check what they receive
  drain      imq drain NODE: move every bucket off a queue node (undrain: back)
  version    print the version

Try it without writing code (against 'imq dev' by default; see --url, --user, --token):
  sub        imq sub QUEUE: print each update as one JSON line, resuming across reconnects
  pub        imq pub QUEUE DATA: publish DATA (- reads stdin lines) and print its offset
  state      imq state set QUEUE KEY VALUE | get QUEUE [KEY] | del QUEUE KEY

A cluster is one boss, queue nodes and gateways, each started with
--join BOSS_GOSSIP_ADDR; 'imq cluster' shows how on one machine.

Run 'imq <command> --help' for a command's flags. Every flag can also be set
with an environment variable: --jwt-secret is IMQ_JWT_SECRET. Secrets also
come from a file: --jwt-secret-file or IMQ_JWT_SECRET_FILE. Prefer those: a
command line is visible to every user of the machine. The secret flags:
` + secretFlagList()

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "dev":
		err = runDev(args)
	case "cluster":
		err = runCluster(args)
	case "boss":
		err = runBoss(args)
	case "gateway":
		err = runGateway(args)
	case "queuenode":
		err = runQueueNode(args)
	case "loadtest":
		err = runLoadtest(args)
	case "sub", "pub", "state":
		err = runClientCommand(cmd, args)
	case "drain", "undrain":
		err = runDrain(cmd, args)
	case "version", "--version", "-v":
		err = runVersion(args)
	case "help", "--help", "-h":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "imq: unknown command %q\n\n%s", cmd, usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "imq:", err)
		os.Exit(1)
	}
}

// runVersion is imq version: it takes no flags but --help.
func runVersion(args []string) error {
	fs := newFlagSet("version", "Prints the version of this imq binary.")
	if err := parse(fs, args); err != nil {
		return err
	}
	fmt.Println("imq", versionString())
	return nil
}

func versionString() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

// signalContext is cancelled by the first SIGINT or SIGTERM; a second one
// ends the process at once, as usual, while a shutdown is under way.
func signalContext() (context.Context, context.CancelFunc) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)
	return ctx, stop
}

const shutdownTimeout = 15 * time.Second

// rpcFlags are the gateway's admin RPC and auth call-out flags, turned into
// configuration by apply.
type rpcFlags struct {
	keys apiKeysFlag
}

func (rf *rpcFlags) register(fs *flag.FlagSet, cfg *gateway.Config) {
	fs.Var(&rf.keys, "api-key", `admin RPC key: "SECRET[ methods=publish,get_state][ prefixes=/room/,/lobby/]", repeatable; `+apiKeysListHelp)
	fs.IntVar(&cfg.RPCMaxBody, "rpc-max-body", cfg.RPCMaxBody, "largest admin RPC request body in bytes")
	fs.DurationVar(&cfg.RPCTimeout, "rpc-timeout", cfg.RPCTimeout, "time limit of one admin RPC call")
	fs.IntVar(&cfg.RPCMaxInflight, "rpc-max-inflight", cfg.RPCMaxInflight, "admin RPC calls in flight at most; more are answered 429")
	fs.StringVar(&cfg.AuthURL, "auth-url", "", "backend URL that turns connect tokens into user ids (POST {\"token\"}; a token that verifies as a JWT does not leave the gateway)")
	fs.DurationVar(&cfg.AuthCalloutTimeout, "auth-callout-timeout", cfg.AuthCalloutTimeout, "time limit of one --auth-url call")
	fs.IntVar(&cfg.AuthCalloutConcurrency, "auth-callout-concurrency", cfg.AuthCalloutConcurrency, "--auth-url calls in flight at most")
}

// apply adds the keys of --api-key, --api-key-file, IMQ_API_KEY(_FILE) and
// IMQ_API_KEYS, parsed and checked by parse, to cfg.
func (rf *rpcFlags) apply(cfg *gateway.Config) {
	cfg.APIKeys = append(cfg.APIKeys, rf.keys...)
}

// apiKeysListHelp describes --api-key's list variable (flags.go listValue).
const apiKeysListHelp = "IMQ_API_KEYS holds more, separated by newlines or ';'"

// apiKeysFlag is --api-key, a secret flag (flags.go): each value is one key
// spec, parsed at once by gateway.ParseAPIKey; its list variable,
// IMQ_API_KEYS, holds several, split by gateway.ParseAPIKeys.
type apiKeysFlag []gateway.APIKey

func (a *apiKeysFlag) String() string { return "" } // secrets: --help shows no default

func (a *apiKeysFlag) Set(spec string) error {
	k, err := gateway.ParseAPIKey(spec)
	if err != nil {
		return err
	}
	*a = append(*a, k)
	return nil
}

func (a *apiKeysFlag) SetList(list string) error {
	keys, err := gateway.ParseAPIKeys(list)
	if err != nil {
		return err
	}
	*a = append(*a, keys...)
	return nil
}

// specs returns the keys as specs that gateway.ParseAPIKeys reads back:
// imq cluster gives them to its gateways in IMQ_API_KEYS.
func (a apiKeysFlag) specs() ([]string, error) {
	var out []string
	for i, k := range a {
		if strings.ContainsAny(k.Secret, ";") {
			return nil, fmt.Errorf("API key %d contains ';', which separates keys in IMQ_API_KEYS, how imq cluster passes them to its gateways", i+1)
		}
		spec := k.Secret
		if len(k.Methods) > 0 {
			spec += " methods=" + strings.Join(k.Methods, ",")
		}
		if len(k.Prefixes) > 0 {
			spec += " prefixes=" + strings.Join(k.Prefixes, ",")
		}
		out = append(out, spec)
	}
	return out, nil
}

// calloutFlags are the queue node's call-out flags.
type calloutFlags struct {
	specs   repeatFlag
	failure failureFlag
}

func (cf *calloutFlags) register(fs *flag.FlagSet, cfg *queuenode.Config) {
	fs.Var(&cf.specs, "callout", `call the backend before joins, publishes and state changes: "PREFIX=URL[ hooks=join,publish,set_state,leave]" (default: all four), repeatable (POST URL/<hook>)`)
	fs.DurationVar(&cfg.CalloutTimeout, "callout-timeout", cfg.CalloutTimeout, "time limit of one call-out")
	fs.IntVar(&cfg.CalloutConcurrency, "callout-concurrency", cfg.CalloutConcurrency, "call-outs in flight per backend host at most")
	fs.Var(&cf.failure, "callout-failure", "what a failed call-out (timeout, error, bad answer, backend down) means for a join, publish or state change: deny or allow")
	fs.Var((*listFlag)(&cfg.OwnedState), "owned-state", "queue-name prefix under which a client may write only its own state keys (<user> and <user>/...); comma-separated or repeated (the admin RPC writes any key)")
}

func (cf *calloutFlags) apply(cfg *queuenode.Config) error {
	for _, spec := range cf.specs {
		c, err := queuenode.ParseCallout(spec)
		if err != nil {
			return fmt.Errorf("--callout: %w", err)
		}
		cfg.Callouts = append(cfg.Callouts, c)
	}
	cfg.CalloutFailOpen = bool(cf.failure)
	return nil
}

// gatewayFlags binds the gateway's flags to cfg.
func gatewayFlags(fs *flag.FlagSet, cfg *gateway.Config, secret *string, origins *listFlag) {
	fs.StringVar(&cfg.Addr, "addr", cfg.Addr, "client listen address: /ws, the admin RPC (/rpc/v1/) and /healthz")
	fs.StringVar(&cfg.InternalAddr, "internal-addr", cfg.InternalAddr, "internal HTTP listen address for /metrics, /healthz, /varz, /v1/table and kicks passed on by other gateways; keep it off the public network")
	fs.StringVar(secret, "jwt-secret", "", "HS256 secret that verifies connect tokens (at least 16 bytes)")
	fs.Func("jwt-public-key", "PEM file of public keys or certificates that verify connect tokens: RSA (RS256), ECDSA P-256/P-384 (ES256/ES384), Ed25519 (EdDSA)", func(path string) error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if len(b) == 0 {
			return fmt.Errorf("%s is empty: want PEM public keys or certificates", path)
		}
		cfg.JWTPublicKeys = b
		return nil
	})
	fs.StringVar(&cfg.JWKSURL, "jwks-url", "", "JWKS URL of a login service whose keys verify connect tokens, chosen by kid (https, or http to a loopback host)")
	fs.DurationVar(&cfg.JWKSRefresh, "jwks-refresh", cfg.JWKSRefresh, "how often the JWKS is fetched again (an unknown kid fetches it at most every 30s)")
	fs.StringVar(&cfg.JWTAudience, "jwt-audience", "", "this service's name in the tokens' aud claim, which must name it (empty: tokens must carry no aud)")
	fs.StringVar(&cfg.JWTIssuer, "jwt-issuer", "", "required iss claim of connect tokens (empty: any)")
	fs.DurationVar(&cfg.JWTMaxAge, "jwt-max-age", cfg.JWTMaxAge, "refuse tokens valid for longer: exp - iat, or exp - now without iat")
	fs.BoolVar(&cfg.JWTAllowNoExp, "jwt-allow-no-exp", false, "accept connect tokens without exp, which never expire (default: exp required)")
	fs.Var(origins, "allowed-origins", "Origin values allowed on /ws, comma-separated or repeated; * allows any (default: the request's own host)")
	fs.IntVar(&cfg.MaxConnections, "max-connections", 0, "authenticated client connection limit (0: as many as the open-file limit allows)")
	fs.IntVar(&cfg.MaxPending, "max-pending", 0, "connections not yet authenticated, apart from --max-connections; past it the oldest is closed for the newcomer (0: a quarter of --max-connections, at least 16)")
	fs.IntVar(&cfg.MaxPendingPerIP, "max-pending-per-ip", cfg.MaxPendingPerIP, "connections not yet authenticated from one IPv4 address or IPv6 /64; past it: 429 (behind a proxy raise it to --max-pending; negative: no limit)")
	fs.IntVar(&cfg.AuthFailuresPerIP, "auth-failures-per-ip", cfg.AuthFailuresPerIP, "failed authentications (bad connect tokens, wrong admin RPC keys) one IPv4 address or IPv6 /64 may have per minute before its connections are answered 429 (negative: no limit)")
	fs.IntVar(&cfg.SendQueueBytes, "send-queue-bytes", cfg.SendQueueBytes, "bytes queued for one client before it is cut off as a slow consumer")
	fs.IntVar(&cfg.SendQueueFrames, "send-queue-frames", cfg.SendQueueFrames, "frames queued for one client before it is cut off as a slow consumer")
	fs.IntVar(&cfg.MaxFrameBytes, "max-frame-bytes", cfg.MaxFrameBytes, "largest frame a client may send; larger closes the connection")
	fs.IntVar(&cfg.MaxPayload, "max-payload", cfg.MaxPayload, "largest publish payload or state value in bytes")
	fs.IntVar(&cfg.MaxSubscriptions, "max-subscriptions", cfg.MaxSubscriptions, "queues one connection may join")
	fs.IntVar(&cfg.MaxInflight, "max-inflight", cfg.MaxInflight, "requests one connection may have awaiting a queue node")
	fs.DurationVar(&cfg.PingInterval, "ping-interval", cfg.PingInterval, "how often the gateway pings each client")
	fs.DurationVar(&cfg.ClientTimeout, "client-timeout", cfg.ClientTimeout, "close a client that sent nothing for this long")
	fs.DurationVar(&cfg.AuthTimeout, "auth-timeout", cfg.AuthTimeout, "close a connection that has not authenticated in this time")
	fs.DurationVar(&cfg.WriteTimeout, "write-timeout", cfg.WriteTimeout, "close a client whose socket takes no data for this long")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "fail a request the queue node has not answered in this time")
	fs.DurationVar(&cfg.LinkPingInterval, "link-ping-interval", cfg.LinkPingInterval, "how often the gateway pings each queue node")
	fs.DurationVar(&cfg.LinkTimeout, "link-timeout", cfg.LinkTimeout, "declare a queue node link dead after this long without a frame")
}

// nodeFlags binds the queue node's flags to cfg.
func nodeFlags(fs *flag.FlagSet, cfg *queuenode.Config) {
	fs.StringVar(&cfg.LinkAddr, "link-addr", cfg.LinkAddr, "TCP listen address for gateway links")
	fs.IntVar(&cfg.Limits.HistoryLen, "history-len", cfg.Limits.HistoryLen, "events kept per message mount for resume")
	fs.DurationVar(&cfg.Limits.HistoryAge, "history-age", cfg.Limits.HistoryAge, "how long events are kept for resume (0: by count and bytes only)")
	fs.IntVar(&cfg.Limits.HistoryBytes, "history-bytes", cfg.Limits.HistoryBytes, "bytes of events kept per message mount for resume (the oldest are evicted past it)")
	if fs.Lookup("max-payload") == nil { // imq dev shares the gateway's
		fs.IntVar(&cfg.Limits.MaxPayload, "max-payload", cfg.Limits.MaxPayload, "largest event payload in bytes")
	}
	fs.IntVar(&cfg.Limits.MaxMounts, "max-mounts", cfg.Limits.MaxMounts, "mounts per queue")
	fs.IntVar(&cfg.Limits.MaxStateKeys, "max-state-keys", cfg.Limits.MaxStateKeys, "keys per state mount")
	fs.IntVar(&cfg.Limits.MaxStateValue, "max-state-value", cfg.Limits.MaxStateValue, "largest state value in bytes")
	fs.IntVar(&cfg.Limits.MaxStateBytes, "max-state-bytes", cfg.Limits.MaxStateBytes, "keys and values of one state mount together, in bytes")
	fs.IntVar(&cfg.Limits.MaxSubscribers, "max-subscribers", cfg.Limits.MaxSubscribers, "sessions per queue")
	fs.IntVar(&cfg.Limits.MaxReplayBytes, "max-replay-bytes", cfg.Limits.MaxReplayBytes, "history replayed in one join, in bytes")
	fs.IntVar(&cfg.Limits.MaxJoinBytes, "max-join-bytes", cfg.Limits.MaxJoinBytes, "one join's reply (state snapshots and replay), in bytes")
	fs.IntVar(&cfg.MaxQueues, "max-queues", cfg.MaxQueues, "queues per node")
	fs.Int64Var(&cfg.MaxNodeBytes, "max-node-bytes", cfg.MaxNodeBytes, "memory budget of all queues' history and state, in bytes, at least 1 MiB (0: the default): past it the oldest history is evicted, then new queues and writes are refused (the heap may be about twice this)")
	fs.IntVar(&cfg.MaxQueueCreates, "max-queue-creates", cfg.MaxQueueCreates, "queues one user may create per minute (the admin RPC is exempt; 0: the default; negative: no limit)")
	fs.DurationVar(&cfg.IdleTTL, "idle-ttl", cfg.IdleTTL, "drop a queue with no subscribers and no traffic after this long")
	fs.IntVar(&cfg.LinkBuffer, "link-buffer", cfg.LinkBuffer, "bytes queued for one gateway before its link is closed")
	if fs.Lookup("link-timeout") == nil { // imq dev shares the gateway's
		fs.DurationVar(&cfg.LinkTimeout, "link-timeout", cfg.LinkTimeout, "close a gateway link after this long without a frame (gateways ping every few seconds)")
	}
}

// clusterNodeFlags binds what only a queue node among others needs to cfg:
// the bounds of live bucket hand-off (docs/handoff.md) and of the link
// handshakes other processes start. imq queuenode's only: imq dev's one
// node never hands off, and only local processes link to it.
func clusterNodeFlags(fs *flag.FlagSet, cfg *queuenode.Config) {
	fs.IntVar(&cfg.HandoffHoldBytes, "handoff-hold-bytes", 0, "bytes of requests held for one bucket this node is handing off, while frozen (then answered MOVED, the gateway sending them to the new owner, or run here if the hand-off fails); past it requests are answered UNAVAILABLE (retryable). At least 4 × --max-payload, at most --link-buffer (default: 16 MiB, raised to 4 × --max-payload, lowered to --link-buffer)")
	fs.DurationVar(&cfg.HandoffTimeout, "handoff-timeout", cfg.HandoffTimeout, "give up handing a bucket off (and keep it, trying again later) when the new owner has not taken it within this long; keep it below the boss's --move-timeout")
	fs.IntVar(&cfg.AdoptHoldBytes, "adopt-hold-bytes", 0, "bytes of events of a bucket handed to this node held for one gateway until it confirms the move; past it the gateway's subscriptions to the bucket end (its clients rejoin). At least 4 × --max-payload, at most --link-buffer (default: 8 MiB, raised to 4 × --max-payload, lowered to --link-buffer)")
	fs.DurationVar(&cfg.AdoptHoldTime, "adopt-hold-time", cfg.AdoptHoldTime, "how long events of a bucket handed to this node are held for a gateway that has not confirmed the move; past it the gateway's subscriptions to the bucket end (its clients rejoin)")
	fs.IntVar(&cfg.MaxLinkHandshakes, "max-link-handshakes", cfg.MaxLinkHandshakes, "link handshakes (gateways and queue nodes proving the cluster key) in progress at once on --link-addr; past it the oldest is closed to admit a new one")
	fs.IntVar(&cfg.MaxLinkHandshakesPerAddr, "max-link-handshakes-per-addr", cfg.MaxLinkHandshakesPerAddr, "link handshakes in progress at once from one IP address; past it a new connection from there is closed at once")
}

func runDev(args []string) error {
	fs := newFlagSet("dev", `Runs a boss, a queue node and a gateway in one process, in development mode:
clients may connect with ws://ADDR/ws?user=ID instead of a token. The three
form a cluster as separate processes would (gossip on free loopback ports,
keyed with a cluster key made for the run; the boss gives the node every
bucket). Clients use --addr (/ws, /rpc/v1/,
/healthz). Metrics of all three are at /metrics on the gateway's internal
listener, --internal-addr, beside its /varz; the queue node's /varz is on a
free loopback port (printed at start); the boss's API is at --boss-addr.`)
	gc, nc, bc := gateway.DefaultConfig(), queuenode.DefaultConfig(), boss.DefaultConfig()
	fs.StringVar(&bc.HTTPAddr, "boss-addr", bc.HTTPAddr, "HTTP listen address of the boss's API (/v1/nodes, /v1/table)")
	var operatorKey string
	fs.StringVar(&operatorKey, "operator-key", "", "the boss's operator key, for imq drain (not given: one is made for the run and printed)")
	var secret string
	var origins listFlag
	var lf commonFlags
	var rf rpcFlags
	var cf calloutFlags
	gc.MaxPendingPerIP = -1 // every local client, bots of imq loadtest included, comes from 127.0.0.1
	gc.ShutdownSpread = 0   // one gateway: no other takes its clients, so Ctrl-C says goodbye at once
	gatewayFlags(fs, &gc, &secret, &origins)
	fs.Lookup("allowed-origins").Usage = "Origin values allowed on /ws, comma-separated or repeated; * allows any (default: *, in development)"
	rf.register(fs, &gc)
	nodeFlags(fs, &nc)
	cf.register(fs, &nc)
	lf.register(fs)
	lf.registerReady(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	rf.apply(&gc)
	if err := cf.apply(&nc); err != nil {
		return err
	}
	log, stopProfiling, err := lf.setup()
	if err != nil {
		return err
	}
	defer stopProfiling()
	gc.Dev, gc.JWTSecret, gc.AllowedOrigins = true, []byte(secret), origins
	if len(origins) == 0 {
		gc.AllowedOrigins = []string{"*"} // browsers on any local page may connect in development
	}
	nc.NodeID = "dev-node"
	nc.Limits.MaxPayload, nc.LinkTimeout = gc.MaxPayload, gc.LinkTimeout
	bc.Member.BindAddr = "127.0.0.1:0"
	madeKey := operatorKey == ""
	if madeKey {
		operatorKey = launch.NewOperatorKey()
	}
	bc.OperatorKeys = [][]byte{[]byte(operatorKey)}
	d, err := launch.StartDev(launch.DevConfig{Gateway: gc, QueueNode: nc, Boss: &bc, Logger: log})
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	err = d.WaitReady(rctx)
	cancel()
	if err != nil {
		d.Shutdown(context.Background())
		return err
	}
	fmt.Printf("imq dev: development cluster running (version %s; no token needed)\n", versionString())
	fmt.Printf("  WebSocket:  %s?user=alice   (subprotocol imq.v1 or imq.v1.json)\n", d.URL())
	fmt.Printf("  Metrics:    http://%s/metrics   health: /healthz   state: /varz   (internal)\n", d.Gateway.InternalAddr())
	fmt.Printf("  Boss:       http://%s/v1/nodes   table: /v1/table\n", d.Boss.Addr())
	fmt.Printf("  Operator:   %s imq drain %s --boss http://%s\n", operatorKeyHint(operatorKey, madeKey), nc.NodeID, d.Boss.Addr())
	if n := len(gc.APIKeys); n > 0 {
		fmt.Printf("  Admin RPC:  POST http://%s/rpc/v1/<method>   (%d API key(s))\n", d.Gateway.Addr(), n)
	} else {
		fmt.Printf("  Admin RPC:  off: start with IMQ_API_KEY=SECRET (or --api-key-file FILE) to use POST http://%s/rpc/v1/<method>\n", d.Gateway.Addr())
	}
	for _, c := range nc.Callouts {
		fmt.Printf("  Call-outs:  %s → %s\n", c.Prefix, c.URL)
	}
	fmt.Printf("  Queue node: %s (link)   state: http://%s/varz\n", d.Node.LinkAddr(), d.Node.InternalAddr())
	remove, err := lf.writeReady(launch.Ready{Role: "dev", ID: "dev", Addrs: map[string]string{
		"http": d.Gateway.Addr(), "internal": d.Gateway.InternalAddr(), "link": d.Node.LinkAddr(), "boss": d.Boss.Addr(),
		"node_internal": d.Node.InternalAddr()}})
	if err != nil {
		d.Shutdown(context.Background())
		return err
	}
	defer remove()
	fmt.Println("Press Ctrl-C to stop.")
	ctx, stop := signalContext()
	defer stop()
	select {
	case <-ctx.Done():
	case err := <-d.Err():
		log.Error("service stopped", "err", err)
	}
	remove() // no longer serving
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	return d.Shutdown(sctx)
}

func runGateway(args []string) error {
	fs := newFlagSet("gateway", `Runs a gateway: it terminates client WebSockets at /ws, authenticates them
and routes their queue operations over links to the queue nodes that own the
queues, by the boss's bucket table. Give --join with the boss's gossip address
(a cluster), or --queuenode for one queue node without a boss (standalone).`)
	cfg := gateway.DefaultConfig()
	var secret string
	var origins, join listFlag
	var lf commonFlags
	mc := member.DefaultConfig()
	fs.StringVar(&cfg.QueueNode, "queuenode", "", "standalone: link address of the one queue node (no boss, no --join)")
	var rf rpcFlags
	rf.register(fs, &cfg)
	memberFlags(fs, &mc, "127.0.0.1:7948", &join)
	var kf clusterKeyFlags
	kf.register(fs)
	fs.StringVar(&cfg.BossURL, "boss-url", "", "cluster: fetch the bucket table from this URL (e.g. a load balancer in front of the boss) rather than the boss member's address")
	fs.StringVar(&cfg.GatewayID, "id", "", "gateway id (default: random per process)")
	fs.BoolVar(&cfg.Dev, "dev", false, "development mode: also accept ?user=ID without a token (never in production)")
	fs.DurationVar(&cfg.ShutdownSpread, "shutdown-spread", cfg.ShutdownSpread, fmt.Sprintf(
		"on SIGTERM or SIGINT the gateway turns not ready, stops accepting and tells its clients to reconnect (to another gateway) one after another over this window, so that they do not all come back at once; at most half of the %s shutdown; 0: all at once", shutdownTimeout))
	gatewayFlags(fs, &cfg, &secret, &origins)
	lf.register(fs)
	lf.registerReady(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	clusterKeys, err := kf.clusterKeys()
	if err != nil {
		return err
	}
	mc.Keys, cfg.ClusterKeys = clusterKeys, clusterKeys
	log, stopProfiling, err := lf.setup()
	if err != nil {
		return err
	}
	defer stopProfiling()
	kf.warn(log)
	cfg.JWTSecret, cfg.AllowedOrigins, cfg.Logger = []byte(secret), origins, log
	rf.apply(&cfg)
	switch {
	case len(join) > 0 && cfg.QueueNode != "":
		return errors.New("give --join (a cluster) or --queuenode (standalone), not both")
	case len(join) == 0 && cfg.QueueNode == "":
		return errors.New("give --join with the boss's gossip address (a cluster), or --queuenode with a queue node's link address (standalone)")
	case len(join) > 0:
		mc.Join, mc.Logger = join, log
		cfg.Member = &mc
	}
	cfg.Registry = prometheus.NewRegistry()
	obs.Register(cfg.Registry)
	gw, err := gateway.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	ready := launch.Ready{Role: "gateway", ID: gw.ID(), Addrs: map[string]string{
		"http": gw.Addr(), "internal": gw.InternalAddr(), "gossip": gw.GossipAddr()}}
	return serve(ctx, log, &lf, ready, gw.Run, gw.Shutdown)
}

func runQueueNode(args []string) error {
	fs := newFlagSet("queuenode", `Runs a queue node: it holds queues in RAM and serves gateways over links. With
--join it is a cluster member: the boss gives it buckets and it serves the
queues in them (moved or unknown ones are answered "moved"). Without --join it
is standalone and serves every queue.`)
	cfg := queuenode.DefaultConfig()
	var legacyHTTPAddr string
	var join listFlag
	var lf commonFlags
	mc := member.DefaultConfig()
	fs.StringVar(&cfg.NodeID, "id", "", "node id, unique and stable in the cluster (default: node-<link address>)")
	fs.StringVar(&cfg.InternalAddr, "internal-addr", "127.0.0.1:7101", "internal HTTP listen address for /metrics, /healthz, /varz and /v1/table; keep it off the public network (empty: none)")
	fs.StringVar(&legacyHTTPAddr, "http-addr", "", "deprecated: the old name of --internal-addr")
	var cf calloutFlags
	nodeFlags(fs, &cfg)
	clusterNodeFlags(fs, &cfg)
	cf.register(fs, &cfg)
	memberFlags(fs, &mc, "127.0.0.1:7947", &join)
	var kf clusterKeyFlags
	kf.register(fs)
	drainTimeout := fs.Duration("drain-timeout", defaultDrainTimeout, "on SIGTERM, first ask the boss to drain this node and wait up to this long for its buckets to move away, then stop (0: stop at once; SIGINT, or a second signal, stops at once)")
	startDrained := fs.Bool("start-drained", false, "keep the boss's drain of this node: do not ask to be undrained at start (by default a node that starts puts itself back in the bucket layout, as after a drain for a restart)")
	lf.register(fs)
	lf.registerReady(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *drainTimeout < 0 {
		return fmt.Errorf("--drain-timeout must not be negative, got %s", *drainTimeout)
	}
	if err := cf.apply(&cfg); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true }) // flags and IMQ_* variables given
	if set["http-addr"] {
		if set["internal-addr"] && legacyHTTPAddr != cfg.InternalAddr {
			return errors.New("give --internal-addr or its deprecated name --http-addr, not both")
		}
		cfg.InternalAddr = legacyHTTPAddr
	}
	clusterKeys, err := kf.clusterKeys()
	if err != nil {
		return err
	}
	mc.Keys, cfg.ClusterKeys = clusterKeys, clusterKeys
	log, stopProfiling, err := lf.setup()
	if err != nil {
		return err
	}
	defer stopProfiling()
	kf.warn(log)
	if set["http-addr"] {
		log.Warn("--http-addr (IMQ_HTTP_ADDR) is deprecated; use --internal-addr (IMQ_INTERNAL_ADDR)")
	}
	cfg.Logger = log
	cfg.Registry = prometheus.NewRegistry()
	obs.Register(cfg.Registry)
	if len(join) > 0 {
		mc.Join, mc.Logger = join, log
		cfg.Member = &mc
	}
	node, err := queuenode.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := queueNodeSignals(log, node, nodeStop{
		drain:   cfg.Member != nil && *drainTimeout > 0,
		timeout: *drainTimeout,
		undrain: cfg.Member != nil && !*startDrained,
		keyless: len(clusterKeys) == 0,
	})
	defer stop()
	ready := launch.Ready{Role: "queuenode", ID: node.NodeID(), Addrs: map[string]string{
		"link": node.LinkAddr(), "internal": node.InternalAddr(), "gossip": node.GossipAddr()}}
	return serve(ctx, log, &lf, ready, node.Run, node.Shutdown)
}

// operatorKeyHint is how a banner shows the operator key: a key made for
// the run is printed, for imq drain; one the user gave is not repeated.
func operatorKeyHint(key string, made bool) string {
	if made {
		return "IMQ_OPERATOR_KEY=" + key
	}
	return "IMQ_OPERATOR_KEY=(yours)"
}

// defaultDrainTimeout is imq queuenode's --drain-timeout: long enough for
// a node's buckets to move by hand-off at the boss's default pace.
const defaultDrainTimeout = 60 * time.Second

// nodeStop is how a queue node starts and stops in a cluster.
type nodeStop struct {
	drain   bool          // SIGTERM drains first (a cluster member, --drain-timeout > 0)
	timeout time.Duration // --drain-timeout
	undrain bool          // ask to be undrained at start (a cluster member, not --start-drained)
	keyless bool          // --insecure: the node cannot sign a drain or undrain
}

// queueNodeSignals returns the context whose end stops the queue node
// (serve), and what releases its goroutines. At start, when ns.undrain, it
// asks the boss to undrain the node in the background until the boss
// answers: a node drained for a restart comes back into the layout. The
// first SIGTERM cancels that and, when ns.drain, drains the node
// (queuenode.Server.Drain, within ns.timeout) before ending the context;
// SIGINT, or a second signal during the drain, ends it at once. Signals
// after that have their default effect: one more ends the process.
func queueNodeSignals(log *slog.Logger, node *queuenode.Server, ns nodeStop) (context.Context, func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	base, release := context.WithCancel(context.Background()) // ends at release
	ctx, cancel := context.WithCancel(base)                   // ends the node
	if ns.keyless && (ns.drain || ns.undrain) {
		log.Warn("no cluster key: this node cannot ask the boss to drain it at SIGTERM or undrain it at start; use imq drain and imq undrain with the operator key")
		ns.drain, ns.undrain = false, false
	}
	undrainCtx, stopUndrain := context.WithCancel(base)
	undrained := make(chan struct{})
	go func() { // ends when the boss answers, or at the first signal or release
		defer close(undrained)
		if !ns.undrain {
			return
		}
		if err := node.Undrain(undrainCtx); err != nil && undrainCtx.Err() == nil {
			log.Error("could not undrain this node; it may stay out of the bucket layout: run imq undrain", "node", node.NodeID(), "err", err)
		}
	}()
	go func() { // ends at the stop (signal or release)
		defer cancel()
		defer signal.Stop(sigs)
		var sig os.Signal
		select {
		case sig = <-sigs:
		case <-base.Done():
			stopUndrain()
			return
		}
		// An undrain landing after the drain would undo it.
		stopUndrain()
		<-undrained
		if sig != syscall.SIGTERM || !ns.drain {
			return
		}
		dctx, dcancel := context.WithTimeout(base, ns.timeout)
		defer dcancel()
		go func() { // ends with the drain
			select {
			case s := <-sigs:
				log.Warn("second signal: stopping without waiting for the drain", "signal", s.String())
				dcancel()
			case <-dctx.Done():
			}
		}()
		log.Info("SIGTERM: draining this node before stopping (a second signal stops at once)", "timeout", ns.timeout)
		start := time.Now()
		switch err := node.Drain(dctx); {
		case err == nil:
			log.Info("drained; stopping", "elapsed", time.Since(start).Round(time.Millisecond))
		case errors.Is(err, queuenode.ErrNoDrainTarget):
			log.Warn("not drained: no other queue node can take the buckets; stopping", "err", err)
		default:
			log.Warn("drain not finished; stopping anyway", "err", err, "elapsed", time.Since(start).Round(time.Millisecond))
		}
	}()
	return ctx, release
}

// serve runs a service until it stops on its own or ctx ends (a signal),
// then shuts it down within shutdownTimeout and returns what Run returned.
// Once Run is under way it writes --ready-file with ready's addresses
// (empty ones left out), removed once it stops serving: every listener is
// bound by New, so a connection made once the file exists is served.
func serve(ctx context.Context, log *slog.Logger, lf *commonFlags, ready launch.Ready, run, shutdown func(context.Context) error) error {
	errc := make(chan error, 1)
	// run does not see the signal: the shutdown below, bounded by
	// shutdownTimeout, is the one a signal starts (a service's Run would
	// start its own on ctx's end, with a timeout of its own).
	go func() { errc <- run(context.WithoutCancel(ctx)) }()
	maps.DeleteFunc(ready.Addrs, func(_, addr string) bool { return addr == "" })
	remove, err := lf.writeReady(ready)
	if err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		shutdown(sctx)
		<-errc
		return err
	}
	defer remove()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	remove() // no longer serving
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := shutdown(sctx); err != nil {
		return err
	}
	return <-errc
}
