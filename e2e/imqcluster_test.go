package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch/launchtest"
)

// imqCluster is a running `imq cluster` command: the processes of its table
// and every line it printed.
type imqCluster struct {
	t     *testing.T
	cmd   *exec.Cmd
	dir   string
	pids  map[string]int    // by name, as the table printed them
	addrs map[string]string // the first address of each row
	url   string            // gw-1's WebSocket URL, without ?user=

	mu    sync.Mutex
	lines []string // stdout and stderr, as they come
	done  chan struct{}
}

// startImqCluster runs `imq cluster args... -- <fast gossip>` with env added
// to its environment, and waits for its table of processes.
func startImqCluster(t *testing.T, env []string, args ...string) *imqCluster {
	t.Helper()
	c := &imqCluster{t: t, dir: t.TempDir(), pids: map[string]int{}, addrs: map[string]string{}, done: make(chan struct{})}
	args = append(append([]string{"cluster", "--dir", c.dir}, args...), append([]string{"--"}, gossipArgs...)...)
	c.cmd = exec.Command(launchtest.Binary(t), args...)
	c.cmd.Env = append(c.cmd.Environ(), env...)
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var readers sync.WaitGroup
	for _, r := range []io.Reader{stdout, stderr} {
		readers.Add(1)
		go func() {
			defer readers.Done()
			sc := bufio.NewScanner(r)
			for sc.Scan() {
				c.mu.Lock()
				c.lines = append(c.lines, sc.Text())
				c.mu.Unlock()
			}
		}()
	}
	go func() { readers.Wait(); c.cmd.Wait(); close(c.done) }()
	t.Cleanup(func() { // after a failure, or interrupt: leave nothing running
		c.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-c.done:
		case <-time.After(30 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
		for _, pid := range c.childPIDs() {
			syscall.Kill(pid, syscall.SIGKILL) // they have their own process group
		}
		if t.Failed() {
			t.Logf("imq cluster printed:\n%s", strings.Join(c.output(), "\n"))
		}
	})
	testutil.WaitFor(t, 60*time.Second, "imq cluster's table of processes", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, l := range c.lines {
			f := strings.Fields(l)
			if len(f) >= 5 && (f[1] == "boss" || f[1] == "queuenode" || f[1] == "gateway") {
				c.pids[f[0]], _ = strconv.Atoi(f[2])
				c.addrs[f[0]] = f[3]
				if f[1] != "gateway" {
					c.addrs[f[0]] = f[4]
				} else if len(f) >= 7 && f[4] == "internal" {
					c.addrs[f[0]+"/internal"] = f[5] // http://ADDR/varz
				}
			}
		}
		select {
		case <-c.done:
			t.Fatalf("imq cluster exited early:\n%s", strings.Join(c.lines, "\n"))
		default:
		}
		return len(c.pids) > 0 && strings.Contains(strings.Join(c.lines, "\n"), "Press Ctrl-C to stop.")
	})
	c.url = strings.TrimSuffix(c.addrs["gw-1"], "?user=alice")
	return c
}

func (c *imqCluster) output() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.lines...)
}

// childPIDs returns the pids of the table and of every restart since.
func (c *imqCluster) childPIDs() map[string]int {
	out := map[string]int{}
	for name, pid := range c.pids {
		out[name] = pid
	}
	for i, l := range c.output() {
		var name string
		var pid int
		if n, _ := fmt.Sscanf(l, "imq cluster: %s restarted (pid %d)", &name, &pid); n == 2 {
			out[fmt.Sprintf("%s#%d", name, i)] = pid
		}
	}
	return out
}

// waitOutput waits for a line starting with prefix, after the first from
// lines, and returns it and its index.
func (c *imqCluster) waitOutput(from int, prefix string, d time.Duration) (string, int) {
	c.t.Helper()
	var line string
	var at int
	testutil.WaitFor(c.t, d, fmt.Sprintf("imq cluster to print %q", prefix), func() bool {
		out := c.output()
		for i := from; i < len(out); i++ {
			if strings.HasPrefix(out[i], prefix) {
				line, at = out[i], i
				return true
			}
		}
		return false
	})
	return line, at
}

