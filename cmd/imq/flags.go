package main

import (
	"bytes"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/launch"
)

// newFlagSet returns a flag set for subcommand name whose usage lists every
// flag with its IMQ_* environment variable.
func newFlagSet(name, summary string) *flag.FlagSet {
	fs := flag.NewFlagSet("imq "+name, flag.ContinueOnError)
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage: imq %s [flags]\n\n%s\n", name, summary)
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n == 0 {
			return
		}
		fmt.Fprintf(out, "\nFlags (each also read from the environment variable shown):\n")
		fs.VisitAll(func(f *flag.Flag) {
			def := ""
			if showDefault(f) {
				def = fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(out, "  --%s  [%s]\n      %s%s\n", f.Name, envName(f.Name), f.Usage, def)
		})
	}
	return fs
}

// showDefault says whether --help appends "(default X)" to f's usage: not
// for an empty default or a boolean off by default (as the flag package),
// nor when the usage already says what the default is.
func showDefault(f *flag.Flag) bool {
	if f.DefValue == "" || f.DefValue == "[]" || strings.Contains(f.Usage, "(default") {
		return false
	}
	if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() && f.DefValue == "false" {
		return false
	}
	return true
}

func envName(flagName string) string {
	return "IMQ_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parse registers the --NAME-file twin of every secret flag in fs, parses
// args, then sets each flag not given on the command line from its
// environment variable, then checks and applies the secret flags.
func parse(fs *flag.FlagSet, args []string) error {
	secrets := registerSecretFiles(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return applyEnv(fs, secrets)
}

// parseArgs is parse for commands that take positional arguments (imq sub
// QUEUE): flags may come before, between or after them, and "--" ends the
// flags, so that a value starting with '-' can follow it. It returns the
// positional arguments.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	secrets := registerSecretFiles(fs)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		if len(rest) == 0 {
			break
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
	return pos, applyEnv(fs, secrets)
}

// applyEnv sets each flag not given on the command line from its
// environment variable, then checks and applies the secret flags.
func applyEnv(fs *flag.FlagSet, secrets []*secretValue) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for _, sv := range secrets {
		if set[sv.name] && set[sv.name+"-file"] {
			return fmt.Errorf("give --%s or --%s-file, not both", sv.name, sv.name)
		}
		if set[sv.name] || set[sv.name+"-file"] {
			// The command line wins over the environment for the pair.
			set[sv.name], set[sv.name+"-file"] = true, true
			continue
		}
		_, inEnv := os.LookupEnv(envName(sv.name))
		_, fileInEnv := os.LookupEnv(envName(sv.name + "-file"))
		if inEnv && fileInEnv {
			return fmt.Errorf("set %s or %s, not both", envName(sv.name), envName(sv.name+"-file"))
		}
	}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if sv, ok := f.Value.(*secretValue); ok { // checked, and named by its source, in apply
				sv.given = append(sv.given, secretInput{v, envName(f.Name), false})
				return
			}
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %v", envName(f.Name), v, e)
			}
		}
	})
	if err != nil {
		return err
	}
	for _, sv := range secrets {
		// The list variable adds to the flag's other sources, whichever.
		if _, ok := sv.inner.(listValue); !ok {
			continue
		}
		if v, ok := os.LookupEnv(listEnvName(sv.name)); ok {
			sv.given = append(sv.given, secretInput{v, listEnvName(sv.name), true})
		}
	}
	for _, sv := range secrets {
		if err := sv.apply(); err != nil {
			return err
		}
	}
	return nil
}

// secretNames are the flags that carry secrets, wherever they are
// registered: whether a --NAME-file holds one value or one per line, and
// the commands that have the flag when not the serving ones (imq --help
// lists them all from here). A secret given on the command line is visible
// to every user of the machine (ps, /proc/PID/cmdline), so each also reads
// from IMQ_NAME, --NAME-file and IMQ_NAME_FILE; and no error message
// repeats its value.
var secretNames = map[string]secretFlag{
	"jwt-secret":   {wholeFile, ""},
	"cluster-key":  {wholeFile, "imq boss, queuenode, gateway"}, // one key a line
	"gossip-key":   {wholeFile, "deprecated: --cluster-key"},
	"secret":       {wholeFile, "imq loadtest"}, // its token-minting secret
	"token":        {wholeFile, "imq sub, pub, state"},
	"api-key":      {linePerValue, ""},
	"operator-key": {wholeFile, "imq boss, dev, cluster, drain, undrain"},
}

