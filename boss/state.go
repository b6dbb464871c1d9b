package boss

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
)

// StateFile is the name of the persisted state in Config.DataDir.
const StateFile = "boss-state.json"

// stateFormat is the format version written; a boss refuses others.
const stateFormat = 1

// state is what the boss persists: its table and whom to rejoin.
type state struct {
	Format int           `json:"format"`
	Table  *bucket.Table `json:"table"`
	// Peers are the gossip addresses of the other live members when the
	// state was saved.
	Peers []string `json:"peers"`
	// Draining lists the nodes an operator drained (sorted): they stay out
	// of the layout until undrained.
	Draining []string `json:"draining,omitempty"`
	// Layout is the target layout (Config.Handoff): the table the boss
	// would publish if every move were instant. Absent without hand-off,
	// and in state written before it existed; it is then rebuilt from the
	// table.
	Layout *bucket.Table `json:"layout,omitempty"`
	Saved  time.Time     `json:"saved"`
}

// loadState reads dir's state; a missing file is an empty table and no
// peers.
func loadState(dir string) (state, error) {
	path := filepath.Join(dir, StateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return state{Format: stateFormat, Table: bucket.Empty()}, nil
	}
	if err != nil {
		return state{}, fmt.Errorf("%w %s: %v", ErrBadState, path, err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return state{}, fmt.Errorf("%w %s: %v (move it away to recover the table from the members)", ErrBadState, path, err)
	}
	if s.Format != stateFormat {
		return state{}, fmt.Errorf("%w %s: format %d, this boss reads format %d", ErrBadState, path, s.Format, stateFormat)
	}
	if s.Table == nil {
		s.Table = bucket.Empty()
	}
	return s, nil
}

// saveState writes s to dir atomically: a temporary file, synced, renamed
// over the old state, then the directory synced so the rename survives a
// crash.
func saveState(dir string, s state) (err error) {
	b, err := json.MarshalIndent(s, "", " ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, StateFile+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(append(b, '\n')); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(f.Name(), filepath.Join(dir, StateFile)); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
