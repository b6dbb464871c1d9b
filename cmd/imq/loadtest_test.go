package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
)

// `imq loadtest` against a URL where nothing listens fails quickly, saying
// so; the URL may come from the scenario file.
func TestLoadtestNothingListening(t *testing.T) {
	fromFlag, fromFile := testutil.ClosedURL(t), testutil.ClosedURL(t)
	scenario := filepath.Join(t.TempDir(), "s.json")
	if err := os.WriteFile(scenario, []byte(`{"url": "`+fromFile+`", "rooms": 2, "bots_per_room": 2, "duration": "30s"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		args []string
		url  string
	}{
		{"flags", []string{"--url", fromFlag, "--rooms", "2", "--bots-per-room", "2", "--duration", "30s"}, fromFlag},
		{"scenario url", []string{"--scenario", scenario}, fromFile},
		{"flag overrides scenario url", []string{"--scenario", scenario, "--url", fromFlag}, fromFlag},
	} {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			err := runLoadtest(append(tt.args, "--connect-timeout", "1s", "--log-level", "error"))
			if took := time.Since(start); took > 8*time.Second {
				t.Errorf("took %v; want a quick failure", took)
			}
			if err == nil || !strings.Contains(err.Error(), "no bot could connect") || !strings.Contains(err.Error(), tt.url+": ") ||
				!strings.Contains(err.Error(), "connection refused") {
				t.Fatalf("err %v; want no bot could connect to %s: ... connection refused", err, tt.url)
			}
		})
	}
}

// An explicitly empty --secret (--secret "$SECRET" with SECRET unset) is
// refused before the run, rather than silently running in development
// mode (?user=).
func TestLoadtestEmptySecret(t *testing.T) {
	url := testutil.ClosedURL(t)
	err := runLoadtest([]string{"--url", url, "--secret", "", "--log-level", "error"})
	if err == nil || !strings.Contains(err.Error(), "--secret is empty") {
		t.Errorf("--secret '': %v; want --secret is empty", err)
	}
	t.Setenv("IMQ_SECRET", "")
	err = runLoadtest([]string{"--url", url, "--log-level", "error"})
	if err == nil || !strings.Contains(err.Error(), "IMQ_SECRET is empty") {
		t.Errorf("IMQ_SECRET='': %v; want IMQ_SECRET is empty", err)
	}
}