// interrupt is Ctrl-C: imq cluster must exit 0 within 30 s, leaving no
// process behind.
func (c *imqCluster) interrupt() {
	c.t.Helper()
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		c.t.Fatal("imq cluster did not exit within 30s of SIGINT")
	}
	if code := c.cmd.ProcessState.ExitCode(); code != 0 {
		c.t.Fatalf("imq cluster exited with %s after SIGINT", c.cmd.ProcessState)
	}
	for name, pid := range c.childPIDs() {
		// Signal 0 probes: the process must be gone (reaped by the launcher).
		if err := syscall.Kill(pid, 0); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
			c.t.Errorf("%s (pid %d) still running after imq cluster exited", name, pid)
		}
	}
}

// errorLines returns the lines that report errors: imq cluster's own
// output, and with logs the processes' log files.
func (c *imqCluster) errorLines(logs bool) []string {
	var out []string
	for _, l := range c.output() {
		if strings.Contains(l, "ERROR") || strings.Contains(l, "[ERR]") || strings.Contains(l, "imq:") {
			out = append(out, l)
		}
	}
	if logs {
		files, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
		for _, f := range files {
			b, _ := os.ReadFile(f)
			for l := range strings.Lines(string(b)) {
				if strings.Contains(l, `"level":"ERROR"`) || strings.Contains(l, `"msg":"queue node link lost"`) {
					out = append(out, filepath.Base(f)+": "+l)
				}
			}
		}
	}
	return out
}

// TestImqClusterCommand: `imq cluster` starts the processes, prints their
// addresses, serves clients, and on Ctrl-C (SIGINT) stops every process
// and exits 0 without an error line, in its output or the processes' logs.
func TestImqClusterCommand(t *testing.T) {
	c := startImqCluster(t, nil, "--queuenodes", "2", "--gateways", "1")
	if len(c.pids) != 4 {
		t.Fatalf("the table lists %v, want a boss, 2 queue nodes and a gateway", c.pids)
	}
	if out := strings.Join(c.output(), "\n"); !strings.HasPrefix(out, "imq cluster: local cluster running") || !strings.Contains(out, "Try:      imq sub /room/1 --url "+c.url+"   ") {
		t.Fatalf("no 'imq cluster:' header or connect hint:\n%s", out)
	}
	cl := dialClient(t, c.url, "cmd-user")
	sub, err := cl.Join(testutil.Context(t, 10*time.Second), "/room/cmd", client.Messages("chat"))
	if err != nil {
		t.Fatal(err)
	}
	col := collect(sub)
	if _, err := cl.Publish(testutil.Context(t, 5*time.Second), "/room/cmd", "chat", []byte(`"hi"`)); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, "the message", func() bool { return len(col.events()) == 1 })
	cl.Close()

	c.interrupt()
	if errs := c.errorLines(true); len(errs) > 0 {
		t.Fatalf("Ctrl-C left error lines:\n%s", strings.Join(errs, "\n"))
	}
	// The logs stay, and imq cluster says where, at the start and the end.
	if out := c.output(); !slices.Contains(out, "Logs:     "+c.dir+" (kept when the cluster stops)") ||
		!slices.Contains(out, "imq cluster: logs and the boss's data kept in "+c.dir) {
		t.Errorf("imq cluster does not say where its logs are kept:\n%s", strings.Join(out, "\n"))
	}
	if _, err := os.Stat(filepath.Join(c.dir, "gw-1.log")); err != nil {
		t.Errorf("the gateway's log is gone: %v", err)
	}
}

