package launch

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
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

// ReadyPath is the ready file the process writes once it serves (see
// Ready).
func (p *Process) ReadyPath() string { return p.readyPath }

// LogPath is the file holding every line the process logged.
func (p *Process) LogPath() string { return p.logPath }

// ProcessConfig describes one imq process started on its own by
// StartProcess, outside a Cluster: a standalone queue node and the gateways
// wired to it, or imq dev.
type ProcessConfig struct {
	// Binary is the imq executable. Default: this process's executable.
	Binary string
	// Args are the subcommand and its flags ("queuenode", "--link-addr",
	// "127.0.0.1:0"). The subcommand is the role the ready file must name.
	// StartProcess adds --log-format json and --ready-file.
	Args []string
	// Name names the process in errors and output, and its files in Dir
	// (<Name>.log, <Name>.ready). Default: the subcommand.
	Name string
	// Dir holds the log and the ready file. Default: a new temporary
	// directory.
	Dir string
	// Env is added to the process's environment (KEY=VALUE): secrets go
	// there, never on the command line, which every user can see.
	Env []string
	// Output, if set, receives every log line, prefixed by Name.
	Output io.Writer
}

// StartProcess starts one imq process and returns once it serves, with the
// addresses it wrote to its ready file (Process.Addr). The caller stops it
// (Process.Stop); on error nothing is left running.
func StartProcess(ctx context.Context, cfg ProcessConfig) (*Process, error) {
	if len(cfg.Args) == 0 {
		return nil, errors.New("launch: a process needs a subcommand")
	}
	if cfg.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("launch: find the imq binary: %w", err)
		}
		cfg.Binary = exe
	}
	if cfg.Name == "" {
		cfg.Name = cfg.Args[0]
	}
	if cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "imq-"+cfg.Name+"-")
		if err != nil {
			return nil, err
		}
		cfg.Dir = dir
	}
	p := &Process{
		Name: cfg.Name, Role: cfg.Args[0], binary: cfg.Binary,
		args:      slices.Clone(cfg.Args),
		env:       slices.Clone(cfg.Env),
		logPath:   filepath.Join(cfg.Dir, cfg.Name+".log"),
		readyPath: filepath.Join(cfg.Dir, cfg.Name+".ready"),
		out:       cfg.Output, outMu: new(sync.Mutex),
	}
	if err := p.run(ctx); err != nil {
		if p.started() {
			p.Stop(syscall.SIGKILL, 5*time.Second)
		}
		return nil, err
	}
	return p, nil
}

// readyTimeout bounds the wait for a started process's ready file.
const readyTimeout = 20 * time.Second

// addrFlags maps each address kind of a ready file to the flag that asks
// for it.
var addrFlags = map[string]string{
	"link": "--link-addr", "gossip": "--gossip-addr", "http": "--addr",
	"internal": "--internal-addr", "boss": "--boss-addr",
}

// run starts p and records its addresses, from its ready file. The first
// run asks for any free ports; after it, p's flags name the ports it got,
// so a restart comes back on the same addresses.
func (p *Process) run(ctx context.Context) error {
	if err := p.start(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	r, err := p.waitReady(ctx)
	if err != nil {
		return fmt.Errorf("%w (log: %s)", err, p.logPath)
	}
	if pid := p.PID(); r.PID != pid || r.Role != p.Role {
		return fmt.Errorf("%s: ready file %s is from %s pid %d, not %s pid %d", p.Name, p.readyPath, r.Role, r.PID, p.Role, pid)
	}
	for kind, flag := range addrFlags {
		if r.Addrs[kind] == "" {
			continue
		}
		if i := slices.Index(p.args, flag); i >= 0 && i+1 < len(p.args) {
			p.args[i+1] = r.Addrs[kind]
		}
	}
	p.setAddrs(r.Addrs)
	return nil
}

// Restart starts p again with the same flags and addresses, after it was
// stopped or killed, and returns once it serves.
func (p *Process) Restart(ctx context.Context) error {
	select {
	case <-p.Done():
	default:
		return fmt.Errorf("launch: %s is still running", p.Name)
	}
	return p.run(ctx)
}

// WaitHealthy waits until the process's /healthz answers 200 (a gateway:
// it routes by a table with a queue node link up), or ctx ends. It asks the
// internal listener, or a boss's API.
func (p *Process) WaitHealthy(ctx context.Context) error {
	addr := p.Addr("internal")
	if addr == "" {
		addr = p.Addr("http")
	}
	url := "http://" + addr + "/healthz"
	var last error
	for {
		if last = get(ctx, url); last == nil {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited (%s) before it was healthy: %w", p.Name, p.ExitStatus(), last)
		case <-ctx.Done():
			return fmt.Errorf("%s not healthy: %w", p.Name, last)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
