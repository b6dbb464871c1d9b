package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Ready is what a serving imq process writes to its --ready-file once it
// serves: how a launcher learns the addresses it got (ports asked as 0)
// without reading its logs. Addrs maps each kind to a host:port: "http"
// (the boss's API, a gateway's client port), "internal" (a gateway's or
// queue node's internal listener), "link" (a queue node's link listener),
// "gossip"; imq dev adds "boss" (the boss's API) and "node_internal" (its
// queue node's internal listener, "internal" being its gateway's).
type Ready struct {
	Role  string            `json:"role"` // "boss", "queuenode", "gateway" or "dev"
	ID    string            `json:"id"`
	PID   int               `json:"pid"`
	Addrs map[string]string `json:"addrs"`
}

// WriteReady writes r to path atomically (a temporary file in the same
// directory, renamed over path), so that a reader sees the whole object or
// nothing.
func WriteReady(path string, r Ready) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("ready file: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("ready file: %w", err)
	}
	return nil
}

// ReadReady reads the ready file at path.
func ReadReady(path string) (Ready, error) {
	var r Ready
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("ready file %s: %w", path, err)
	}
	return r, nil
}

// waitReady polls for p's ready file until it appears, p exits or ctx ends.
func (p *Process) waitReady(ctx context.Context) (Ready, error) {
	done := p.Done()
	for {
		r, err := ReadReady(p.readyPath)
		if err == nil {
			return r, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return r, err
		}
		select {
		case <-done:
			return r, fmt.Errorf("%s exited (%s) before it served", p.Name, p.ExitStatus())
		case <-ctx.Done():
			return r, fmt.Errorf("%s did not write its ready file %s: %w", p.Name, p.readyPath, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
