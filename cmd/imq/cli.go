package main

// The client commands, imq sub, imq pub and imq state: trying IMQ from a
// shell without writing code, in the spirit of `nats sub` and `nats pub`.
// They are ordinary applications of the Go SDK (client/), so imq sub
// reconnects and resumes exactly as the SDK does.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/wire"
)

const (
	// defaultURL is where `imq dev` (make run) serves clients.
	defaultURL = "ws://127.0.0.1:8080/ws"
	// dialTimeout is --connect-timeout's default: how long the first
	// connect is retried. imq sub reconnects without limit afterwards.
	dialTimeout = 5 * time.Second
	// maxLine is the longest stdin line imq pub - reads (one publish); the
	// gateway's --max-payload (64 KiB by default) refuses less.
	maxLine = 1 << 20
	// getBuffer is how many keys imq state get reads at most: the updates
	// channel it joins with holds the whole snapshot (the server's
	// --max-state-keys is 1,024 by default).
	getBuffer = 16384
)

// stdio is where a client command reads and writes: the process's own in
// main, buffers in tests. err may be written from the client's goroutine.
type stdio struct {
	in       io.Reader
	out, err io.Writer
}

func osStdio() stdio { return stdio{in: os.Stdin, out: os.Stdout, err: os.Stderr} }

// clientFlagSet is newFlagSet for a client command: usage and errors go to
// std.err, and the connection flags are registered.
func clientFlagSet(std stdio, name, summary string) (*flag.FlagSet, *connFlags) {
	fs := newFlagSet(name, summary)
	fs.SetOutput(std.err)
	cf := new(connFlags)
	cf.register(fs)
	return fs, cf
}

// connFlags are how a client command reaches a gateway and who it is.
type connFlags struct {
	url, user, token string
	connectTimeout   time.Duration
}

func (cf *connFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&cf.url, "url", defaultURL, "gateway WebSocket URL (the default is `imq dev`, i.e. make run); host:port alone means ws://host:port/ws")
	fs.StringVar(&cf.user, "user", "", "user id, for a gateway in development mode (?user=ID); default cli-<random>")
	fs.StringVar(&cf.token, "token", "", "connect token (a JWT whose sub is the user id) for a gateway not in development mode")
	fs.DurationVar(&cf.connectTimeout, "connect-timeout", dialTimeout, "how long to keep trying the first connect, and a join the server refuses as retryable (UNAVAILABLE while a cluster starts)")
}

// dial connects within --connect-timeout (or ctx), explaining the usual
// failures.
func (cf *connFlags) dial(ctx context.Context, opts ...client.Option) (*client.Client, string, error) {
	u, err := normalizeURL(cf.url)
	if err != nil {
		return nil, "", err
	}
	token := cf.token // --token-file and IMQ_TOKEN(_FILE) land here too (flags.go)
	user := cf.user
	switch {
	case token != "" && user != "":
		return nil, "", errors.New("give --user (development mode) or a token, not both: a token names its user")
	case token != "":
		opts = append(opts, client.WithToken(token))
	default:
		if user == "" {
			user = randomUser()
		}
		if err := wire.ValidateUserID(user); err != nil { // the gateway's rule
			return nil, "", fmt.Errorf("--user: %w", err)
		}
		opts = append(opts, client.WithUser(user))
	}
	if cf.connectTimeout <= 0 {
		return nil, "", errors.New("--connect-timeout must be more than 0")
	}
	dctx, cancel := context.WithTimeout(ctx, cf.connectTimeout)
	defer cancel()
	c, err := client.Dial(dctx, u, opts...)
	if err == nil {
		return c, u, nil
	}
	if errors.Is(ctx.Err(), context.Canceled) { // Ctrl-C
		return nil, u, ctx.Err()
	}
	if e, ok := errors.AsType[*client.Error](err); ok {
		hint := ""
		if token == "" {
			hint = "\n  (a gateway not in development mode wants a token: --token-file, IMQ_TOKEN_FILE or IMQ_TOKEN)"
		}
		return nil, u, fmt.Errorf("%s refused the connection: %s: %s%s", u, e.Code, e.Message, hint)
	}
	why := trimImq(err)
	if op, ok := errors.AsType[*net.OpError](err); ok {
		why = op.Error() // "dial tcp ...: connection refused" says it all
	}
	return nil, u, fmt.Errorf("cannot connect to %s: %s\n  is a gateway running there? `make run` (imq dev) starts one at %s", u, why, defaultURL)
}

