package e2e

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// imqBinary builds cmd/imq once per test run.
func imqBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "imq-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "imq")
		args := []string{"build", "-o", binPath}
		if raceEnabled { // the processes under test get the race detector too
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, "github.com/imq-dev/imq/cmd/imq")...).CombinedOutput()
		if err != nil {
			buildErr = &buildError{err: err, out: string(out)}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "build imq: " + e.err.Error() + "\n" + e.out }

// proc is one imq process whose JSON log lines the test can wait on.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	cond *sync.Cond
	done chan struct{}
}

// e2eClusterKey is the cluster key of the processes start runs, given in
// their environment as an operator would (never on a command line).
var e2eClusterKey = base64.StdEncoding.EncodeToString([]byte("e2e-cluster-key-0123456789abcdef"))

// start runs `imq args...` with JSON logs and the cluster key, and cleans
// it up after the test.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startEnv(t, name, append(os.Environ(), "IMQ_CLUSTER_KEY="+e2eClusterKey), args...)
}

// startEnv is start with the environment env.
func startEnv(t *testing.T, name string, env []string, args ...string) *proc {
	t.Helper()
	args = append(args, "--log-format", "json", "--log-level", "debug")
	cmd := exec.Command(imqBinary(t), args...)
	cmd.Env = env
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, cmd: cmd, done: make(chan struct{})}
	p.cond = sync.NewCond(&p.mu)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				m = map[string]any{"msg": sc.Text()}
			}
			p.mu.Lock()
			p.logs = append(p.logs, m)
			p.cond.Broadcast()
			p.mu.Unlock()
		}
		cmd.Wait()
		close(p.done)
		p.mu.Lock()
		p.cond.Broadcast()
		p.mu.Unlock()
	}()
	t.Cleanup(func() {
		p.kill(syscall.SIGKILL)
		p.mu.Lock()
		for _, l := range p.logs {
			if msg, _ := l["msg"].(string); strings.Contains(msg, "WARNING: DATA RACE") {
				t.Errorf("%s: the race detector reported a data race (log follows)", p.name)
				break
			}
		}
		p.mu.Unlock()
		if t.Failed() {
			p.dump()
		}
	})
	return p
}

// waitLog returns the first log line with message msg, waiting up to 10 s.
func (p *proc) waitLog(msg string) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	timer := time.AfterFunc(10*time.Second, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		for _, l := range p.logs {
			if l["msg"] == msg {
				return l
			}
		}
		select {
		case <-p.done:
			p.t.Fatalf("%s exited before logging %q", p.name, msg)
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s did not log %q within 10s", p.name, msg)
		}
		p.cond.Wait()
	}
}

func (p *proc) kill(sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) exitCode() int { return p.cmd.ProcessState.ExitCode() }

func (p *proc) dump() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.logs {
		b, _ := json.Marshal(l)
		p.t.Logf("%s: %s", p.name, b)
	}
}

// cluster is a queue node and a gateway as separate processes.
type cluster struct {
	t        *testing.T
	node     *proc
	gw       *proc
	linkAddr string
	gwAddr   string
	gwArgs   []string
}

const e2eSecret = "e2e-secret-0123456789abcdef"

func startCluster(t *testing.T, gwArgs ...string) *cluster {
	t.Helper()
	c := &cluster{t: t, gwArgs: gwArgs}
	c.node = start(t, "queuenode", "queuenode", "--link-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0")
	c.linkAddr = c.node.waitLog("queue node serving links")["addr"].(string)
	c.startGateway("127.0.0.1:0")
	return c
}

// startGateway starts (or restarts) the gateway on addr.
func (c *cluster) startGateway(addr string) {
	c.t.Helper()
	args := append([]string{"gateway", "--addr", addr, "--internal-addr", "127.0.0.1:0", "--queuenode", c.linkAddr, "--dev", "--jwt-secret", e2eSecret}, c.gwArgs...)
	c.gw = start(c.t, "gateway", args...)
	c.gwAddr = c.gw.waitLog("gateway serving")["addr"].(string)
	c.gw.waitLog("queue node link up")
}

func (c *cluster) url() string { return "ws://" + c.gwAddr + "/ws" }

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
