package launch

import (
	"context"
	"sync"
	"syscall"
	"time"
)

// SuperviseConfig says how Supervise restarts the processes of a cluster.
// A zero field takes the default given.
type SuperviseConfig struct {
	// MinBackoff is the wait before restarting a process that exited.
	// Default 500 ms.
	MinBackoff time.Duration
	// MaxBackoff caps the wait, which doubles at each exit that comes less
	// than ResetAfter after the process started. Default 30 s.
	MaxBackoff time.Duration
	// ResetAfter is how long a process must have run for its next exit to
	// wait MinBackoff again. Default 30 s.
	ResetAfter time.Duration
	// Logf receives one line per exit and per restart, such as "qn-2
	// exited (signal: killed); restarting in 500ms". Default: discard.
	Logf func(format string, args ...any)
}

func (s *SuperviseConfig) setDefaults() {
	if s.MinBackoff <= 0 {
		s.MinBackoff = 500 * time.Millisecond
	}
	if s.MaxBackoff < s.MinBackoff {
		s.MaxBackoff = max(30*time.Second, s.MinBackoff)
	}
	if s.ResetAfter <= 0 {
		s.ResetAfter = 30 * time.Second
	}
	if s.Logf == nil {
		s.Logf = func(string, ...any) {}
	}
}

// Supervise restarts every process of the cluster (those started so far)
// that exits, on the addresses it had, while the others keep running; so a
// killed queue node comes back as a restarted one would. It returns when ctx
// ends, once no restart is under way; call Stop after it, never during it.
func (c *Cluster) Supervise(ctx context.Context, cfg SuperviseConfig) {
	cfg.setDefaults()
	var wg sync.WaitGroup
	for _, p := range c.processes() {
		wg.Add(1)
		go func() { // ends with ctx
			defer wg.Done()
			c.supervise(ctx, p, cfg)
		}()
	}
	wg.Wait()
}

func (c *Cluster) supervise(ctx context.Context, p *Process, cfg SuperviseConfig) {
	backoff := cfg.MinBackoff
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.Done():
		}
		if time.Since(p.StartedAt()) >= cfg.ResetAfter {
			backoff = cfg.MinBackoff
		}
		cfg.Logf("%s exited (%s); restarting in %s", p.Name, p.ExitStatus(), backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, cfg.MaxBackoff)
		if err := c.startProcess(ctx, p); err != nil {
			if ctx.Err() != nil {
				return // Stop ends what was started
			}
			cfg.Logf("%s did not come back: %v", p.Name, err)
			p.Stop(syscall.SIGTERM, 5*time.Second) // if it runs but does not serve
			continue
		}
		cfg.Logf("%s restarted (pid %d)", p.Name, p.PID())
	}
}

// processes returns the boss, the queue nodes and the gateways.
func (c *Cluster) processes() []*Process {
	return append(append([]*Process{c.Boss}, c.Nodes...), c.Gateways...)
}