// join joins queue, retrying a refusal the server says may pass (a queue
// node not reachable yet, as while imq dev starts) for up to
// --connect-timeout.
func (cf *connFlags) join(ctx context.Context, c *client.Client, std stdio, queue string, mounts ...client.Mount) (*client.Subscription, error) {
	deadline := time.Now().Add(cf.connectTimeout)
	wait := 100 * time.Millisecond
	for {
		sub, err := c.Join(ctx, queue, mounts...)
		if err == nil || !client.IsRetryable(err) || time.Now().Add(wait).After(deadline) {
			return sub, err
		}
		fmt.Fprintf(std.err, "imq: join %s: %s; retrying\n", queue, trimImq(err))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		wait = min(2*wait, time.Second)
	}
}

// normalizeURL accepts what a person may type for the gateway:
// ws://host:port/ws, http://host:port, or host:port.
func normalizeURL(raw string) (string, error) {
	if !strings.Contains(raw, "://") {
		raw = "ws://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("--url %q: %v", raw, err)
	}
	switch u.Scheme {
	case "ws", "wss":
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	default:
		return "", fmt.Errorf("--url %q: want ws://HOST:PORT/ws", raw)
	}
	if u.Host == "" {
		return "", fmt.Errorf("--url %q: no host", raw)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/ws"
	}
	return u.String(), nil
}

func randomUser() string {
	b := make([]byte, 4)
	rand.Read(b)
	return "cli-" + hex.EncodeToString(b)
}

// explain turns a request's error into what a person needs to read: the
// server's code and message for a refusal.
func explain(what string, err error) error {
	if e, ok := errors.AsType[*client.Error](err); ok {
		return fmt.Errorf("%s refused: %s: %s", what, e.Code, e.Message)
	}
	return fmt.Errorf("%s: %s", what, trimImq(err))
}

// trimImq drops the SDK's "imq: " prefix, which main prints already.
func trimImq(err error) string {
	return strings.TrimPrefix(err.Error(), "imq: ")
}

// wantArgs checks the positional arguments' count against names.
func wantArgs(pos []string, names ...string) error {
	if len(pos) == len(names) {
		return nil
	}
	return fmt.Errorf("want %s, got %d argument(s) (see --help; a value starting with '-' goes after --)", strings.Join(names, " "), len(pos))
}

// isSet reports whether flag name was given, on the command line or in the
// environment.
func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func checkQueue(name string) error {
	if err := wire.ValidateQueueName(name); err != nil {
		return fmt.Errorf("bad queue name: %v (e.g. /room/1)", err)
	}
	return nil
}

func checkMount(name string) error {
	if err := wire.ValidateMountName(name); err != nil {
		return fmt.Errorf("bad mount name: %v", err)
	}
	return nil
}

// line is one update as imq sub prints it: one JSON object per line.
// A payload or value that is JSON appears as JSON (data, value), other
// UTF-8 text as a string (data_text, value_text), anything else as base64
// (data_base64, value_base64).
type line struct {
	Queue       string          `json:"queue"`
	Mount       string          `json:"mount,omitempty"`
	Kind        string          `json:"kind"` // event, state, gap, closed
	Offset      uint64          `json:"offset,omitempty"`
	Key         string          `json:"key,omitempty"`
	Version     uint64          `json:"version,omitempty"`
	Deleted     bool            `json:"deleted,omitempty"`
	Data        json.RawMessage `json:"data,omitempty"`
	DataText    *string         `json:"data_text,omitempty"`
	DataBase64  *string         `json:"data_base64,omitempty"`
	Value       json.RawMessage `json:"value,omitempty"`
	ValueText   *string         `json:"value_text,omitempty"`
	ValueBase64 *string         `json:"value_base64,omitempty"`
	Sender      string          `json:"sender,omitempty"`
	TimeMs      int64           `json:"time_ms,omitempty"`
	Reason      string          `json:"reason,omitempty"`
	Message     string          `json:"message,omitempty"`
}

// bytesForm returns b as JSON, as text, or as base64: exactly one is set.
func bytesForm(b []byte) (js json.RawMessage, text, b64 *string) {
	switch {
	case utf8.Valid(b) && json.Valid(b):
		return json.RawMessage(b), nil, nil
	case utf8.Valid(b):
		s := string(b)
		return nil, &s, nil
	}
	s := base64.StdEncoding.EncodeToString(b)
	return nil, nil, &s
}

