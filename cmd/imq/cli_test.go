package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch/launchtest"
	"github.com/imq-dev/imq/queuenode"
)

// lines splits what b holds into its non-empty lines.
func lines(b *testutil.SyncBuffer) []string {
	return strings.FieldsFunc(b.String(), func(r rune) bool { return r == '\n' })
}

// startDev runs a one-process cluster (standalone: no boss) and returns
// its URL.
func startDev(t *testing.T) string {
	t.Helper()
	return launchtest.StartDev(t, nil).URL()
}

// run runs a client command to its end and returns its stdout.
func run(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	var out, errOut testutil.SyncBuffer
	std := stdio{in: strings.NewReader(stdin), out: &out, err: &errOut}
	ctx := testutil.Context(t, 20*time.Second)
	var err error
	switch args[0] {
	case "sub":
		err = runSub(ctx, args[1:], std)
	case "pub":
		err = runPub(ctx, args[1:], std)
	case "state":
		err = runState(ctx, args[1:], std)
	default:
		t.Fatalf("no command %q", args[0])
	}
	return out.String(), err
}

func mustRun(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	out, err := run(t, stdin, args...)
	if err != nil {
		t.Fatalf("imq %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// bgSub is an imq sub running until the test stops it (Ctrl-C).
type bgSub struct {
	out, err testutil.SyncBuffer
	stop     context.CancelFunc
	done     chan error
}

func startSub(t *testing.T, args ...string) *bgSub {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &bgSub{stop: cancel, done: make(chan error, 1)}
	go func() { s.done <- runSub(ctx, args, stdio{in: strings.NewReader(""), out: &s.out, err: &s.err}) }()
	t.Cleanup(func() {
		cancel()
		<-s.done
	})
	testutil.WaitFor(t, 10*time.Second, "imq sub to join", func() bool {
		select {
		case err := <-s.done:
			s.done <- err // for the cleanup
			t.Fatalf("imq sub ended early: %v\n%s", err, s.err.String())
		default:
		}
		return strings.Contains(s.err.String(), "joined")
	})
	return s
}

// interrupt stops the sub as Ctrl-C does and returns what it returned.
func (s *bgSub) interrupt(t *testing.T) error {
	t.Helper()
	s.stop()
	select {
	case err := <-s.done:
		s.done <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("imq sub did not end after Ctrl-C")
		return nil
	}
}

func (s *bgSub) waitLines(t *testing.T, n int) []map[string]any {
	t.Helper()
	testutil.WaitFor(t, 15*time.Second, fmt.Sprintf("%d lines from imq sub", n), func() bool { return len(lines(&s.out)) >= n })
	var got []map[string]any
	for _, l := range lines(&s.out) {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("imq sub printed a line that is not JSON: %q: %v", l, err)
		}
		got = append(got, m)
	}
	return got
}

// TestSubPrintsWhatPubSends: what imq pub and imq state set send, imq sub
// prints as JSON lines, in order, with the payload as JSON, text or base64;
// Ctrl-C ends it with success.
func TestSubPrintsWhatPubSends(t *testing.T) {
	url := startDev(t)
	const q = "/room/cli"
	sub := startSub(t, q, "--url", url, "--state", "scores", "--user", "watcher")
	off := mustRun(t, "", "pub", q, `{"text":"gg <b>"}`, "--url", url, "--user", "alice")
	if off != "1\n" {
		t.Fatalf("pub printed %q, want the offset 1", off)
	}
	// Flags after the positional arguments, and stdin: one publish per
	// non-empty line, one offset printed per publish.
	if out := mustRun(t, "hello\n\n\x01\xff\n", "pub", "--url", url, q, "-", "--user", "bob"); out != "2\n3\n" {
		t.Fatalf("pub - printed %q, want offsets 2 and 3", out)
	}
	if v := mustRun(t, "", "state", "set", q, "alice", "3220", "--url", url); v != "4\n" {
		t.Fatalf("state set printed %q, want the version 4", v)
	}
	mustRun(t, "", "state", "del", q, "alice", "--url", url)

	got := sub.waitLines(t, 5)
	want := []string{
		`{"data":{"text":"gg <b>"},"kind":"event","mount":"chat","offset":1,"queue":"/room/cli","sender":"alice"}`,
		`{"data_text":"hello","kind":"event","mount":"chat","offset":2,"queue":"/room/cli","sender":"bob"}`,
		`{"data_base64":"Af8=","kind":"event","mount":"chat","offset":3,"queue":"/room/cli","sender":"bob"}`,
		`{"key":"alice","kind":"state","mount":"scores","queue":"/room/cli","value":3220,"version":4}`,
		`{"deleted":true,"key":"alice","kind":"state","mount":"scores","queue":"/room/cli","version":5}`,
	}
	for i, m := range got {
		if ms, ok := m["time_ms"].(float64); !ok || ms < float64(time.Now().Add(-time.Minute).UnixMilli()) {
			t.Errorf("line %d: time_ms %v, want the publish time", i, m["time_ms"])
		}
		delete(m, "time_ms")
		if m["kind"] == "state" {
			delete(m, "sender") // a random cli-... user
		}
		var buf bytes.Buffer
		newEncoder(&buf).Encode(m)
		b := bytes.TrimSpace(buf.Bytes())
		if i >= len(want) || string(b) != want[i] {
			t.Errorf("line %d: %s", i, b)
			if i < len(want) {
				t.Errorf("   want: %s", want[i])
			}
		}
	}
	if !strings.Contains(sub.out.String(), `"gg <b>"`) {
		t.Errorf("HTML characters escaped in %q", sub.out.String())
	}
	if err := sub.interrupt(t); err != nil {
		t.Fatalf("imq sub after Ctrl-C: %v, want success", err)
	}
}

// TestSubRecentCountTimeout: --recent replays history first, --count ends
// the command, and --timeout with --count fails when too little came.
func TestSubRecentCountTimeout(t *testing.T) {
	url := startDev(t)
	const q = "/room/recent"
	for i := range 3 {
		mustRun(t, "", "pub", q, fmt.Sprint(i), "--url", url)
	}
	out := mustRun(t, "", "sub", q, "--url", url, "--recent", "2", "--count", "2")
	var offsets []float64
	for l := range strings.Lines(out) {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatal(err)
		}
		offsets = append(offsets, m["offset"].(float64))
	}
	if !slices.Equal(offsets, []float64{2, 3}) {
		t.Fatalf("--recent 2 --count 2 printed offsets %v, want [2 3]:\n%s", offsets, out)
	}
	start := time.Now()
	_, err := run(t, "", "sub", q, "--url", url, "--count", "1", "--timeout", "300ms")
	if err == nil || !strings.Contains(err.Error(), "printed 0 of 1") {
		t.Fatalf("--count 1 --timeout 300ms on a quiet queue: %v, want an error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("--timeout 300ms took %v", d)
	}
	if _, err := run(t, "", "sub", q, "--url", url, "--timeout", "100ms"); err != nil {
		t.Fatalf("--timeout without --count: %v, want success", err)
	}
}

// TestStateSetGetDel: the round trip through a state mount.
func TestStateSetGetDel(t *testing.T) {
	url := startDev(t)
	const q = "/room/state"
	mustRun(t, "", "state", "set", q, "alice", "3220", "--url", url)
	mustRun(t, "", "state", "set", "--url", url, q, "bob", "--", "-12 points")
	mustRun(t, "", "state", "set", q, "carol", `{"team":"red"}`, "--url", url, "--mount", "seats")
	got := mustRun(t, "", "state", "get", q, "--url", url)
	want := `{"queue":"/room/state","mount":"scores","state":{"alice":{"value":3220,"version":1},"bob":{"value_text":"-12 points","version":2}}}` + "\n"
	if got != want {
		t.Fatalf("state get printed\n%s want\n%s", got, want)
	}
	if got := mustRun(t, "", "state", "get", q, "carol", "--mount", "seats", "--url", url); got != `{"value":{"team":"red"},"version":3}`+"\n" {
		t.Fatalf("state get carol printed %s", got)
	}
	if v := mustRun(t, "", "state", "del", q, "alice", "--url", url); v != "4\n" {
		t.Fatalf("state del printed %q, want the version 4", v)
	}
	if _, err := run(t, "", "state", "get", q, "alice", "--url", url); err == nil || !strings.Contains(err.Error(), `no key "alice"`) {
		t.Fatalf("state get of a deleted key: %v, want an error", err)
	}
}

// TestClientCommandErrors: bad arguments, a refusal and an absent server
// each give an error that says what to do.
func TestClientCommandErrors(t *testing.T) {
	url := startDev(t)
	mustRun(t, "", "state", "set", "/room/err", "alice", "1", "--url", url)
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("secret-token-value\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"sub"}, "want QUEUE, got 0"},
		{[]string{"sub", "/a", "/b"}, "want QUEUE, got 2"},
		{[]string{"sub", "room/1"}, "bad queue name"},
		{[]string{"sub", "/room/1", "--mount", "a b"}, "bad mount name"},
		{[]string{"sub", "/room/1", "--mount", ""}, "nothing to follow"},
		{[]string{"sub", "/room/1", "--count", "-1"}, "at least 0"},
		{[]string{"sub", "/room/1", "--bogus"}, "flag provided but not defined"},
		{[]string{"pub", "/room/1"}, "want QUEUE DATA, got 1"},
		{[]string{"pub", "/room/1", "-5"}, "flag provided but not defined: -5"},
		{[]string{"state"}, "want set, get or del"},
		{[]string{"state", "put", "/room/1"}, `unknown subcommand "put"`},
		{[]string{"state", "set", "/room/1", "alice"}, "want QUEUE KEY VALUE, got 2"},
		{[]string{"state", "set", "/room/1", "a\x01", "1"}, "bad state key"},
		{[]string{"state", "get", "/room/1", "a", "b"}, "want QUEUE, got 3"},
		{[]string{"pub", "/room/1", "x", "--url", "ftp://h"}, "want ws://HOST:PORT/ws"},
		{[]string{"pub", "/room/1", "x", "--url", url, "--token", "t", "--token-file", tokenFile}, "not both"},
		{[]string{"pub", "/room/1", "x", "--url", url, "--user", "u", "--token-file", tokenFile}, "not both"},
		{[]string{"pub", "/room/1", "x", "--url", url, "--user", "a/b"}, `--user: user id "a/b": character '/' is not allowed`},
		{[]string{"pub", "/room/1", "x", "--url", url, "--user", ".."}, `--user: user id ".." is not a valid queue segment`},
		{[]string{"pub", "/room/1", "x", "--url", url, "--token", ""}, "--token is empty"},
		// The server's refusals, with their code.
		{[]string{"pub", "/room/err", "x", "--url", url, "--mount", "scores"}, "publish to /room/err scores refused: WRONG_MOUNT_TYPE"},
		{[]string{"sub", "/room/err", "--url", url, "--mount", "scores"}, "join /room/err refused: WRONG_MOUNT_TYPE"},
		{[]string{"pub", "/room/1", "x", "--url", url, "--token-file", tokenFile}, "refused the connection: UNAUTHORIZED"},
		// Nothing listening: a hint to start the development cluster.
		{[]string{"pub", "/room/1", "x", "--url", "127.0.0.1:1", "--connect-timeout", "200ms"}, "cannot connect to ws://127.0.0.1:1/ws"},
	} {
		_, err := run(t, "", tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("imq %q: %v, want an error with %q", tc.args, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "secret-token-value") {
			t.Errorf("imq %q: the error shows the token: %v", tc.args, err)
		}
	}
	_, err := run(t, "", "pub", "/room/1", "x", "--url", "127.0.0.1:1", "--connect-timeout", "200ms")
	if !strings.Contains(err.Error(), "make run") {
		t.Errorf("cannot connect: %v, want a hint to run make run", err)
	}
	if _, err := run(t, "", "sub", "--help"); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("sub --help: %v, want flag.ErrHelp (exit 0)", err)
	}
}

// TestSubResumesAcrossGatewayRestart: the gateway that imq sub is connected
// to stops while events keep coming through another; sub reconnects to the
// restarted gateway and prints every event once, in order, with no gap.
func TestSubResumesAcrossGatewayRestart(t *testing.T) {
	nc := queuenode.DefaultConfig()
	nc.LinkAddr = "127.0.0.1:0"
	node, err := queuenode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	go node.Run(context.Background())
	t.Cleanup(func() { node.Shutdown(testutil.Context(t, 10*time.Second)) })
	startGateway := func(addr string) *gateway.Server {
		t.Helper()
		gc := gateway.DefaultConfig()
		gc.Addr, gc.InternalAddr, gc.Dev, gc.QueueNode = addr, "127.0.0.1:0", true, node.LinkAddr()
		gw, err := gateway.New(gc)
		if err != nil {
			t.Fatal(err)
		}
		go gw.Run(context.Background())
		t.Cleanup(func() { gw.Shutdown(testutil.Context(t, 10*time.Second)) })
		testutil.WaitFor(t, 10*time.Second, "the gateway's link to the node", func() bool {
			resp, err := http.Get("http://" + gw.Addr() + "/healthz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		})
		return gw
	}
	gw := startGateway("127.0.0.1:0")
	pubURL := "ws://" + startGateway("127.0.0.1:0").Addr() + "/ws"
	addr := gw.Addr()
	const q = "/room/resume"
	sub := startSub(t, q, "--url", addr)
	publish := func(n int) {
		for range n {
			mustRun(t, "", "pub", q, "x", "--url", pubURL)
		}
	}
	publish(5)
	sub.waitLines(t, 5)
	if err := gw.Shutdown(testutil.Context(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "imq sub to see the connection lost", func() bool {
		return strings.Contains(sub.err.String(), "connection lost")
	})
	publish(5) // while sub's gateway is down
	startGateway(addr)
	publish(5)
	sub.waitLines(t, 15)
	testutil.WaitFor(t, 10*time.Second, "imq sub to say it reconnected", func() bool {
		return strings.Contains(sub.err.String(), "reconnected")
	})
	if err := sub.interrupt(t); err != nil {
		t.Fatal(err)
	}
	got := sub.waitLines(t, 15) // anything extra printed before Ctrl-C shows now
	var offsets []float64
	for _, m := range got {
		if m["kind"] != "event" {
			t.Fatalf("unexpected line %v", m)
		}
		offsets = append(offsets, m["offset"].(float64))
	}
	want := make([]float64, 15)
	for i := range want {
		want[i] = float64(i + 1)
	}
	if !slices.Equal(offsets, want) {
		t.Fatalf("imq sub printed offsets %v, want each of 1..15 once, in order", offsets)
	}
}

// TestParseArgs: flags around positional arguments, "--", and the
// environment.
func TestParseArgs(t *testing.T) {
	t.Setenv("IMQ_MOUNT", "lobby")
	for _, tc := range []struct {
		args      []string
		pos       []string
		url, mnt  string
		wantError bool
	}{
		{args: []string{"/q", "data"}, pos: []string{"/q", "data"}, url: defaultURL, mnt: "lobby"},
		{args: []string{"--url", "u", "/q", "--mount", "m", "d"}, pos: []string{"/q", "d"}, url: "u", mnt: "m"},
		{args: []string{"/q", "--", "-5", "--url"}, pos: []string{"/q", "-5", "--url"}, url: defaultURL, mnt: "lobby"},
		{args: []string{"/q", "-"}, pos: []string{"/q", "-"}, url: defaultURL, mnt: "lobby"},
		{args: []string{"/q", "-5"}, wantError: true},
	} {
		fs := newFlagSet("t", "")
		fs.SetOutput(new(bytes.Buffer))
		url := fs.String("url", defaultURL, "")
		mnt := fs.String("mount", "chat", "")
		pos, err := parseArgs(fs, tc.args)
		if tc.wantError {
			if err == nil {
				t.Errorf("%q: no error", tc.args)
			}
			continue
		}
		if err != nil || !slices.Equal(pos, tc.pos) || *url != tc.url || *mnt != tc.mnt {
			t.Errorf("%q: %q url %q mount %q, %v; want %q %q %q", tc.args, pos, *url, *mnt, err, tc.pos, tc.url, tc.mnt)
		}
	}
}

// TestPubStdinCtrlC: imq pub - publishes each line as it comes, and Ctrl-C
// ends it with success at once, though stdin (a terminal, say) stays open.
func TestPubStdinCtrlC(t *testing.T) {
	url := startDev(t)
	stdin, typing := io.Pipe()
	t.Cleanup(func() { typing.Close() })
	var out, errOut testutil.SyncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runPub(ctx, []string{"/room/typed", "-", "--url", url}, stdio{in: stdin, out: &out, err: &errOut})
	}()
	for i := 1; i <= 2; i++ {
		if _, err := io.WriteString(typing, "line\n"); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, 10*time.Second, "the line's offset", func() bool { return out.String() == offsets(i) })
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("imq pub - after Ctrl-C: %v, want success", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("imq pub - did not end on Ctrl-C while stdin was open")
	}
}

// offsets returns "1\n2\n...n\n".
func offsets(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		fmt.Fprintln(&b, i)
	}
	return b.String()
}

// TestSubRetriesUnavailableJoin: imq sub started while the gateway cannot
// reach the queue node yet (as while imq dev starts) retries the join the
// server refused as retryable, and then follows the queue.
func TestSubRetriesUnavailableJoin(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	linkAddr := ln.Addr().String()
	ln.Close() // the node comes up there later
	gc := gateway.DefaultConfig()
	gc.Addr, gc.InternalAddr, gc.Dev, gc.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, linkAddr
	gw, err := gateway.New(gc)
	if err != nil {
		t.Fatal(err)
	}
	go gw.Run(context.Background())
	t.Cleanup(func() { gw.Shutdown(testutil.Context(t, 10*time.Second)) })

	var out, errOut testutil.SyncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runSub(ctx, []string{"/room/early", "--url", gw.Addr(), "--connect-timeout", "30s"}, stdio{out: &out, err: &errOut})
	}()
	t.Cleanup(func() { cancel(); <-done })
	testutil.WaitFor(t, 10*time.Second, "imq sub to retry the join", func() bool { return strings.Contains(errOut.String(), "UNAVAILABLE") })

	nc := queuenode.DefaultConfig()
	nc.LinkAddr = linkAddr
	node, err := queuenode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	go node.Run(context.Background())
	t.Cleanup(func() { node.Shutdown(testutil.Context(t, 10*time.Second)) })
	testutil.WaitFor(t, 30*time.Second, "imq sub to join", func() bool { return strings.Contains(errOut.String(), "joined /room/early") })
	mustRun(t, "", "pub", "/room/early", "hi", "--url", gw.Addr())
	testutil.WaitFor(t, 10*time.Second, "the event", func() bool { return strings.Contains(out.String(), `"data_text":"hi"`) })
}