type secretFlag struct {
	format secretFileFormat
	where  string // the commands having it, if not every serving one
}

// secretFlagList lists the secret flags for imq --help, one a line:
// "  --api-key\n ... --token (imq sub, pub, state)\n".
func secretFlagList() string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(secretNames)) {
		fmt.Fprintf(&b, "  --%s", name)
		if w := secretNames[name].where; w != "" {
			fmt.Fprintf(&b, " (%s)", w)
		}
		b.WriteString("\n")
	}
	return b.String()
}

type secretFileFormat int

// listValue is the value of a repeatable secret flag that also takes
// several values in one string, its list variable IMQ_NAMES (IMQ_API_KEYS
// for --api-key), which adds to whatever else gave the flag values. SetList
// alone knows how the list is separated.
type listValue interface {
	flag.Value
	SetList(list string) error
}

// listEnvName is the list variable of a secret flag whose value is a
// listValue: IMQ_API_KEYS for --api-key.
func listEnvName(flagName string) string { return envName(flagName) + "S" }

const (
	wholeFile    secretFileFormat = iota // the file is the value, less one trailing newline
	linePerValue                         // each non-blank line is a value (a repeatable flag)
)

// secretValue wraps a secret flag's own flag.Value. It records what it is
// given and passes it on after parsing (apply), so that a bad value is
// reported by where it came from, never by its text: the flag package
// would quote it.
type secretValue struct {
	name   string
	inner  flag.Value
	format secretFileFormat
	given  []secretInput
}

// secretInput is one value given to a secret flag, named by its source;
// list says it is a list variable's, for listValue.SetList.
type secretInput struct {
	value, source string
	list          bool
}

func (s *secretValue) String() string { return "" }

func (s *secretValue) Set(v string) error {
	s.given = append(s.given, secretInput{v, "--" + s.name, false})
	return nil
}

// apply passes each given value to the inner flag.Value. A value given
// explicitly but empty (--secret "$SECRET" with SECRET unset, IMQ_SECRET=)
// is an error, never the flag's "not set" meaning: for most secret flags
// that is a less safe mode (no authentication, gossip in the clear).
func (s *secretValue) apply() error {
	for _, in := range s.given {
		if strings.TrimSpace(in.value) == "" {
			return fmt.Errorf("%s is empty", in.source)
		}
		set := s.inner.Set
		if in.list {
			set = s.inner.(listValue).SetList
		}
		if err := set(in.value); err != nil {
			return fmt.Errorf("%s: %v", in.source, err)
		}
	}
	return nil
}

// secretFile is the --NAME-file twin of a secret flag.
type secretFile struct {
	secret *secretValue
	path   string
}

func (f *secretFile) String() string { return f.path }

func (f *secretFile) Set(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err // the flag package names the flag
	}
	v := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	source := fmt.Sprintf("--%s-file %s", f.secret.name, path)
	values := []string{v}
	if f.secret.format == linePerValue {
		values = values[:0]
		for l := range strings.Lines(v) {
			if l = strings.TrimSpace(l); l != "" {
				values = append(values, l)
			}
		}
	}
	if len(values) == 0 || values[0] == "" {
		return fmt.Errorf("%s is empty", path)
	}
	f.path = path
	for _, v := range values {
		f.secret.given = append(f.secret.given, secretInput{v, source, false})
	}
	return nil
}

// registerSecretFiles wraps every secret flag of fs and registers its
// --NAME-file twin, before parsing so that --help lists them.
func registerSecretFiles(fs *flag.FlagSet) []*secretValue {
	var out []*secretValue
	fs.VisitAll(func(f *flag.Flag) {
		sn, ok := secretNames[f.Name]
		if !ok || fs.Lookup(f.Name+"-file") != nil {
			return
		}
		format := sn.format
		sv := &secretValue{name: f.Name, inner: f.Value, format: format}
		f.Value = sv
		f.Usage += fmt.Sprintf(". Secret: prefer %s or --%s-file; a value on the command line is visible to other users in ps", envName(f.Name), f.Name)
		what := "the secret"
		if format == linePerValue {
			what = "one value per line"
		}
		fs.Var(&secretFile{secret: sv}, f.Name+"-file", fmt.Sprintf("file holding --%s: %s (a trailing newline is ignored)", f.Name, what))
		out = append(out, sv)
	})
	return out
}

