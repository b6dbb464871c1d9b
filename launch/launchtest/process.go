package launchtest

import (
	"context"
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/launch"
)

// stopTimeout bounds a process's orderly stop at the end of a test before
// it is killed.
const stopTimeout = 10 * time.Second

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/imq once per test binary, with the race detector when
// the test runs under it (so the processes under test get it too), and
// returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "imq-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "imq")
		args := []string{"build", "-o", binPath}
		if raceEnabled {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, "github.com/imq-dev/imq/cmd/imq")...).CombinedOutput()
		if err != nil {
			buildErr = &buildError{err: err, out: string(out)}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "build imq: " + e.err.Error() + "\n" + e.out }

// ClusterKeyEnv gives the processes StartProcess runs their cluster key, in
// the environment as an operator would (never on a command line).
var ClusterKeyEnv = "IMQ_CLUSTER_KEY=" + base64.StdEncoding.EncodeToString([]byte("launchtest-cluster-key-012345678"))

// StartProcess runs `imq args...` (the binary Binary builds, logging at
// debug level into the test's temporary directory) through
// launch.StartProcess, and returns once it serves, its addresses read from
// its ready file. name names it in the test's output and its files. env is
// added to its environment, after ClusterKeyEnv unless env gives a cluster
// key of its own or IMQ_INSECURE. When the test ends the process is stopped
// (SIGTERM, then SIGKILL after 10 s) and checked as CheckLogs says.
func StartProcess(t testing.TB, name string, env []string, args ...string) *launch.Process {
	t.Helper()
	if !slices.ContainsFunc(env, func(kv string) bool {
		return strings.HasPrefix(kv, "IMQ_CLUSTER_KEY") || strings.HasPrefix(kv, "IMQ_INSECURE=")
	}) {
		env = append([]string{ClusterKeyEnv}, env...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := launch.StartProcess(ctx, launch.ProcessConfig{
		Binary: Binary(t), Name: name, Dir: t.TempDir(), Env: env,
		Args: append(args, "--log-level", "debug"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop(syscall.SIGTERM, stopTimeout)
		CheckLogs(t, p)
	})
	return p
}

// StartCluster starts a local cluster of imq processes (launch.StartCluster
// with the binary Binary builds, in the test's temporary directory unless
// cfg says) and returns once it routes. When the test ends the cluster is
// stopped and every process checked as CheckLogs says.
func StartCluster(t testing.TB, cfg launch.ClusterConfig) *launch.Cluster {
	t.Helper()
	if cfg.Binary == "" {
		cfg.Binary = Binary(t)
	}
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := launch.StartCluster(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop(stopTimeout)
		CheckLogs(t, append(append([]*launch.Process{c.Boss}, c.Nodes...), c.Gateways...)...)
	})
	return c
}

// CheckLogs fails the test if a process's log shows the race detector
// reporting a data race, and, if the test failed, logs every line each
// process logged.
func CheckLogs(t testing.TB, procs ...*launch.Process) {
	t.Helper()
	for _, p := range procs {
		if b, _ := os.ReadFile(p.LogPath()); strings.Contains(string(b), "WARNING: DATA RACE") {
			t.Errorf("%s: the race detector reported a data race (log follows)", p.Name)
		}
	}
	if t.Failed() {
		for _, p := range procs {
			if b, err := os.ReadFile(p.LogPath()); err == nil {
				t.Logf("---- %s ----\n%s", p.Name, b)
			}
		}
	}
}