func lineOf(u client.Update) line {
	l := line{Queue: u.Queue, Mount: u.Mount, Sender: u.Sender, Reason: reasonName(u), Message: u.Message}
	if !u.Time.IsZero() {
		l.TimeMs = u.Time.UnixMilli()
	}
	switch u.Kind {
	case client.KindEvent:
		l.Kind, l.Offset = "event", u.Offset
		l.Data, l.DataText, l.DataBase64 = bytesForm(u.Payload)
	case client.KindStateSet:
		l.Kind, l.Key, l.Version = "state", u.Key, u.Offset
		l.Value, l.ValueText, l.ValueBase64 = bytesForm(u.Payload)
	case client.KindStateDeleted:
		l.Kind, l.Key, l.Version, l.Deleted = "state", u.Key, u.Offset, true
	case client.KindGap:
		l.Kind = "gap"
	case client.KindClosed:
		l.Kind = "closed"
	default:
		l.Kind = strings.ToLower(u.Kind.String())
	}
	return l
}

func reasonName(u client.Update) string {
	if u.Reason == 0 {
		return ""
	}
	return u.Reason.String()
}

// newEncoder writes one compact JSON value per line, leaving <, > and &
// as they are.
func newEncoder(w io.Writer) *json.Encoder {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc
}

func runSub(ctx context.Context, args []string, std stdio) error {
	fs, cf := clientFlagSet(std, "sub QUEUE", `Joins QUEUE and prints each update as one JSON line on stdout, in the queue's
order: events ("kind":"event", with offset, sender, time_ms and data),
state changes ("kind":"state", with key, value, version, deleted), "gap" when
events were lost for good, and "closed" when the server ended the
subscription. A payload that is JSON is printed as JSON (data), other text as
a string (data_text), other bytes as base64 (data_base64). The connection is
kept and resumed like any SDK client's: after a reconnect nothing is printed
twice. Status goes to stderr. Ctrl-C exits 0.

  imq sub /room/1                           # the chat mount
  imq sub /room/1 --state scores --recent 20 # chat with 20 recent events, and scores
  imq sub /room/1 --count 1 --timeout 5s    # exit 1 if nothing comes in 5 s`)
	var mounts, states listFlag
	fs.Var(&mounts, "mount", "message mount to print, comma-separated or repeated; --mount '' for none (default chat)")
	fs.Var(&states, "state", "state mount to print: its snapshot, then each change; comma-separated or repeated")
	recent := fs.Uint("recent", 0, "first print up to this many recent events of each message mount (bounded by the server's history)")
	count := fs.Int("count", 0, "exit after printing this many lines (0: until Ctrl-C)")
	timeout := fs.Duration("timeout", 0, "exit after this long; with --count, exit 1 if fewer lines came (0: no limit)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "QUEUE"); err != nil {
		return err
	}
	queue := pos[0]
	if err := checkQueue(queue); err != nil {
		return err
	}
	if *count < 0 || *timeout < 0 || *recent > 1<<20 {
		return errors.New("--count and --timeout must be at least 0, --recent at most 1048576")
	}
	if !isSet(fs, "mount") {
		mounts = listFlag{"chat"}
	}
	if len(mounts) == 0 && len(states) == 0 {
		return errors.New("nothing to follow: give a --mount or a --state")
	}
	var ms []client.Mount
	for _, m := range mounts {
		ms = append(ms, client.Messages(m).WithRecent(uint32(*recent)))
	}
	for _, m := range states {
		ms = append(ms, client.State(m))
	}
	for _, m := range ms {
		if err := checkMount(m.Name); err != nil {
			return err
		}
	}

	interrupted := ctx
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	n := 0
	// done says how a run that ctx ended finishes: Ctrl-C and a plain
	// --timeout are success, a --count not reached in time is not.
	done := func() error {
		if interrupted.Err() == nil && *count > 0 && n < *count {
			return fmt.Errorf("--timeout %v: printed %d of %d lines", *timeout, n, *count)
		}
		return nil
	}
	var lost atomic.Bool // the connection was lost since the first connect
	c, u, err := cf.dial(ctx, client.WithOnStateChange(func(s client.ConnState) {
		switch {
		case s == client.Reconnecting:
			lost.Store(true)
			fmt.Fprintln(std.err, "imq sub: connection lost; reconnecting, then resuming")
		case s == client.Connected && lost.Load():
			fmt.Fprintln(std.err, "imq sub: reconnected")
		}
	}))
	if err != nil {
		if interrupted.Err() != nil {
			return nil
		}
		return err
	}
	defer c.Close()
	sub, err := cf.join(ctx, c, std, queue, ms...)
	if err != nil {
		if ctx.Err() != nil {
			return done()
		}
		return explain("join "+queue, err)
	}
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = m.Name
	}
	fmt.Fprintf(std.err, "imq sub: joined %s (%s) at %s as %s; Ctrl-C to stop\n", queue, strings.Join(names, ", "), u, c.User())
	enc := newEncoder(std.out)
	for {
		select {
		case <-ctx.Done():
			return done()
		case up, ok := <-sub.Updates():
			if !ok {
				if ctx.Err() != nil {
					return done()
				}
				return fmt.Errorf("subscription ended: %v", c.Err())
			}
			if err := enc.Encode(lineOf(up)); err != nil {
				return err
			}
			n++
			if up.Kind == client.KindClosed {
				return fmt.Errorf("the server ended the subscription: %s %s", up.Reason, up.Message)
			}
			if *count > 0 && n >= *count {
				return nil
			}
		}
	}
}