// TestImqClusterRestartsKilledProcesses: `imq cluster` supervises. A
// SIGKILLed queue node and then gateway are restarted on their addresses,
// logged, while the other processes keep running; the boss's table has the
// node again and the gateway's URL serves again.
func TestImqClusterRestartsKilledProcesses(t *testing.T) {
	c := startImqCluster(t, []string{"IMQ_API_KEYS=" + apiKey + " methods=queue_info"}, "--queuenodes", "2", "--gateways", "1")
	seen := len(c.output())
	for _, kill := range []struct{ victim, backoff string }{
		{"qn-2", "500ms"},
		{"qn-2", "1s"}, // again at once: the backoff doubles
		{"gw-1", "500ms"},
	} {
		victim := kill.victim
		pid := c.pids[victim]
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_, seen = c.waitOutput(seen, "imq cluster: "+victim+" exited (signal: killed); restarting in "+kill.backoff, 10*time.Second)
		var line string
		line, seen = c.waitOutput(seen, "imq cluster: "+victim+" restarted (pid ", 30*time.Second)
		var newPID int
		fmt.Sscanf(strings.TrimPrefix(line, "imq cluster: "+victim+" restarted (pid "), "%d", &newPID)
		if newPID == 0 || newPID == pid || syscall.Kill(newPID, 0) != nil {
			t.Fatalf("%q: want a new, running pid (was %d)", line, pid)
		}
		c.pids[victim] = newPID
		for name, p := range c.pids {
			if name != victim && syscall.Kill(p, 0) != nil {
				t.Fatalf("%s (pid %d) stopped when %s was killed", name, p, victim)
			}
		}
	}

	// The node is back in the boss's table on its link address, owning
	// buckets...
	boss := strings.TrimSuffix(c.addrs["boss"], "/v1/nodes")
	testutil.WaitFor(t, 30*time.Second, "qn-2 back in the boss's table with buckets", func() bool {
		resp, err := http.Get(boss + "/v1/table")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var tb struct {
			Nodes []struct {
				ID       string `json:"id"`
				LinkAddr string `json:"link_addr"`
			} `json:"nodes"`
			Owners []int `json:"owners"`
		}
		if json.NewDecoder(resp.Body).Decode(&tb) != nil {
			return false
		}
		for _, o := range tb.Owners {
			if n := tb.Nodes[o]; n.ID == "qn-2" && n.LinkAddr == c.addrs["qn-2"] {
				return true
			}
		}
		return false
	})
	// ...and the restarted gateway serves at the URL it had.
	health := "http" + strings.TrimSuffix(strings.TrimPrefix(c.url, "ws"), "/ws") + "/healthz"
	testutil.WaitFor(t, 30*time.Second, "gw-1 healthy again", func() bool {
		resp, err := http.Get(health)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	// Healthy means one link up: wait for the links to both nodes, as a
	// client retrying UNAVAILABLE would.
	testutil.WaitFor(t, 30*time.Second, "gw-1's links to both queue nodes", func() bool {
		resp, err := http.Get(c.addrs["gw-1/internal"])
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var v struct {
			LinksUp int `json:"links_up"`
		}
		return json.NewDecoder(resp.Body).Decode(&v) == nil && v.LinksUp == 2
	})
	cl := dialClient(t, c.url, "after-restart")
	gw := strings.TrimSuffix(strings.TrimPrefix(c.url, "ws://"), "/ws")
	served := map[string]int{}
	for i := range 16 { // rooms spread over both nodes
		room := fmt.Sprintf("/room/restart-%d", i)
		sub, err := cl.Join(testutil.Context(t, 10*time.Second), room, client.Messages("chat"))
		if err != nil {
			t.Fatalf("join %s after the restarts: %v", room, err)
		}
		col := collect(sub)
		if _, err := cl.Publish(testutil.Context(t, 5*time.Second), room, "chat", []byte(`"back"`)); err != nil {
			t.Fatalf("publish to %s after the restarts: %v", room, err)
		}
		testutil.WaitFor(t, 5*time.Second, "the message in "+room, func() bool { return len(col.events()) == 1 })
		var info struct{ Node string }
		if st := rpc(t, gw, "queue_info", map[string]any{"queue": room}, &info); st != http.StatusOK {
			t.Fatalf("queue_info %s: %d (the API key from IMQ_API_KEYS)", room, st)
		}
		served[info.Node]++
	}
	if served["qn-1"] == 0 || served["qn-2"] == 0 {
		t.Fatalf("rooms served by %v, want both nodes, the restarted qn-2 too", served)
	}
	cl.Close()
	c.interrupt()
	if errs := c.errorLines(false); len(errs) > 0 {
		t.Fatalf("imq cluster printed error lines:\n%s", strings.Join(errs, "\n"))
	}
}

// TestImqClusterKeepsSecretsOffCommandLines: the JWT secret (from
// IMQ_JWT_SECRET), the API key (from --api-key-file) and the cluster key reach
// the processes through their environment: no process's command line
// (/proc/PID/cmdline, what ps shows every user) holds one, and the gateway
// uses them. --allowed-origins, no secret, goes on the gateway's. The
// cluster key is the run's own: an old-named key or IMQ_INSECURE in the
// environment of imq cluster does not reach the processes.
func TestImqClusterKeepsSecretsOffCommandLines(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "api-key")
	if err := os.WriteFile(keyFile, []byte(apiKey+" methods=queue_info\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const operatorKey = "operator-key-for-e2e-0123456789"
	c := startImqCluster(t, []string{"IMQ_JWT_SECRET=" + e2eSecret, "IMQ_GOSSIP_KEY=" + strings.TrimPrefix(launchtest.ClusterKeyEnv, "IMQ_CLUSTER_KEY="), "IMQ_INSECURE=true",
		"IMQ_OPERATOR_KEY=" + operatorKey},
		"--queuenodes", "1", "--gateways", "1", "--api-key-file", keyFile, "--allowed-origins", "https://game.example.com")
	pids := c.childPIDs()
	for name, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil {
			t.Fatal(err)
		}
		env := strings.Split(string(b), "\x00")
		if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "IMQ_CLUSTER_KEY=") }) {
			t.Errorf("%s has no IMQ_CLUSTER_KEY", name)
		}
		for _, kv := range env {
			if strings.HasPrefix(kv, "IMQ_GOSSIP_KEY") || strings.HasPrefix(kv, "IMQ_INSECURE") {
				t.Errorf("%s inherited %s", name, kv)
			}
		}
		// The operator key is the boss's alone.
		if has := slices.Contains(env, "IMQ_OPERATOR_KEY="+operatorKey); has != (name == "boss") {
			t.Errorf("%s has the operator key in its environment: %v", name, has)
		}
	}
	pids["imq cluster"] = c.cmd.Process.Pid
	for name, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			t.Fatal(err)
		}
		cmdline := strings.ReplaceAll(string(b), "\x00", " ")
		for _, secret := range []string{e2eSecret, apiKey, operatorKey, "--jwt-secret ", "--api-key ", "--cluster-key ", "--gossip-key ", "--operator-key "} {
			if strings.Contains(cmdline, secret) {
				t.Errorf("%s's command line holds %q: %s", name, secret, cmdline)
			}
		}
		if strings.HasPrefix(name, "gw-") && !strings.Contains(cmdline, "--allowed-origins https://game.example.com ") {
			t.Errorf("%s did not get --allowed-origins: %s", name, cmdline)
		}
	}

	// The gateway has the JWT secret: a token signed with it connects, and
	// it is not in development mode.
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{Subject: "eve", ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour))}).SignedString([]byte(e2eSecret))
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.Dial(testutil.Context(t, 10*time.Second), c.url, client.WithToken(tok))
	if err != nil {
		t.Fatalf("connect with a token signed with the secret: %v", err)
	}
	defer cl.Close()
	if _, err := cl.Join(testutil.Context(t, 10*time.Second), "/room/secret", client.Messages("chat")); err != nil {
		t.Fatal(err)
	}
	if cl, err := client.Dial(testutil.Context(t, 10*time.Second), c.url, client.WithUser("mallory")); err == nil {
		cl.Close()
		t.Fatal("?user= connected: the gateway is in development mode")
	}
	// And the API key.
	gw := strings.TrimSuffix(strings.TrimPrefix(c.url, "ws://"), "/ws")
	var info struct{ Subscribers []struct{ User string } }
	if st := rpc(t, gw, "queue_info", map[string]any{"queue": "/room/secret"}, &info); st != http.StatusOK || len(info.Subscribers) != 1 || info.Subscribers[0].User != "eve" {
		t.Fatalf("queue_info with the API key from the file: %d %+v", st, info)
	}
	cl.Close()
	// imq undrain with the operator key from the environment works
	// against it: the boss got the key.
	undrain := exec.Command(launchtest.Binary(t), "undrain", "qn-1", "--boss", strings.TrimSuffix(c.addrs["boss"], "/v1/nodes"))
	undrain.Env = append(undrain.Environ(), "IMQ_OPERATOR_KEY="+operatorKey)
	if out, err := undrain.CombinedOutput(); err != nil || !strings.Contains(string(out), "qn-1 was not draining") {
		t.Fatalf("imq undrain with the operator key: %v\n%s", err, out)
	}
	c.interrupt()
}

