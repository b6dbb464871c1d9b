package launch

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// maxLogLines bounds the log lines a Process keeps for WaitLog; older ones
// are dropped (the log file keeps everything).
const maxLogLines = 20_000

// Process is one imq process started by a Cluster. Its stderr is JSON logs:
// each line goes to its log file and to the cluster's output, and is kept
// for WaitLog.
type Process struct {
	Name string // "boss", "qn-1", "gw-2"
	Role string // "boss", "queuenode" or "gateway"

	args    []string
	env     []string // added to this process's environment
	binary  string
	logPath string
	out     io.Writer // may be nil
	outMu   *sync.Mutex

	mu    sync.Mutex
	cmd   *exec.Cmd
	logs  []map[string]any // guarded by mu
	base  int              // index of logs[0] since start; guarded by mu
	cond  *sync.Cond
	done  chan struct{}
	addrs map[string]string // from the serving log lines; guarded by mu
	// startedAt is when the running incarnation started; guarded by mu.
	startedAt time.Time
}

// childEnv is the environment inherited, less what set overrides, plus
// set. An inherited IMQ_X_FILE goes too when set has IMQ_X: the child
// would refuse a secret given both ways.
func childEnv(inherited, set []string) []string {
	drop := map[string]bool{}
	for _, kv := range set {
		k, _, _ := strings.Cut(kv, "=")
		drop[k], drop[k+"_FILE"] = true, true
	}
	out := make([]string, 0, len(inherited)+len(set))
	for _, kv := range inherited {
		if k, _, _ := strings.Cut(kv, "="); !drop[k] {
			out = append(out, kv)
		}
	}
	return append(out, set...)
}

func (p *Process) start() error {
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	args := slices.Clone(p.args)
	for i := range args {
		// The launcher learns addresses from info lines: a quieter level
		// would hide them.
		if args[i] == "--log-level" && i+1 < len(args) && (args[i+1] == "warn" || args[i+1] == "error") {
			args[i+1] = "info"
		}
	}
	cmd := exec.Command(p.binary, append(args, "--log-format", "json")...)
	cmd.Env = childEnv(cmd.Environ(), p.env)
	cmd.Stdout = f
	stderr, err := cmd.StderrPipe()
	if err != nil {
		f.Close()
		return err
	}
	// Own process group: a Ctrl-C in the terminal reaches the launcher,
	// which stops the processes in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	p.mu.Lock()
	p.cmd, p.startedAt = cmd, time.Now()
	p.logs, p.base = nil, 0
	p.done = make(chan struct{})
	done := p.done
	p.mu.Unlock()
	go func() { // ends when the process closes stderr
		defer f.Close()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			f.Write(append(line, '\n'))
			if p.out != nil {
				p.outMu.Lock()
				fmt.Fprintf(p.out, "%-6s %s\n", p.Name, line)
				p.outMu.Unlock()
			}
			var m map[string]any
			if json.Unmarshal(line, &m) != nil {
				m = map[string]any{"msg": string(line)}
			}
			p.mu.Lock()
			if len(p.logs) == maxLogLines {
				p.logs = p.logs[1:]
				p.base++
			}
			p.logs = append(p.logs, m)
			p.cond.Broadcast()
			p.mu.Unlock()
		}
		cmd.Wait()
		p.mu.Lock()
		close(done)
		p.cond.Broadcast()
		p.mu.Unlock()
	}()
	return nil
}

// WaitLog returns the first line logged since the process (re)started whose
// message is msg, waiting until ctx ends or the process exits.
func (p *Process) WaitLog(ctx context.Context, msg string) (map[string]any, error) {
	return p.WaitLogFunc(ctx, msg, func(map[string]any) bool { return true })
}

// WaitLogFunc is WaitLog for the first line with message msg that match
// accepts.
func (p *Process) WaitLogFunc(ctx context.Context, msg string, match func(map[string]any) bool) (map[string]any, error) {
	stop := context.AfterFunc(ctx, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := 0
	for {
		for ; seen-p.base < len(p.logs); seen++ {
			if i := seen - p.base; i >= 0 {
				if l := p.logs[i]; l["msg"] == msg && match(l) {
					return l, nil
				}
			}
		}
		if seen < p.base {
			seen = p.base
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s exited before logging %q", p.Name, msg)
		default:
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s did not log %q: %w", p.Name, msg, ctx.Err())
		}
		p.cond.Wait()
	}
}

// Addr returns an address the process logged when it started serving:
// "http" (the boss's API, a gateway's client port), "internal" (a gateway's
// or queue node's internal listener: /metrics, /varz, /v1/table), "link"
// (queue node) or "gossip".
func (p *Process) Addr(kind string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addrs[kind]
}

func (p *Process) setAddr(kind, addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.addrs[kind] = addr
}

func (p *Process) started() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// PID returns the process id of the running incarnation.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// Done is closed when the running incarnation exits.
func (p *Process) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Signal sends sig to the running incarnation.
func (p *Process) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	return cmd.Process.Signal(sig)
}

// Stop sends sig and waits up to timeout for the exit, then kills.
func (p *Process) Stop(sig syscall.Signal, timeout time.Duration) {
	done := p.Done()
	select {
	case <-done:
		return
	default:
	}
	p.Signal(sig)
	select {
	case <-done:
	case <-time.After(timeout):
		p.Signal(syscall.SIGKILL)
		<-done
	}
}

// ExitCode returns the exit code of the last incarnation (-1 while running or
// when killed by a signal).
func (p *Process) ExitCode() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	default:
		return -1
	}
}

// ExitStatus describes how the last incarnation ended ("exit status 1",
// "signal: killed"), or "running".
func (p *Process) ExitStatus() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return p.cmd.ProcessState.String()
	default:
		return "running"
	}
}

// StartedAt returns when the running (or last) incarnation started.
func (p *Process) StartedAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.startedAt
}

// LogPath is the file holding every line the process logged.
func (p *Process) LogPath() string { return p.logPath }