func runPub(ctx context.Context, args []string, std stdio) error {
	fs, cf := clientFlagSet(std, "pub QUEUE DATA", `Publishes DATA, as it is, to a message mount of QUEUE and prints the event's
offset. DATA - reads stdin instead: each non-empty line is one publish, and
each offset is printed on its own line.

  imq pub /room/1 '{"text":"gg"}'
  imq pub /room/1 hello --mount lobby
  tail -f game.log | imq pub /room/1 -`)
	mount := fs.String("mount", "chat", "message mount to publish to")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "QUEUE", "DATA"); err != nil {
		return err
	}
	queue, data := pos[0], pos[1]
	if err := checkQueue(queue); err != nil {
		return err
	}
	if err := checkMount(*mount); err != nil {
		return err
	}
	c, _, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	publish := func(payload []byte) error {
		off, err := c.Publish(ctx, queue, *mount, payload)
		if err != nil {
			return explain("publish to "+queue+" "+*mount, err)
		}
		_, err = fmt.Fprintln(std.out, off)
		return err
	}
	if data != "-" {
		return publish([]byte(data))
	}
	// stdin is read on a goroutine of its own so that Ctrl-C ends a stream
	// typed at a terminal at once; the goroutine ends at the end of stdin,
	// or when it has a line and nobody wants it.
	lines, readErr, stop := make(chan []byte), make(chan error, 1), make(chan struct{})
	defer close(stop)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(std.in)
		sc.Buffer(make([]byte, 0, 64<<10), maxLine)
		for sc.Scan() {
			select {
			case lines <- bytes.Clone(sc.Bytes()):
			case <-stop:
				return
			}
		}
		readErr <- sc.Err()
	}()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return nil // Ctrl-C ends a stream
		case b, ok := <-lines:
			switch {
			case !ok:
				if err := <-readErr; err != nil {
					return fmt.Errorf("stdin: %w (a line may be at most %d bytes)", err, maxLine)
				}
				return nil
			case len(b) == 0:
				continue
			}
			if err := publish(b); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("stdin line %d: %w", n, err)
			}
		}
	}
}

const stateUsage = `Usage: imq state set|get|del QUEUE ... [flags]

  imq state set QUEUE KEY VALUE   set KEY of a state mount to VALUE; prints the version
  imq state get QUEUE [KEY]       print the mount's state (or one key's) as JSON
  imq state del QUEUE KEY         delete KEY; prints the version

The mount is --mount (default scores). Run 'imq state set --help' for the
flags.
`

func runState(ctx context.Context, args []string, std stdio) error {
	if len(args) == 0 {
		fmt.Fprint(std.err, stateUsage)
		return errors.New("state: want set, get or del")
	}
	switch args[0] {
	case "set":
		return runStateSet(ctx, args[1:], std, false)
	case "del":
		return runStateSet(ctx, args[1:], std, true)
	case "get":
		return runStateGet(ctx, args[1:], std)
	case "help", "--help", "-h":
		fmt.Fprint(std.out, stateUsage)
		return nil
	}
	fmt.Fprint(std.err, stateUsage)
	return fmt.Errorf("state: unknown subcommand %q: want set, get or del", args[0])
}

func stateMountFlag(fs *flag.FlagSet) *string {
	return fs.String("mount", "scores", "state mount")
}

func checkKey(key string) error {
	if err := wire.ValidateStateKey(key); err != nil {
		return fmt.Errorf("bad state key: %v", err)
	}
	return nil
}