// listFlag is a repeatable, comma-separable string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// repeatFlag is a repeatable string flag whose values may contain commas.
type repeatFlag []string

func (r *repeatFlag) String() string { return strings.Join(*r, " | ") }

func (r *repeatFlag) Set(v string) error {
	*r = append(*r, v)
	return nil
}

// failureFlag is --callout-failure: deny (false) or allow (true).
type failureFlag bool

func (f *failureFlag) String() string {
	if *f {
		return "allow"
	}
	return "deny"
}

func (f *failureFlag) Set(v string) error {
	switch v {
	case "deny":
		*f = false
	case "allow":
		*f = true
	default:
		return fmt.Errorf("want deny or allow, got %q", v)
	}
	return nil
}

// keyList is a list of cluster keys, each base64 of 16, 24 or 32 bytes,
// separated by commas or newlines (in a file, one a line). The order is
// kept: the first is the primary key.
type keyList [][]byte

func (k *keyList) String() string { return "" } // secrets: --help shows no default

func (k *keyList) Set(v string) error {
	n := 0
	for _, s := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' }) {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n++
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return fmt.Errorf("key %d: not base64: %v", n, err)
		}
		if l := len(b); l != 16 && l != 24 && l != 32 {
			return fmt.Errorf("key %d is %d bytes; want 16, 24 or 32", n, l)
		}
		*k = append(*k, b)
	}
	if n == 0 {
		return errors.New("holds no key")
	}
	return nil
}

// makeKeyHelp says how to make a cluster key.
const makeKeyHelp = "head -c 32 /dev/urandom | base64"

// clusterKeyFlags are how a boss, queue node or gateway proves it belongs
// to the cluster: --cluster-key, its deprecated name --gossip-key, and
// --insecure, the explicit choice to run without a key.
type clusterKeyFlags struct {
	keys, legacy keyList
	insecure     bool
}

func (kf *clusterKeyFlags) register(fs *flag.FlagSet) {
	fs.Var(&kf.keys, "cluster-key", "the cluster key, the same on every boss, queue node and gateway: base64 of 16, 24 or 32 random bytes (make one: "+makeKeyHelp+"). "+
		"It encrypts and authenticates gossip and authenticates links, so that only processes holding it join the cluster. "+
		"Several keys, separated by commas or newlines (in the file, one a line), rotate it: the first is used, every one is accepted. Required unless --insecure")
	fs.Var(&kf.legacy, "gossip-key", "deprecated: the old name of --cluster-key")
	fs.BoolVar(&kf.insecure, "insecure", false, "run without a cluster key: gossip in the clear and links unauthenticated, so anyone who reaches this process's ports can join the cluster, take its queues and read and publish any of them. For a trusted network only")
}

// clusterKeys returns the parsed key list, primary first, which gossip and
// links share: nil with --insecure. Without a key and without --insecure
// it refuses, saying how to make a key.
func (kf *clusterKeyFlags) clusterKeys() ([][]byte, error) {
	keys := kf.keys
	if len(kf.legacy) > 0 {
		if len(keys) > 0 && !slices.EqualFunc(keys, kf.legacy, bytes.Equal) {
			return nil, errors.New("give --cluster-key or its deprecated name --gossip-key, not both")
		}
		keys = kf.legacy
	}
	switch {
	case kf.insecure && len(keys) > 0:
		return nil, errors.New("give a cluster key or --insecure, not both")
	case kf.insecure:
		return nil, nil
	case len(keys) == 0:
		return nil, fmt.Errorf("no cluster key: set IMQ_CLUSTER_KEY or give --cluster-key-file FILE with the same key on every boss, queue node and gateway "+
			"(make one: %s), or give --insecure to run without one on a trusted network", makeKeyHelp)
	}
	return keys, nil
}

// warn logs what the operator must not miss: running without a key (once,
// at start, at WARN with every consequence) and a deprecated flag name.
func (kf *clusterKeyFlags) warn(log *slog.Logger) {
	if kf.insecure {
		log.Warn("INSECURE: running without a cluster key (--insecure): gossip is in the clear and links are unauthenticated; "+
			"anyone who can reach this process's gossip or link port can join the cluster, take queues and read and publish any of them. "+
			"Use only on a trusted network; set IMQ_CLUSTER_KEY ("+makeKeyHelp+") everywhere else", "insecure", true)
	}
	if len(kf.legacy) > 0 {
		log.Warn("--gossip-key (IMQ_GOSSIP_KEY) is deprecated; use --cluster-key (IMQ_CLUSTER_KEY)")
	}
}

