package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
)

// keylessEnv is this process's environment without any cluster key or
// --insecure.
func keylessEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return slices.Contains([]string{"IMQ_CLUSTER_KEY", "IMQ_CLUSTER_KEY_FILE", "IMQ_GOSSIP_KEY", "IMQ_GOSSIP_KEY_FILE", "IMQ_INSECURE"}, k)
	})
}

// TestQueueNodeRefusesToStartWithoutKey: imq queuenode without a cluster
// key exits 1 with an error naming the ways to give one and how to make
// it, and never serves (no ready file).
func TestQueueNodeRefusesToStartWithoutKey(t *testing.T) {
	ready := filepath.Join(t.TempDir(), "qn.ready")
	cmd := exec.Command(launchtest.Binary(t), "queuenode", "--link-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--join", "127.0.0.1:1", "--ready-file", ready)
	cmd.Env = keylessEnv()
	var out testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("imq queuenode without a key kept running: %s", out.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	for _, want := range []string{"imq: no cluster key", "IMQ_CLUSTER_KEY", "--cluster-key-file", "head -c 32 /dev/urandom | base64", "--insecure"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q: %s", want, out.String())
		}
	}
	if _, err := launch.ReadReady(ready); err == nil {
		t.Error("it wrote its ready file: it served")
	}
}

// TestInsecureIsLoud: imq queuenode --insecure starts, logs a WARN that
// says so at start, and its /varz shows "insecure": true; with the key its
// /varz shows false.
func TestInsecureIsLoud(t *testing.T) {
	for _, insecure := range []bool{true, false} {
		args := []string{"queuenode", "--link-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--log-format", "json"}
		var env []string
		if insecure {
			args, env = append(args, "--insecure"), []string{"IMQ_INSECURE="} // no key: StartProcess gives none
		}
		p := launchtest.StartProcess(t, "queuenode", env, args...)
		var v struct {
			Insecure *bool `json:"insecure"`
		}
		getJSON(t, "http://"+p.Addr("internal")+"/varz", &v)
		if v.Insecure == nil || *v.Insecure != insecure {
			t.Errorf("--insecure %v: /varz insecure is %v", insecure, v.Insecure)
		}
		// The warning is logged before the ready file is written.
		b, err := os.ReadFile(p.LogPath())
		if err != nil {
			t.Fatal(err)
		}
		var warned bool
		for _, line := range strings.Split(string(b), "\n") {
			var l map[string]any
			if json.Unmarshal([]byte(line), &l) != nil {
				continue
			}
			msg, _ := l["msg"].(string)
			warned = warned || (l["level"] == "WARN" && strings.HasPrefix(msg, "INSECURE: running without a cluster key"))
		}
		if warned != insecure {
			t.Errorf("--insecure %v: the INSECURE warning logged: %v", insecure, warned)
		}
	}
}