func runStateSet(ctx context.Context, args []string, std stdio, del bool) error {
	name, summary, want := "state set QUEUE KEY VALUE", `Sets KEY of a state mount of QUEUE to VALUE, as it is, and prints the change's
version (its offset in the queue). Everyone joined to the mount sees it.

  imq state set /room/1 alice 3220
  imq state set /room/1 alice '{"score":3220,"team":"red"}'`, []string{"QUEUE", "KEY", "VALUE"}
	if del {
		name, summary, want = "state del QUEUE KEY", `Deletes KEY of a state mount of QUEUE and prints the change's version.`, want[:2]
	}
	fs, cf := clientFlagSet(std, name, summary)
	mount := stateMountFlag(fs)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, want...); err != nil {
		return err
	}
	queue, key := pos[0], pos[1]
	if err := errors.Join(checkQueue(queue), checkMount(*mount), checkKey(key)); err != nil {
		return err
	}
	c, _, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	var version uint64
	if del {
		version, err = c.DeleteState(ctx, queue, *mount, key)
	} else {
		version, err = c.SetState(ctx, queue, *mount, key, []byte(pos[2]))
	}
	if err != nil {
		return explain(strings.Fields(name)[1]+" "+queue+" "+*mount+" "+key, err)
	}
	_, err = fmt.Fprintln(std.out, version)
	return err
}

// stateEntry is one key as imq state get prints it, as the admin RPC's
// get_state does.
type stateEntry struct {
	Value       json.RawMessage `json:"value,omitempty"`
	ValueText   *string         `json:"value_text,omitempty"`
	ValueBase64 *string         `json:"value_base64,omitempty"`
	Version     uint64          `json:"version,omitempty"`
}

func runStateGet(ctx context.Context, args []string, std stdio) error {
	fs, cf := clientFlagSet(std, "state get QUEUE [KEY]", `Joins a state mount of QUEUE, prints its state as one JSON object, and
leaves: {"queue":...,"mount":...,"state":{"alice":{"value":3220,"version":4}}}.
With KEY, prints that key's {"value":...,"version":...}, or fails if it is not
set. A value that is JSON is printed as JSON (value), other text as a string
(value_text), other bytes as base64 (value_base64).`)
	mount := stateMountFlag(fs)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		if err := wantArgs(pos, "QUEUE"); err != nil {
			return err
		}
	}
	queue := pos[0]
	if err := errors.Join(checkQueue(queue), checkMount(*mount)); err != nil {
		return err
	}
	if len(pos) == 2 {
		if err := checkKey(pos[1]); err != nil {
			return err
		}
	}
	c, _, err := cf.dial(ctx, client.WithBufferSize(getBuffer))
	if err != nil {
		return err
	}
	defer c.Close()
	sub, err := cf.join(ctx, c, std, queue, client.State(*mount))
	if err != nil {
		return explain("join "+queue+" "+*mount, err)
	}
	defer sub.Leave(ctx)
	// The snapshot is in the channel when Join returns (it is large enough),
	// perhaps followed by newer changes: apply them all in order.
	state := map[string]stateEntry{}
	read := 0
drain:
	for {
		select {
		case u, ok := <-sub.Updates():
			if !ok {
				return fmt.Errorf("subscription ended: %v", c.Err())
			}
			read++
			switch u.Kind {
			case client.KindStateSet:
				e := stateEntry{Version: u.Offset}
				e.Value, e.ValueText, e.ValueBase64 = bytesForm(u.Payload)
				state[u.Key] = e
			case client.KindStateDeleted:
				delete(state, u.Key)
			case client.KindClosed:
				return fmt.Errorf("the server ended the subscription: %s %s", u.Reason, u.Message)
			}
		default:
			break drain
		}
	}
	if read >= getBuffer {
		return fmt.Errorf("the state of %s %s has more than %d keys: more than imq state get shows", queue, *mount, getBuffer)
	}
	enc := newEncoder(std.out)
	if len(pos) == 2 {
		e, ok := state[pos[1]]
		if !ok {
			return fmt.Errorf("%s %s has no key %q", queue, *mount, pos[1])
		}
		return enc.Encode(e)
	}
	return enc.Encode(struct {
		Queue string                `json:"queue"`
		Mount string                `json:"mount"`
		State map[string]stateEntry `json:"state"`
	}{queue, *mount, state})
}

// runClientCommand runs imq sub, pub or state until it ends or Ctrl-C.
func runClientCommand(cmd string, args []string) error {
	ctx, stop := signalContext()
	defer stop()
	switch cmd {
	case "sub":
		return runSub(ctx, args, osStdio())
	case "pub":
		return runPub(ctx, args, osStdio())
	}
	return runState(ctx, args, osStdio())
}
