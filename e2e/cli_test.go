package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch/launchtest"
)

// cliProc is one run of a client command (imq sub, pub, state).
type cliProc struct {
	cmd      *exec.Cmd
	out, err testutil.SyncBuffer
	done     chan struct{}
}

// startCLI runs `imq args...` with stdin and captures its output; it is
// killed at the end of the test if still running.
func startCLI(t *testing.T, stdin string, args ...string) *cliProc {
	t.Helper()
	p := &cliProc{cmd: exec.Command(launchtest.Binary(t), args...), done: make(chan struct{})}
	p.cmd.Stdin = strings.NewReader(stdin)
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.err
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("imq %s: stderr: %s", strings.Join(args, " "), p.err.String())
		}
	})
	return p
}

// wait waits for the process to exit and returns its exit code.
func (p *cliProc) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("imq %s did not exit", strings.Join(p.cmd.Args[1:], " "))
	}
	return p.cmd.ProcessState.ExitCode()
}

// runCLI runs a client command to its end; it fails the test unless the
// command exits 0.
func runCLI(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	p := startCLI(t, stdin, args...)
	if code := p.wait(t); code != 0 {
		t.Fatalf("imq %s exited %d: %s", strings.Join(args, " "), code, p.err.String())
	}
	return p.out.String()
}

// TestCLISubAcrossGatewayKill: `imq sub`, a real process, follows a room
// while its gateway is SIGKILLed and restarted and events keep coming through
// another gateway from `imq pub -`; it prints each event once, in order, with
// no gap, and exits 0 on SIGINT (Ctrl-C).
func TestCLISubAcrossGatewayKill(t *testing.T) {
	cl := startCluster(t)
	pubURL := wsURL(cl.startGateway("gateway-2", nil))

	const room = "/room/cli"
	sub := startCLI(t, "", "sub", room, "--url", cl.url())
	testutil.WaitFor(t, 15*time.Second, "imq sub to join", func() bool { return strings.Contains(sub.err.String(), "joined "+room) })
	next := 0
	publish := func(n int) {
		var lines strings.Builder
		for range n {
			next++
			fmt.Fprintf(&lines, "{\"n\":%d}\n", next)
		}
		out := runCLI(t, lines.String(), "pub", room, "-", "--url", pubURL)
		if got := strings.Count(out, "\n"); got != n {
			t.Fatalf("imq pub - printed %d offsets for %d lines: %q", got, n, out)
		}
	}
	lines := func() []string { return strings.FieldsFunc(sub.out.String(), func(r rune) bool { return r == '\n' }) }

	publish(10)
	testutil.WaitFor(t, 15*time.Second, "the first events", func() bool { return len(lines()) >= 10 })
	cl.killGateway()
	testutil.WaitFor(t, 15*time.Second, "imq sub to lose its connection", func() bool { return strings.Contains(sub.err.String(), "connection lost") })
	publish(10) // while sub's gateway is dead
	cl.restartGateway()
	publish(10)
	testutil.WaitFor(t, 30*time.Second, "imq sub to catch up", func() bool { return len(lines()) >= next })
	testutil.WaitFor(t, 10*time.Second, "imq sub to report the reconnect", func() bool { return strings.Contains(sub.err.String(), "reconnected") })

	sub.cmd.Process.Signal(syscall.SIGINT)
	if code := sub.wait(t); code != 0 {
		t.Fatalf("imq sub exited %d after SIGINT, want 0", code)
	}
	var got []int
	for _, l := range lines() {
		var m struct {
			Kind   string
			Offset int
			Data   struct{ N int }
		}
		if err := json.Unmarshal([]byte(l), &m); err != nil || m.Kind != "event" {
			t.Fatalf("imq sub printed %q (%v), want only events", l, err)
		}
		if m.Offset != m.Data.N {
			t.Errorf("event %d printed at offset %d", m.Data.N, m.Offset)
		}
		got = append(got, m.Data.N)
	}
	want := make([]int, next)
	for i := range want {
		want[i] = i + 1
	}
	if !slices.Equal(got, want) {
		t.Fatalf("imq sub printed events %v,\nwant each of 1..%d once, in order", got, next)
	}
}

// TestCLIExitCodes: a client command's usage errors exit 1 with a message
// on stderr, --help exits 0 and describes the flags, and state set/get work
// as processes.
func TestCLIExitCodes(t *testing.T) {
	cl := startCluster(t)
	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"sub", "room/1"}, 1, "bad queue name"},
		{[]string{"pub", "/room/1"}, 1, "want QUEUE DATA"},
		{[]string{"state", "frob"}, 1, "want set, get or del"},
		{[]string{"pub", "/room/1", "x", "--url", "127.0.0.1:1", "--connect-timeout", "300ms"}, 1, "make run"},
		{[]string{"sub", "--help"}, 0, "--recent  [IMQ_RECENT]"},
		{[]string{"state", "set", "--help"}, 0, "--token-file  [IMQ_TOKEN_FILE]"},
		{[]string{"version", "--help"}, 0, "Usage: imq version"},
		{[]string{"version", "extra"}, 1, `unexpected argument "extra"`},
	} {
		p := startCLI(t, "", tc.args...)
		if code := p.wait(t); code != tc.code || !strings.Contains(p.err.String(), tc.stderr) {
			t.Errorf("imq %q exited %d with stderr %q; want %d and %q", tc.args, code, p.err.String(), tc.code, tc.stderr)
		}
	}
	runCLI(t, "", "state", "set", "/room/x", "alice", "3220", "--url", cl.url())
	if got := runCLI(t, "", "state", "get", "/room/x", "alice", "--url", cl.url()); got != `{"value":3220,"version":1}`+"\n" {
		t.Fatalf("state get printed %q", got)
	}
}
