package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch/launchtest"
	imqpb "github.com/imq-dev/imq/proto"
)

const apiKey = "e2e-api-key-0123456789abcdef"

// rpc calls the admin RPC at addr and decodes the answer into out.
func rpc(t *testing.T, addr, method string, params any, out any) int {
	t.Helper()
	body, _ := json.Marshal(params)
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/rpc/v1/"+method, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("rpc %s: %v", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("rpc %s: %v in %s", method, err, b)
		}
	}
	return resp.StatusCode
}

// startPHPBackend runs examples/php/backend.php under php -S and returns its
// base URL; the whole process group is killed at cleanup.
func startPHPBackend(t *testing.T) string {
	t.Helper()
	php, err := exec.LookPath("php")
	if err != nil {
		t.Fatal("php is not installed: make test installs it (scripts/ensure-php.sh)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "examples", "php", "backend.php")
	cmd := exec.Command(php, "-S", addr, script)
	cmd.Env = append(cmd.Environ(), "IMQ_PHP_LEAVE_LOG="+filepath.Join(t.TempDir(), "leaves.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	testutil.WaitFor(t, 10*time.Second, "php -S to answer", func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return "http://" + addr
}

// TestDevWithBackend: the imq dev binary with --api-key and --callout, the
// PHP call-out backend under php -S, and the PHP demo driving the RPC.
func TestDevWithBackend(t *testing.T) {
	backend := startPHPBackend(t)
	dev := launchtest.StartProcess(t, "dev", nil, "dev", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--boss-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0",
		"--api-key", apiKey+" methods=publish,set_state,delete_state,get_state,history,queue_info,kick,broadcast,batch prefixes=/room/,/lobby/,/user/",
		"--callout", "/room/="+backend+"/imq/room", "--auth-url", backend+"/imq/auth")
	waitHealthy(t, dev)
	addr, url := dev.Addr("http"), wsURL(dev)

	// The call-outs, through the real flags.
	banned := dialClient(t, url, "banned-bob")
	_, err := banned.Join(testutil.Context(t, 10*time.Second), "/room/e2e", client.Messages("chat"))
	var ce *client.Error
	if !errors.As(err, &ce) || ce.Code != imqpb.Code_DENIED {
		t.Fatalf("a banned user's join: %v, want DENIED", err)
	}
	alice, err := client.Dial(testutil.Context(t, 10*time.Second), url, client.WithToken("letmein-alice"))
	if err != nil {
		t.Fatalf("connect through the auth call-out: %v", err)
	}
	t.Cleanup(func() { alice.Close() })
	sub, err := alice.Join(testutil.Context(t, 10*time.Second), "/room/e2e", client.Messages("chat"))
	if err != nil {
		t.Fatal(err)
	}
	col := collect(sub)
	if _, err := alice.Publish(testutil.Context(t, 5*time.Second), "/room/e2e", "chat", []byte(`{"text":"darn it"}`)); err != nil {
		t.Fatal(err)
	}
	var info struct {
		Subscribers []struct{ User string } `json:"subscribers"`
	}
	if st := rpc(t, addr, "queue_info", map[string]any{"queue": "/room/e2e"}, &info); st != 200 || len(info.Subscribers) != 1 || info.Subscribers[0].User != "alice" {
		t.Fatalf("queue_info: %d %+v", st, info)
	}
	testutil.WaitFor(t, 5*time.Second, "the rewritten message", func() bool {
		ev := col.events()
		return len(ev) == 1 && string(ev[0].Payload) == `{"text":"d**n it"}`
	})

	// The PHP demo against the real binary.
	php, _ := exec.LookPath("php")
	_, file, _, _ := runtime.Caller(0)
	demo := exec.Command(php, filepath.Join(filepath.Dir(file), "..", "examples", "php", "demo.php"))
	demo.Env = append(demo.Environ(), "IMQ_URL=http://"+addr, "IMQ_API_KEY="+apiKey)
	if out, err := demo.CombinedOutput(); err != nil {
		t.Fatalf("demo.php: %v\n%s", err, out)
	}
}

// TestKickAcrossGateways: a kick sent to one gateway closes the user's
// sessions on every gateway of the cluster.
func TestKickAcrossGateways(t *testing.T) {
	cfg := []string{"--api-key", apiKey}
	c := startLocalClusterArgs(t, 1, 2, cfg)
	victim := dialClient(t, c.URLs()[1], "cheater", client.WithBackoff(time.Hour, time.Hour))
	if _, err := victim.Ping(testutil.Context(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	var out struct {
		Sessions int      `json:"sessions"`
		Gateways int      `json:"gateways"`
		Failed   []string `json:"failed"`
	}
	// Gossip brings gw-1 news of gw-2 shortly after start: kicking nobody
	// shows when it has.
	testutil.WaitFor(t, 10*time.Second, "gw-1 to know both gateways", func() bool {
		rpc(t, c.Gateways[0].Addr("http"), "kick", map[string]any{"user": "nobody"}, &out)
		return out.Gateways == 2
	})
	if st := rpc(t, c.Gateways[0].Addr("http"), "kick", map[string]any{"user": "cheater", "reason": "aimbot"}, &out); st != 200 {
		t.Fatalf("kick: status %d", st)
	}
	if out.Sessions != 1 || out.Gateways != 2 || len(out.Failed) != 0 {
		t.Fatalf("kick answered %+v, want 1 session on 2 gateways", out)
	}
	testutil.WaitFor(t, 5*time.Second, "the kicked client to be closed", func() bool { return victim.Err() != nil })
	if msg := fmt.Sprint(victim.Err()); !strings.Contains(msg, "KICKED") || !strings.Contains(msg, "aimbot") {
		t.Fatalf("kicked client ended with %q, want the KICKED goodbye with the reason", msg)
	}
}
