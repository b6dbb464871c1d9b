package launch

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is one imq process started by a Cluster. Its stderr is JSON logs:
// each line goes to its log file and to the cluster's output. Its addresses
// come from its ready file (--ready-file, see Ready).
type Process struct {
	Name string // "boss", "qn-1", "gw-2"
	Role string // "boss", "queuenode" or "gateway"

	args    []string
	env     []string // added to this process's environment
	unset   []string // variables (and their _FILE twins) it must not inherit
	binary  string
	logPath string
	// readyPath is the --ready-file the process writes once it serves.
	readyPath string
	out       io.Writer // may be nil
	outMu     *sync.Mutex

	mu    sync.Mutex
	cmd   *exec.Cmd
	done  chan struct{}
	addrs map[string]string // from the ready file; guarded by mu
	// startedAt is when the running incarnation started; guarded by mu.
	startedAt time.Time
}

// childEnv is the environment inherited, less what set overrides and the
// variables unset names, plus set. An inherited IMQ_X_FILE goes too when
// set has IMQ_X or unset names it: the child would refuse a secret given
// both ways.
func childEnv(inherited, set, unset []string) []string {
	drop := map[string]bool{}
	for _, kv := range set {
		k, _, _ := strings.Cut(kv, "=")
		drop[k], drop[k+"_FILE"] = true, true
	}
	for _, k := range unset {
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
	// A ready file left by an incarnation that was killed would pass for
	// this one's.
	if err := os.Remove(p.readyPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		f.Close()
		return err
	}
	args := append(slices.Clone(p.args), "--log-format", "json", "--ready-file", p.readyPath)
	cmd := exec.Command(p.binary, args...)
	cmd.Env = childEnv(cmd.Environ(), p.env, p.unset)
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
		}
		cmd.Wait()
		close(done)
	}()
	return nil
}

// Addr returns an address the process wrote to its ready file:
// "http" (the boss's API, a gateway's client port), "internal" (a gateway's
// or queue node's internal listener: /metrics, /varz, /v1/table), "link"
// (queue node) or "gossip".
func (p *Process) Addr(kind string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addrs[kind]
}

func (p *Process) setAddrs(addrs map[string]string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.addrs = addrs
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