// commonFlags are the flags of every serving command.
type commonFlags struct {
	level     string
	format    string
	pprofAddr string
	readyFile string
}

func (lf *commonFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&lf.level, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&lf.format, "log-format", "text", "log format: text or json")
	fs.StringVar(&lf.pprofAddr, "pprof-addr", "", "listen address for Go runtime profiles at /debug/pprof/ (operators only; empty: off)")
}

// registerReady adds --ready-file, for the commands that serve (not imq
// loadtest, which shares the other common flags).
func (lf *commonFlags) registerReady(fs *flag.FlagSet) {
	fs.StringVar(&lf.readyFile, "ready-file", "", `once serving, write this JSON file: {"role","id","pid","addrs":{kind: host:port}}, the addresses bound (ports given as 0 included); removed at exit (empty: none)`)
}

// writeReady writes --ready-file, if given, for the service r describes
// (PID filled in), and returns what removes it at exit.
func (lf *commonFlags) writeReady(r launch.Ready) (remove func(), err error) {
	if lf.readyFile == "" {
		return func() {}, nil
	}
	r.PID = os.Getpid()
	if err := launch.WriteReady(lf.readyFile, r); err != nil {
		return nil, fmt.Errorf("--ready-file: %w", err)
	}
	return func() { os.Remove(lf.readyFile) }, nil
}

// setup makes the logger and, if asked, serves the runtime profiles on
// their own listener until stop is called.
func (lf *commonFlags) setup() (log *slog.Logger, stop func(), err error) {
	if log, err = lf.logger(); err != nil {
		return nil, nil, err
	}
	if lf.pprofAddr == "" {
		return log, func() {}, nil
	}
	ln, err := net.Listen("tcp", lf.pprofAddr)
	if err != nil {
		return nil, nil, fmt.Errorf("--pprof-addr: %w", err)
	}
	mux := http.NewServeMux()
	obs.HandleProfiling(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	log.Info("serving profiles", "addr", ln.Addr().String())
	return log, func() { srv.Close() }, nil
}

func (lf *commonFlags) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(lf.level)); err != nil {
		return nil, fmt.Errorf("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch lf.format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json, got %q", lf.format)
}

// memberFlags binds the cluster membership flags to cfg; join, if not nil,
// receives --join.
func memberFlags(fs *flag.FlagSet, cfg *member.Config, defaultGossip string, join *listFlag) {
	cfg.BindAddr = defaultGossip
	fs.StringVar(&cfg.BindAddr, "gossip-addr", cfg.BindAddr, "memberlist gossip address, TCP and UDP (port 0: any free port)")
	if join != nil {
		fs.Var(join, "join", "gossip address of a cluster member to join through, usually the boss's; comma-separated or repeated")
	}
	fs.StringVar(&cfg.Cluster, "cluster-name", cfg.Cluster, "cluster name: members of differently named clusters ignore each other")
	fs.DurationVar(&cfg.ProbeInterval, "probe-interval", cfg.ProbeInterval, "how often each member probes another (failure detection)")
	fs.DurationVar(&cfg.ProbeTimeout, "probe-timeout", cfg.ProbeTimeout, "how long a probe waits for an answer before asking others to probe; shorter than --probe-interval (0: half of --probe-interval, at most 500ms)")
	fs.IntVar(&cfg.SuspicionMult, "suspicion-mult", cfg.SuspicionMult, "a suspected member has suspicion-mult × probe-interval (× log10 of the members, at least 1) to refute before it is declared dead")
}

// operatorKeys splits --operator-key into its keys: separated by commas or
// newlines (one a line in a file), blanks dropped. The boss accepts every
// one (rotation: add the new key, move operators to it, drop the old);
// imq drain and undrain present the first.
func operatorKeys(s string) [][]byte {
	var keys [][]byte
	for _, k := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' }) {
		if k = strings.TrimSpace(k); k != "" {
			keys = append(keys, []byte(k))
		}
	}
	return keys
}
