package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/imq-dev/imq/loadtest"
)

// percentFlag is a fraction given as "1%" or "0.01".
type percentFlag float64

func (p *percentFlag) String() string { return strconv.FormatFloat(float64(*p)*100, 'g', -1, 64) + "%" }

func (p *percentFlag) Set(v string) error {
	div := 1.0
	if s, ok := strings.CutSuffix(v, "%"); ok {
		v, div = s, 100
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return err
	}
	*p = percentFlag(f / div)
	return nil
}

func runLoadtest(args []string) error {
	if len(args) > 0 && args[0] == "--worker" { // hidden: started by a parent loadtest
		var lf commonFlags
		lf.level, lf.format = "warn", "text"
		log, err := lf.logger()
		if err != nil {
			return err
		}
		// A terminal's Ctrl-C reaches the whole process group: a worker
		// ignores it and stops when the parent closes its stdin, after
		// sending its results.
		signal.Ignore(os.Interrupt, syscall.SIGTERM)
		return loadtest.RunWorker(context.Background(), os.Stdin, os.Stdout, log)
	}
	fs := newFlagSet("loadtest", "Runs bots (real SDK clients) against a cluster: each joins its room, chats,\nupdates its key in the room's state, leaves and rejoins, and checks order,\nexactly-once delivery and state convergence. Refuses non-loopback targets\nwithout --allow-remote. Exits non-zero on abort, on protocol violations, when\nno bot could connect and when more bots failed to connect than --abort-errors\nallows (by default, any): it stops as soon as that is clear. After the load\nstops, bots keep receiving for up to --drain; what is still missing then is\nreported as in flight (late or lost), not as a violation. Example scenarios:\nexamples/loadtest/*.json.")
	cfg := loadtest.DefaultConfig()
	sc := &cfg.Scenario
	var (
		scenarioFile, jsonFile, htmlFile, secret string
		duration                                 = time.Duration(sc.Duration)
		abortErrors                              percentFlag
		lf                                       commonFlags
	)
	fs.StringVar(&cfg.URL, "url", cfg.URL, "gateway WebSocket URL; several, comma-separated, spread the bots over gateways")
	fs.StringVar(&scenarioFile, "scenario", "", "JSON scenario file (fields as the flags, with underscores, url included); flags given explicitly override it")
	fs.IntVar(&sc.Rooms, "rooms", sc.Rooms, "room queues")
	fs.IntVar(&sc.BotsPerRoom, "bots-per-room", sc.BotsPerRoom, "bots joined to each room")
	fs.Float64Var(&sc.ChatRate, "chat-rate", sc.ChatRate, "chat messages per second per bot (Poisson)")
	fs.Float64Var(&sc.StateRate, "state-rate", sc.StateRate, "state updates per second per bot (Poisson)")
	fs.Float64Var(&sc.ChurnRate, "churn-rate", sc.ChurnRate, "leave+rejoin cycles per bot per minute (Poisson)")
	fs.IntVar(&sc.MessageSize, "message-size", sc.MessageSize, "chat payload bytes (at least 8: the send timestamp)")
	fs.Float64Var(&sc.RampRate, "ramp-rate", sc.RampRate, "bots connecting per second (0: all at once)")
	fs.DurationVar(&duration, "duration", duration, "how long the load runs, ramp included")
	fs.StringVar(&sc.Namespace, "namespace", sc.Namespace, "queue-name prefix: rooms are <namespace>/room/<i>")
	fs.StringVar(&secret, "secret", "", "HS256 secret to mint each bot a token with exp (not given: development mode, ?user=ID; given empty: an error)")
	fs.StringVar(&cfg.Audience, "jwt-audience", "", "aud claim of the minted tokens, for a gateway that requires one (empty: no aud)")
	fs.DurationVar(&cfg.ConnectTimeout, "connect-timeout", cfg.ConnectTimeout, "time each bot has to connect (dial, handshake, retries) before it counts as a failed connect")
	fs.DurationVar(&cfg.Drain, "drain", cfg.Drain, "after the load, how long bots keep receiving (no more publishing) for their last update, and then for state to converge; each step ends early when all arrived")
	fs.BoolVar(&cfg.AllowRemote, "allow-remote", false, "allow a target that is not loopback")
	fs.IntVar(&cfg.Workers, "workers", cfg.Workers, "worker processes (rooms are split among them)")
	fs.IntVar(&cfg.SourceAddrs, "source-addrs", 0, "spread bots over source addresses 127.0.0.1..N for loopback targets, to stay under a gateway's --max-pending-per-ip and the ephemeral ports (0: enough that each carries at most 200 bots/s of ramp, 50 bots of a burst and 20,000 bots, up to 254)")
	fs.DurationVar(&cfg.AbortP99, "abort-p99", 0, "abort when publish→deliver p99 over the last 3 s exceeds this (0: never)")
	fs.Var(&abortErrors, "abort-errors", "abort when failed/requests over the last 3 s exceeds this, e.g. 1% (0: never), and fail the run when the whole run does (0: when more than half failed); also the share of bots that may fail to connect (0: none)")
	fs.DurationVar(&cfg.AbortGrace, "abort-grace", cfg.AbortGrace, "time after the start before abort thresholds apply")
	fs.IntVar(&cfg.TrackLimit, "track-limit", cfg.TrackLimit, "offsets each bot records for the exactly-once check, 8 bytes each (0: 32 Mi shared by all bots, 1,000 to 100,000 each)")
	fs.StringVar(&jsonFile, "json", "", "write the full report as JSON to this file")
	fs.StringVar(&htmlFile, "html", "", "write a self-contained HTML report to this file")
	lf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	log, stopProfiling, err := lf.setup()
	if err != nil {
		return err
	}
	defer stopProfiling()
	if scenarioFile != "" {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		f, err := os.Open(scenarioFile)
		if err != nil {
			return fmt.Errorf("--scenario: %w", err)
		}
		fromFile, err := loadtest.LoadScenario(f, loadtest.DefaultScenario())
		f.Close()
		if err != nil {
			return fmt.Errorf("--scenario %s: %w", scenarioFile, err)
		}
		// Flags given explicitly win over the file.
		flagged := *sc
		flagged.Duration = loadtest.Duration(duration)
		*sc = fromFile.Scenario
		if fromFile.URL != "" && !set["url"] {
			cfg.URL = fromFile.URL
		}
		overrides := map[string]func(){
			"rooms": func() { sc.Rooms = flagged.Rooms }, "bots-per-room": func() { sc.BotsPerRoom = flagged.BotsPerRoom },
			"chat-rate": func() { sc.ChatRate = flagged.ChatRate }, "state-rate": func() { sc.StateRate = flagged.StateRate },
			"churn-rate": func() { sc.ChurnRate = flagged.ChurnRate }, "message-size": func() { sc.MessageSize = flagged.MessageSize },
			"ramp-rate": func() { sc.RampRate = flagged.RampRate }, "duration": func() { sc.Duration = flagged.Duration },
			"namespace": func() { sc.Namespace = flagged.Namespace },
		}
		for name, apply := range overrides {
			if set[name] {
				apply()
			}
		}
	} else {
		sc.Duration = loadtest.Duration(duration)
	}
	cfg.Secret = []byte(secret)
	cfg.AbortErrors = float64(abortErrors)
	cfg.Logger = log
	cfg.Out = os.Stdout
	if fi, err := os.Stdout.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		cfg.Terminal = true
	}
	ctx, stop := signalContext()
	defer stop()
	r, err := loadtest.Run(ctx, cfg)
	if r == nil {
		return err
	}
	fmt.Println()
	r.WriteSummary(os.Stdout)
	for _, out := range []struct {
		path  string
		write func(*os.File) error
	}{
		{jsonFile, func(f *os.File) error { return r.WriteJSON(f) }},
		{htmlFile, func(f *os.File) error { return r.WriteHTML(f) }},
	} {
		if out.path == "" {
			continue
		}
		f, ferr := os.Create(out.path)
		if ferr == nil {
			ferr = errors.Join(out.write(f), f.Close())
		}
		if ferr != nil {
			err = errors.Join(err, ferr)
		}
	}
	return errors.Join(err, r.Err())
}
