package loadtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os/exec"
	"sync"
	"time"
)

// workerSpec is what the parent sends a worker on its stdin: its share of
// the rooms and the configuration that matters to the engine.
type workerSpec struct {
	Index          int      `json:"index"`
	Rooms          []int    `json:"rooms"`
	URL            string   `json:"url"`
	Scenario       Scenario `json:"scenario"`
	Secret         []byte   `json:"secret,omitempty"`
	Audience       string   `json:"audience,omitempty"`
	AllowRemote    bool     `json:"allow_remote"`
	ConnectTimeout Duration `json:"connect_timeout"`
	Drain          Duration `json:"drain"`
	SourceAddrs    int      `json:"source_addrs"`
	TrackLimit     int      `json:"track_limit"`
	SettleTimeout  Duration `json:"settle_timeout"`
	RunID          string   `json:"run_id"`
}

// workerLine is one line a worker writes on its stdout.
type workerLine struct {
	Tick  *Tick         `json:"tick,omitempty"`
	Final *engineResult `json:"final,omitempty"`
}

// RunWorker is the worker mode (`imq loadtest --worker`): it reads a
// workerSpec from in, runs those rooms' bots, and writes one JSON line per
// second and a final line to out. It stops early when ctx ends or in
// reaches end of file, which is how the parent stops it.
func RunWorker(ctx context.Context, in io.Reader, out io.Writer, log *slog.Logger) error {
	dec := json.NewDecoder(in)
	var spec workerSpec
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("worker: read spec: %w", err)
	}
	cfg := DefaultConfig()
	cfg.URL, cfg.Scenario, cfg.Secret, cfg.AllowRemote = spec.URL, spec.Scenario, spec.Secret, spec.AllowRemote
	cfg.SourceAddrs, cfg.TrackLimit, cfg.RunID = spec.SourceAddrs, spec.TrackLimit, spec.RunID
	cfg.SettleTimeout, cfg.Workers, cfg.Logger = time.Duration(spec.SettleTimeout), 1, log
	cfg.Audience, cfg.ConnectTimeout, cfg.Drain = spec.Audience, time.Duration(spec.ConnectTimeout), time.Duration(spec.Drain)
	if err := cfg.validate(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, io.MultiReader(dec.Buffered(), in))
		cancel()
	}()
	var mu sync.Mutex
	enc := json.NewEncoder(out)
	write := func(l workerLine) {
		mu.Lock()
		defer mu.Unlock()
		if err := enc.Encode(l); err != nil {
			log.Error("worker: write", "err", err)
		}
	}
	res := runEngine(ctx, cfg, spec.Rooms, func(t Tick) { write(workerLine{Tick: &t}) })
	write(workerLine{Final: &res})
	return nil
}

// startWorkers starts cfg.Workers processes, rooms dealt round-robin, and
// forwards what they report to ch; each sends a final or an error exactly
// once. Ending ctx closes their stdin, which stops them.
func startWorkers(ctx context.Context, cfg Config, ch chan<- sourceMsg) error {
	specs := make([]workerSpec, cfg.Workers)
	for i := range specs {
		specs[i] = workerSpec{Index: i, URL: cfg.URL, Scenario: cfg.Scenario, Secret: cfg.Secret,
			Audience: cfg.Audience, AllowRemote: cfg.AllowRemote, SourceAddrs: cfg.SourceAddrs, TrackLimit: cfg.TrackLimit,
			ConnectTimeout: Duration(cfg.ConnectTimeout), Drain: Duration(cfg.Drain),
			SettleTimeout: Duration(cfg.SettleTimeout), RunID: cfg.RunID}
	}
	for room := range cfg.Scenario.Rooms {
		specs[room%cfg.Workers].Rooms = append(specs[room%cfg.Workers].Rooms, room)
	}
	// The ramp rate is the whole run's: each worker ramps its share of it.
	for i := range specs {
		specs[i].Scenario.RampRate = cfg.Scenario.RampRate * float64(len(specs[i].Rooms)) / float64(cfg.Scenario.Rooms)
	}
	for i, spec := range specs {
		cmd := exec.Command(cfg.Executable, "loadtest", "--worker")
		cmd.Stderr = &logWriter{log: cfg.Logger, worker: i}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start worker %d: %w", i, err)
		}
		cfg.Logger.Debug("worker started", "worker", i, "pid", cmd.Process.Pid, "rooms", len(spec.Rooms))
		if err := json.NewEncoder(stdin).Encode(spec); err != nil {
			return fmt.Errorf("worker %d: send spec: %w", i, err)
		}
		context.AfterFunc(ctx, func() { stdin.Close() })
		go func() {
			var final *engineResult
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 1<<20), 64<<20)
			for sc.Scan() {
				var l workerLine
				if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
					cfg.Logger.Warn("worker: bad line", "worker", i, "err", err)
					continue
				}
				switch {
				case l.Tick != nil:
					ch <- sourceMsg{src: i, tick: l.Tick}
				case l.Final != nil:
					final = l.Final
				}
			}
			stdin.Close()
			err := cmd.Wait()
			switch {
			case final != nil:
				ch <- sourceMsg{src: i, final: final}
			case err != nil:
				ch <- sourceMsg{src: i, err: fmt.Errorf("worker %d: %w", i, err)}
			default:
				ch <- sourceMsg{src: i, err: fmt.Errorf("worker %d ended without a result", i)}
			}
		}()
	}
	return nil
}

// logWriter passes a worker's stderr to the logger, a line at a time.
type logWriter struct {
	log    *slog.Logger
	worker int
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.log.Info("worker stderr", "worker", w.worker, "text", string(p))
	return len(p), nil
}
