package boss

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
)

func TestStateRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := loadState(dir)
	if err != nil || s.Table.Version() != 0 || len(s.Peers) != 0 {
		t.Fatalf("empty dir: %+v, %v", s, err)
	}
	tb := build(t, nodes("a", "b", "c"))
	want := state{Format: stateFormat, Table: tb, Peers: []string{"127.0.0.1:7947", "127.0.0.1:7948"}, Saved: time.Now().UTC()}
	if err := saveState(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if jsonOf(t, got.Table) != jsonOf(t, tb) || !slices.Equal(got.Peers, want.Peers) || !got.Saved.Equal(want.Saved) {
		t.Fatalf("loaded %+v, want %+v", got, want)
	}
	// Writing again replaces the file and leaves no temporary behind.
	if err := saveState(dir, state{Format: stateFormat, Table: bucket.Empty(), Peers: []string{}}); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != StateFile {
		t.Fatalf("dir holds %v", entries)
	}
}

func TestStateRejectsBadFiles(t *testing.T) {
	for name, content := range map[string]string{
		"not JSON":       "{",
		"other format":   `{"format": 2, "table": {"version": 1, "bits": 0, "nodes": [], "owners": []}}`,
		"broken table":   `{"format": 1, "table": {"version": 3, "bits": 3, "nodes": [{"id": "a"}], "owners": [0, 0, 5, 0, 0, 0, 0, 0]}}`,
		"unsorted nodes": `{"format": 1, "table": {"version": 3, "bits": 0, "nodes": [{"id": "b"}, {"id": "a"}], "owners": [0]}}`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, StateFile), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := loadState(dir); !errors.Is(err, ErrBadState) {
				t.Fatalf("loadState = %v, want ErrBadState", err)
			}
			cfg := testConfig(t, dir)
			if b, err := New(cfg); !errors.Is(err, ErrBadState) {
				if b != nil {
					b.member.Shutdown()
				}
				t.Fatalf("New = %v, want ErrBadState", err)
			}
		})
	}
}

func TestSaveStateFailsCleanly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing")
	if err := saveState(dir, state{Format: stateFormat, Table: bucket.Empty()}); err == nil {
		t.Fatal("saved into a missing directory")
	}
}