// TestImqDevOperatorKey: imq dev makes an operator key per run and prints
// it, and imq drain works against it with that key.
func TestImqDevOperatorKey(t *testing.T) {
	cmd := exec.Command(launchtest.Binary(t), "dev", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--boss-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0")
	cmd.Env = slices.DeleteFunc(cmd.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "IMQ_OPERATOR_KEY") })
	var out testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	testutil.WaitFor(t, 30*time.Second, "imq dev to be ready", func() bool { return strings.Contains(out.String(), "Press Ctrl-C to stop.") })
	var key, bossURL string
	for l := range strings.Lines(out.String()) {
		// "  Operator:   IMQ_OPERATOR_KEY=KEY imq drain dev-node --boss URL"
		if f := strings.Fields(l); len(f) == 7 && f[0] == "Operator:" {
			key, bossURL = strings.TrimPrefix(f[1], "IMQ_OPERATOR_KEY="), f[6]
		}
	}
	if key == "" || bossURL == "" {
		t.Fatalf("imq dev printed no operator key:\n%s", out.String())
	}
	for _, k := range []string{"wrong", key} {
		drain := exec.Command(launchtest.Binary(t), "drain", "dev-node", "--boss", bossURL)
		drain.Env = append(cmd.Env, "IMQ_OPERATOR_KEY="+k)
		res, err := drain.CombinedOutput()
		switch {
		case k == key && (err != nil || !strings.Contains(string(res), "no other live queue node")):
			t.Fatalf("imq drain with the printed key: %v\n%s", err, res)
		case k != key && (err == nil || !strings.Contains(string(res), "wrong operator key")):
			t.Fatalf("imq drain with a wrong key: %v\n%s", err, res)
		}
	}
}

// TestImqDevCtrlCIsQuiet: imq dev exits 0 on Ctrl-C without an ERROR line
// (memberlist's timers racing its shutdown logged some about one run in
// two) or a "link lost" warning. A few runs, to catch the race.
func TestImqDevCtrlCIsQuiet(t *testing.T) {
	for run := range 3 {
		cmd := exec.Command(launchtest.Binary(t), "dev", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--boss-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0")
		var out testutil.SyncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		testutil.WaitFor(t, 30*time.Second, "imq dev to be ready", func() bool { return strings.Contains(out.String(), "Press Ctrl-C to stop.") })
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			if err != nil {
				t.Fatalf("run %d: imq dev exited with %v after SIGINT:\n%s", run, err, out.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("run %d: imq dev did not exit within 30s of SIGINT", run)
		}
		for l := range strings.Lines(out.String()) {
			if strings.Contains(l, "level=ERROR") || strings.Contains(l, "link lost") {
				t.Fatalf("run %d: Ctrl-C logged %q:\n%s", run, l, out.String())
			}
		}
	}
}
