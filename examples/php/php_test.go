//go:build unix

package php_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imq-dev/imq/client"
	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
	imqpb "github.com/imq-dev/imq/proto"
	"github.com/imq-dev/imq/queuenode"
)

// Keys of the admin RPC: one for everything, one that may only publish to
// /lobby/.
const (
	fullKey  = "php-test-full-key-0123456789"
	lobbyKey = "php-test-lobby-key-0123456789"
)

// wait bounds every wait of these tests.
const wait = 10 * time.Second

// phpBinary returns the php executable, failing (not skipping) the test
// when it or its curl extension is missing: these tests are the PHP side's
// only check.
func phpBinary(t *testing.T) string {
	t.Helper()
	php, err := exec.LookPath("php")
	if err != nil {
		t.Fatal("php is not installed (not in PATH): the PHP examples cannot be tested; .ci/run installs php-cli and php-curl (apt-get install php-cli php-curl)")
	}
	out, err := exec.Command(php, "-r", `echo extension_loaded("curl") ? "yes" : "no";`).Output()
	if err != nil || string(out) != "yes" {
		t.Fatalf("php's curl extension is missing (%q, %v): .ci/run installs php-curl", out, err)
	}
	return php
}

// startDev starts a one-process cluster with the admin RPC keys set, after
// edit has changed its config, and shuts it down after the test.
func startDev(t *testing.T, edit func(*launch.DevConfig)) *launch.Dev {
	t.Helper()
	var keys []gateway.APIKey
	for _, spec := range []string{fullKey, lobbyKey + " methods=publish prefixes=/lobby/"} {
		k, err := gateway.ParseAPIKey(spec)
		if err != nil {
			t.Fatalf("ParseAPIKey: %v", err)
		}
		keys = append(keys, k)
	}
	return launchtest.StartDev(t, func(c *launch.DevConfig) {
		c.Gateway.APIKeys = append(c.Gateway.APIKeys, keys...)
		if edit != nil {
			edit(c)
		}
	})
}

// dial connects a Go client and closes it after the test.
func dial(t *testing.T, d *launch.Dev, opts ...client.Option) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := client.Dial(ctx, d.URL(), opts...)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// nextUpdate returns the first update on sub that ok accepts, skipping the
// others, within wait.
func nextUpdate(t *testing.T, sub *client.Subscription, what string, ok func(client.Update) bool) client.Update {
	t.Helper()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case u, open := <-sub.Updates():
			if !open {
				t.Fatalf("%s: the subscription ended first", what)
			}
			if ok(u) {
				return u
			}
		case <-timer.C:
			t.Fatalf("%s: not received within %s", what, wait)
		}
	}
}

// jsonEqual reports whether a and b are the same JSON value.
func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// codeOf returns err's protocol code, failing if err is not a *client.Error.
func codeOf(t *testing.T, err error) *client.Error {
	t.Helper()
	e, ok := errors.AsType[*client.Error](err)
	if !ok {
		t.Fatalf("want a *client.Error, got %v", err)
	}
	return e
}

// wantBackendFailure checks the refusal of a join or publish whose
// call-out failed under the deny policy: a retryable UNAVAILABLE (the
// backend refused nothing), "the backend did not answer: ...".
func wantBackendFailure(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: allowed, but the failure policy is deny", what)
	}
	if e := codeOf(t, err); e.Code != imqpb.Code_UNAVAILABLE || !e.Retryable || !strings.HasPrefix(e.Message, "the backend did not answer: ") {
		t.Errorf("%s: %v (retryable %v), want a retryable UNAVAILABLE, the backend did not answer", what, err, e.Retryable)
	}
}

// backend is backend.php running under `php -S`.
type backend struct {
	url      string // http://127.0.0.1:port
	leaveLog string
	cmd      *exec.Cmd
	out      *testutil.SyncBuffer
	done     chan struct{}
}

// startBackend runs `php -S 127.0.0.1:<free port> backend.php` in its own
// process group (the server's workers are its children), waits until it
// answers, and kills the group after the test.
func startBackend(t *testing.T) *backend {
	t.Helper()
	php := phpBinary(t)
	addr := testutil.ClosedAddr(t)
	b := &backend{url: "http://" + addr, leaveLog: filepath.Join(t.TempDir(), "leave.log"), out: &testutil.SyncBuffer{}, done: make(chan struct{})}
	b.cmd = exec.Command(php, "-S", addr, "backend.php")
	// TMPDIR: the server's /slow setting lives in the temp directory.
	b.cmd.Env = append(os.Environ(), "IMQ_PHP_LEAVE_LOG="+b.leaveLog, "PHP_CLI_SERVER_WORKERS=4", "TMPDIR="+t.TempDir())
	b.cmd.Stdout, b.cmd.Stderr = b.out, b.out
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("start php -S: %v", err)
	}
	go func() { b.cmd.Wait(); close(b.done) }()
	t.Cleanup(func() {
		b.stop(t)
		if t.Failed() {
			t.Logf("php -S output:\n%s", b.out.String())
		}
	})
	testutil.WaitForNoError(t, wait, "php -S answering /healthz", func() error {
		select {
		case <-b.done:
			t.Fatalf("php -S exited: %s", b.out.String())
		default:
		}
		resp, err := http.Get(b.url + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	})
	return b
}

// stop kills the server and its workers and waits until the port is closed.
func (b *backend) stop(t *testing.T) {
	t.Helper()
	select {
	case <-b.done:
		return
	default:
	}
	syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-b.done:
	case <-time.After(wait):
		t.Errorf("php -S (pid %d) did not exit after SIGKILL", b.cmd.Process.Pid)
	}
	testutil.WaitForNoError(t, wait, "php -S port closed", func() error {
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(b.url, "http://"), time.Second)
		if err != nil {
			return nil
		}
		c.Close()
		return errors.New("still accepting connections")
	})
}

// post sends a JSON body to the backend and returns the status and body.
func (b *backend) post(t *testing.T, path, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(b.url+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	return resp.StatusCode, out.String()
}

// step is one line printed by testdata/rpc_test.php.
type step struct {
	Step   string          `json:"step"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code      string  `json:"code"`
		GetCode   string  `json:"get_code"`
		HTTP      int     `json:"http"`
		Retryable bool    `json:"retryable"`
		RequestID *string `json:"request_id"`
		Message   string  `json:"message"`
	} `json:"error"`
}

// runRPCScript runs testdata/rpc_test.php and returns its steps by name.
func runRPCScript(t *testing.T, env ...string) map[string]step {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, phpBinary(t), "testdata/rpc_test.php")
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("php testdata/rpc_test.php: %v\nstderr:\n%s\nstdout:\n%s", err, stderr.String(), stdout.String())
	}
	steps := map[string]step{}
	sc := bufio.NewScanner(&stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var s step
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatalf("rpc_test.php printed %q: %v", sc.Text(), err)
		}
		steps[s.Step] = s
		t.Logf("php: %s", sc.Text())
	}
	return steps
}

// result decodes a successful step's result into v.
func (s step) result(t *testing.T, v any) {
	t.Helper()
	if s.Error != nil {
		t.Fatalf("step %q failed: %s (%s, HTTP %d)", s.Step, s.Error.Message, s.Error.Code, s.Error.HTTP)
	}
	if err := json.Unmarshal(s.Result, v); err != nil {
		t.Fatalf("step %q: result %s: %v", s.Step, s.Result, err)
	}
}

// wantError checks a failed step's code and HTTP status.
func (s step) wantError(t *testing.T, code string, status int, retryable bool) {
	t.Helper()
	switch {
	case s.Error == nil:
		t.Errorf("step %q: want %s, succeeded with %s", s.Step, code, s.Result)
	case s.Error.Code != code || s.Error.GetCode != code || s.Error.HTTP != status || s.Error.Retryable != retryable:
		t.Errorf("step %q: got %s (getCode %s) HTTP %d retryable %v, want %s HTTP %d retryable %v: %s",
			s.Step, s.Error.Code, s.Error.GetCode, s.Error.HTTP, s.Error.Retryable, code, status, retryable, s.Error.Message)
	}
}

type event struct {
	Offset     uint64          `json:"offset"`
	Sender     string          `json:"sender"`
	TimeMS     int64           `json:"time_ms"`
	Data       json.RawMessage `json:"data"`
	DataBase64 *string         `json:"data_base64"`
}

type stateEntry struct {
	Value       json.RawMessage `json:"value"`
	ValueBase64 *string         `json:"value_base64"`
	Version     uint64          `json:"version"`
}

type errObj struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// TestRPC runs ImqClient, with each transport, against a live gateway and
// checks what Go clients see.
func TestRPC(t *testing.T) {
	phpBinary(t)
	d := startDev(t, nil)
	for _, transport := range []string{"curl", "stream"} {
		t.Run(transport, func(t *testing.T) {
			testRPC(t, d, transport)
		})
	}
}

func testRPC(t *testing.T, d *launch.Dev, transport string) {
	ctx := testutil.Context(t, 6*wait)
	q := "/room/php-" + transport
	watcher := dial(t, d, client.WithUser("watcher-"+transport))
	sub, err := watcher.Join(ctx, q, client.Messages("chat"), client.State("scores"))
	if err != nil {
		t.Fatalf("join: %v", err)
	}
	victimID := "victim-" + transport
	victim := dial(t, d, client.WithUser(victimID))
	steps := runRPCScript(t,
		"IMQ_URL=http://"+d.Gateway.Addr(),
		"IMQ_API_KEY="+fullKey,
		"IMQ_LOBBY_KEY="+lobbyKey,
		"IMQ_PHP_TRANSPORT="+transport,
		"IMQ_QUEUE="+q,
		"IMQ_VICTIM="+victimID,
		"IMQ_DEAD_URL=http://"+testutil.ClosedAddr(t),
	)
	get := func(name string) step {
		t.Helper()
		s, ok := steps[name]
		if !ok {
			t.Fatalf("rpc_test.php printed no step %q", name)
		}
		return s
	}

	// publish: the watcher receives both events from the backend (sender "").
	var pubJSON, pubRaw struct {
		Offset  uint64 `json:"offset"`
		Created bool   `json:"created"`
	}
	get("publish_json").result(t, &pubJSON)
	get("publish_raw").result(t, &pubRaw)
	if pubJSON.Offset == 0 || pubRaw.Offset != pubJSON.Offset+1 || pubJSON.Created {
		t.Errorf("publish results %+v then %+v: want consecutive offsets on an existing queue", pubJSON, pubRaw)
	}
	u := nextUpdate(t, sub, "the JSON publish", func(u client.Update) bool { return u.Kind == client.KindEvent })
	if u.Offset != pubJSON.Offset || u.Sender != "" || !jsonEqual(u.Payload, []byte(`{"text":"hello from php","n":1}`)) {
		t.Errorf("watcher got offset %d sender %q payload %s; want offset %d from the backend (\"\")", u.Offset, u.Sender, u.Payload, pubJSON.Offset)
	}
	u = nextUpdate(t, sub, "the raw publish", func(u client.Update) bool { return u.Kind == client.KindEvent })
	if u.Offset != pubRaw.Offset || u.Sender != "" || string(u.Payload) != "\x00\xffraw" {
		t.Errorf("watcher got offset %d sender %q payload %q; want %d, \"\", the raw bytes", u.Offset, u.Sender, u.Payload, pubRaw.Offset)
	}

	// set/get/delete state.
	var set, setRaw struct {
		Version uint64 `json:"version"`
	}
	get("set_state").result(t, &set)
	get("set_state_raw").result(t, &setRaw)
	u = nextUpdate(t, sub, "the state change", func(u client.Update) bool { return u.Kind == client.KindStateSet })
	if u.Key != "alice" || string(u.Payload) != "42" || u.Offset != set.Version || u.Sender != "" {
		t.Errorf("watcher got state %s=%s version %d sender %q; want alice=42 version %d sender \"\"", u.Key, u.Payload, u.Offset, u.Sender, set.Version)
	}
	var gs struct {
		Epoch uint64                `json:"epoch"`
		Head  uint64                `json:"head"`
		State map[string]stateEntry `json:"state"`
	}
	get("get_state").result(t, &gs)
	if gs.Epoch != sub.Epoch() || gs.Head < setRaw.Version {
		t.Errorf("get_state epoch %d head %d; want epoch %d, head at least %d", gs.Epoch, gs.Head, sub.Epoch(), setRaw.Version)
	}
	if a := gs.State["alice"]; string(a.Value) != "42" || a.Version != set.Version {
		t.Errorf("get_state alice = %+v, want 42 at version %d", a, set.Version)
	}
	if b := gs.State["blob"]; b.ValueBase64 == nil || *b.ValueBase64 != base64.StdEncoding.EncodeToString([]byte{1, 2}) || b.Value != nil {
		t.Errorf("get_state blob = %+v, want value_base64 of 01 02", b)
	}
	gs.State = nil
	get("get_state_keys").result(t, &gs)
	if len(gs.State) != 1 || string(gs.State["alice"].Value) != "42" {
		t.Errorf("get_state keys=[alice] = %+v, want alice only", gs.State)
	}
	var del struct {
		Version uint64 `json:"version"`
	}
	get("delete_state").result(t, &del)
	if del.Version <= setRaw.Version {
		t.Errorf("delete_state version %d, want after %d", del.Version, setRaw.Version)
	}

	// history.
	var h struct {
		Epoch       uint64   `json:"epoch"`
		Head        uint64   `json:"head"`
		Events      []event  `json:"events"`
		Missed      bool     `json:"missed"`
		More        bool     `json:"more"`
		BytesBase64 []string `json:"bytes_base64"`
	}
	get("history").result(t, &h)
	if len(h.Events) != 2 || h.Missed || h.More || h.Epoch != sub.Epoch() {
		t.Fatalf("history = %+v, want the two events", h)
	}
	if e := h.Events[0]; e.Offset != pubJSON.Offset || e.Sender != "" || e.TimeMS == 0 || !jsonEqual(e.Data, []byte(`{"text":"hello from php","n":1}`)) || e.DataBase64 != nil {
		t.Errorf("history event 0 = %+v (data %s)", e, e.Data)
	}
	if e := h.Events[1]; e.Offset != pubRaw.Offset || e.DataBase64 == nil || *e.DataBase64 != base64.StdEncoding.EncodeToString([]byte("\x00\xffraw")) || e.Data != nil {
		t.Errorf("history event 1 = %+v, want data_base64 of the raw bytes", e)
	}
	if len(h.BytesBase64) != 2 || h.BytesBase64[1] != base64.StdEncoding.EncodeToString([]byte("\x00\xffraw")) {
		t.Errorf("ImqClient::bytesOf gave %q", h.BytesBase64)
	}
	h.Events = nil
	get("history_since").result(t, &h)
	if len(h.Events) != 1 || h.Events[0].Offset != pubRaw.Offset {
		t.Errorf("history since %d limit 1 = %+v, want the raw event only", pubJSON.Offset, h.Events)
	}

	// queue_info.
	var info struct {
		Queue  string `json:"queue"`
		Epoch  uint64 `json:"epoch"`
		Node   string `json:"node"`
		Mounts []struct {
			Name string `json:"name"`
			Kind string `json:"kind"`
		} `json:"mounts"`
		Subscribers []struct {
			User    string   `json:"user"`
			Session string   `json:"session"`
			Mounts  []string `json:"mounts"`
		} `json:"subscribers"`
	}
	get("queue_info").result(t, &info)
	kinds := map[string]string{}
	for _, m := range info.Mounts {
		kinds[m.Name] = m.Kind
	}
	if info.Queue != q || info.Epoch != sub.Epoch() || info.Node == "" || kinds["chat"] != "MESSAGE" || kinds["scores"] != "STATE" {
		t.Errorf("queue_info = %+v", info)
	}
	if len(info.Subscribers) != 1 || info.Subscribers[0].User != "watcher-"+transport || info.Subscribers[0].Session != watcher.Session() {
		t.Errorf("queue_info subscribers = %+v, want the watcher (session %s)", info.Subscribers, watcher.Session())
	}

	// X-Request-Id: echoed when sent, generated otherwise, carried by errors.
	var rid struct {
		RequestID string `json:"request_id"`
		Accepted  bool   `json:"accepted"`
	}
	get("request_id").result(t, &rid)
	if rid.RequestID != "php-test-rid-1" {
		t.Errorf("request id %q, want the one sent", rid.RequestID)
	}
	get("request_id_generated").result(t, &rid)
	if rid.RequestID == "" || rid.RequestID == "php-test-rid-1" || strings.Contains(rid.RequestID, "xxx") || rid.Accepted {
		t.Errorf("generated request id %q (the 200-character one accepted: %v)", rid.RequestID, rid.Accepted)
	}

	// broadcast and batch: per-item results.
	var bc struct {
		Results []struct {
			Queue   string  `json:"queue"`
			Offset  uint64  `json:"offset"`
			Created bool    `json:"created"`
			Error   *errObj `json:"error"`
		} `json:"results"`
	}
	get("broadcast").result(t, &bc)
	if len(bc.Results) != 3 || bc.Results[0].Queue != q || bc.Results[0].Offset == 0 || bc.Results[0].Created ||
		bc.Results[1].Offset == 0 || !bc.Results[1].Created || bc.Results[2].Error == nil || bc.Results[2].Error.Code != "WRONG_MOUNT_TYPE" {
		t.Errorf("broadcast = %+v, want two offsets and WRONG_MOUNT_TYPE", bc.Results)
	}
	get("broadcast_invalid").wantError(t, "INVALID_QUEUE_NAME", 400, false)
	var batch struct {
		Results []struct {
			Result json.RawMessage `json:"result"`
			Error  *errObj         `json:"error"`
		} `json:"results"`
	}
	get("batch").result(t, &batch)
	if len(batch.Results) != 3 || batch.Results[0].Error != nil || batch.Results[1].Error != nil ||
		!bytes.Contains(batch.Results[1].Result, []byte(`"alice"`)) || batch.Results[2].Error == nil || batch.Results[2].Error.Code != "INVALID_QUEUE_NAME" {
		t.Errorf("batch = %+v", batch.Results)
	}

	// kick: the victim is told goodbye KICKED with the reason, not to reconnect.
	var kick struct {
		Sessions int `json:"sessions"`
		Gateways int `json:"gateways"`
	}
	get("kick").result(t, &kick)
	if kick.Sessions != 1 || kick.Gateways != 1 {
		t.Errorf("kick = %+v, want 1 session on 1 gateway", kick)
	}
	testutil.WaitForNoError(t, wait, "the victim closed", func() error {
		if victim.Err() == nil {
			return errors.New("still open")
		}
		return nil
	})
	g, ok := errors.AsType[*client.GoodbyeError](victim.Err())
	if !ok || g.Reason != imqpb.Reason_REASON_KICKED || g.Message != "bye from php" || g.Reconnect {
		t.Errorf("victim closed with %v, want goodbye KICKED \"bye from php\" without reconnect", victim.Err())
	}
	if watcher.Err() != nil {
		t.Errorf("the watcher was closed too: %v", watcher.Err())
	}

	var lobby struct {
		Offset uint64 `json:"offset"`
	}
	get("lobby_ok").result(t, &lobby)

	// Errors.
	get("err_unauthorized").wantError(t, "UNAUTHORIZED", 401, false)
	get("err_forbidden_queue").wantError(t, "FORBIDDEN", 403, false)
	get("err_forbidden_method").wantError(t, "FORBIDDEN", 403, false)
	s := get("err_invalid_queue")
	s.wantError(t, "INVALID_QUEUE_NAME", 400, false)
	if s.Error != nil && (s.Error.RequestID == nil || *s.Error.RequestID != "php-test-rid-err") {
		t.Errorf("the error's request id is %v, want php-test-rid-err", s.Error.RequestID)
	}
	get("err_unknown_method").wantError(t, "UNKNOWN_MESSAGE", 404, false)
	get("err_not_found").wantError(t, "NOT_FOUND", 404, false)
	s = get("err_unknown_field")
	s.wantError(t, "BAD_REQUEST", 400, false)
	if s.Error != nil && !strings.Contains(s.Error.Message, "bogus") {
		t.Errorf("unknown field: message %q does not name the field", s.Error.Message)
	}
	get("err_both_data").wantError(t, "BAD_REQUEST", 400, false)
	get("err_payload_too_large").wantError(t, "PAYLOAD_TOO_LARGE", 413, false)
	get("err_body_too_large").wantError(t, "PAYLOAD_TOO_LARGE", 413, false)
	get("err_unreachable").wantError(t, "UNAVAILABLE", 0, true)
	var ka struct {
		NewConnections *int `json:"new_connections"`
	}
	get("keepalive").result(t, &ka)
	if transport == "curl" && (ka.NewConnections == nil || *ka.NewConnections != 0) {
		t.Errorf("curl opened %v new connections for a second call, want 0 (keep-alive)", ka.NewConnections)
	}

	// The refused publishes (data 1) changed nothing: the next events are
	// the request-id publishes, the broadcast and the batch, in order.
	for _, want := range []string{`{"text":"with an id"}`, `{"text":"with a generated id"}`, `{"text":"to all"}`, `{"text":"in a batch"}`} {
		u := nextUpdate(t, sub, want, func(u client.Update) bool { return u.Kind == client.KindEvent })
		if !jsonEqual(u.Payload, []byte(want)) {
			t.Errorf("watcher got %s, want %s", u.Payload, want)
		}
	}
	if _, err := watcher.Publish(ctx, q, "chat", []byte(`"fence"`)); err != nil {
		t.Fatal(err)
	}
	if u := nextUpdate(t, sub, "the fence", func(u client.Update) bool { return u.Kind == client.KindEvent }); string(u.Payload) != `"fence"` {
		t.Errorf("after the failed calls the watcher got %s, want only the fence", u.Payload)
	}
}

// TestDemo runs demo.php against a live gateway.
func TestDemo(t *testing.T) {
	php := phpBinary(t)
	d := startDev(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, php, "demo.php")
	cmd.Env = append(os.Environ(), "IMQ_URL=http://"+d.Gateway.Addr(), "IMQ_API_KEY="+fullKey)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("php demo.php: %v\n%s", err, out)
	}
	t.Logf("demo.php:\n%s", out)
	for _, want := range []string{"publish JSON", "get_state scores", "queue_info", "kick watcher", "INVALID_QUEUE_NAME", "UNKNOWN_MESSAGE", "NOT_FOUND", "UNAUTHORIZED"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}

// TestPHPLint checks the syntax of every PHP file.
func TestPHPLint(t *testing.T) {
	php := phpBinary(t)
	files, _ := filepath.Glob("*.php")
	more, _ := filepath.Glob("testdata/*.php")
	for _, f := range append(files, more...) {
		if out, err := exec.Command(php, "-l", f).CombinedOutput(); err != nil {
			t.Errorf("php -l %s: %v\n%s", f, err, out)
		}
	}
}

// callout returns a queue node call-out for prefix to url.
func callout(t *testing.T, spec string) queuenode.Callout {
	t.Helper()
	c, err := queuenode.ParseCallout(spec)
	if err != nil {
		t.Fatalf("ParseCallout(%q): %v", spec, err)
	}
	return c
}

// TestCallouts runs backend.php as the call-out target of /room/ and checks
// its policy through Go clients, then the failure policy once it is gone.
func TestCallouts(t *testing.T) {
	b := startBackend(t)
	d := startDev(t, func(c *launch.DevConfig) {
		c.QueueNode.Callouts = []queuenode.Callout{callout(t, "/room/="+b.url+"/imq/room")}
		c.QueueNode.CalloutTimeout = time.Second
	})
	ctx := testutil.Context(t, 6*wait)
	const q = "/room/callouts"

	// The backend answers the hooks directly too.
	if status, body := b.post(t, "/imq/room/join", `{"hook":"join","user":"x"`); status != http.StatusBadRequest || !strings.Contains(body, "error") {
		t.Errorf("malformed join: %d %s, want 400 with an error", status, body)
	}

	t.Run("banned join denied", func(t *testing.T) {
		c := dial(t, d, client.WithUser("banned-bob"))
		_, err := c.Join(ctx, q, client.Messages("chat"))
		if e := codeOf(t, err); e.Code != imqpb.Code_DENIED || e.Message != "you are banned from this room" {
			t.Errorf("banned join: %v, want DENIED with the backend's reason", err)
		}
	})

	alice := dial(t, d, client.WithUser("alice"))
	sub, err := alice.Join(ctx, q, client.Messages("chat"), client.State("scores"))
	if err != nil {
		t.Fatalf("alice's join: %v", err)
	}
	bob := dial(t, d, client.WithUser("bob"))

	t.Run("join seeds state", func(t *testing.T) {
		if got := sub.State("scores"); string(got["started"]) != "true" {
			t.Errorf("scores after join = %q, want started=true seeded by the backend", got)
		}
	})

	t.Run("publish rewritten", func(t *testing.T) {
		if _, err := bob.Publish(ctx, q, "chat", []byte(`{"text":"darn it","x":1}`)); err != nil {
			t.Fatal(err)
		}
		u := nextUpdate(t, sub, "bob's JSON message", func(u client.Update) bool { return u.Kind == client.KindEvent })
		if u.Sender != "bob" || !jsonEqual(u.Payload, []byte(`{"text":"d**n it","x":1}`)) {
			t.Errorf("alice got %s from %q, want the rewritten text from bob", u.Payload, u.Sender)
		}
		if _, err := bob.Publish(ctx, q, "chat", []byte("oh darn\x00")); err != nil {
			t.Fatal(err)
		}
		u = nextUpdate(t, sub, "bob's raw message", func(u client.Update) bool { return u.Kind == client.KindEvent })
		if string(u.Payload) != "oh d**n\x00" {
			t.Errorf("alice got %q, want the rewritten raw bytes", u.Payload)
		}
		if _, err := bob.Publish(ctx, q, "chat", []byte(`{"text":"all fine"}`)); err != nil {
			t.Fatal(err)
		}
		u = nextUpdate(t, sub, "bob's unchanged message", func(u client.Update) bool { return u.Kind == client.KindEvent })
		if string(u.Payload) != `{"text":"all fine"}` {
			t.Errorf("alice got %s, want the bytes as published", u.Payload)
		}
	})

	t.Run("publish denied", func(t *testing.T) {
		_, err := bob.Publish(ctx, q, "chat", []byte(`{"text":"this is Forbidden"}`))
		if e := codeOf(t, err); e.Code != imqpb.Code_DENIED || e.Message != "message contains a forbidden word" {
			t.Errorf("forbidden publish: %v, want DENIED with the backend's reason", err)
		}
		// Outside the call-out's prefix nobody is asked.
		if _, err := bob.Publish(ctx, "/lobby/callouts", "chat", []byte(`"forbidden"`)); err != nil {
			t.Errorf("publish to /lobby/ (no call-out): %v", err)
		}
		if _, err := bob.Publish(ctx, q, "chat", []byte(`"fence"`)); err != nil {
			t.Fatal(err)
		}
		u := nextUpdate(t, sub, "the fence", func(u client.Update) bool { return u.Kind == client.KindEvent })
		if string(u.Payload) != `"fence"` {
			t.Errorf("alice got %s, want nothing before the fence", u.Payload)
		}
	})

	t.Run("state change checked", func(t *testing.T) {
		if _, err := bob.SetState(ctx, q, "scores", "_admin", []byte(`true`)); codeOf(t, err).Code != imqpb.Code_FORBIDDEN ||
			codeOf(t, err).Message != "keys starting with _ are set by the server" {
			t.Errorf("a server key's change: %v, want FORBIDDEN with the backend's reason", err)
		}
		if _, err := bob.DeleteState(ctx, q, "scores", "_admin"); codeOf(t, err).Code != imqpb.Code_FORBIDDEN {
			t.Errorf("a server key's delete: %v, want FORBIDDEN", err)
		}
		if _, err := bob.SetState(ctx, q, "scores", "bob", []byte("\xff raw")); err != nil {
			t.Fatalf("bob's own key: %v", err)
		}
		u := nextUpdate(t, sub, "bob's state change", func(u client.Update) bool { return u.Kind == client.KindStateSet && u.Key != "started" })
		if u.Key != "bob" || string(u.Payload) != "\xff raw" {
			t.Errorf("alice got state %q=%q, want only bob's allowed change", u.Key, u.Payload)
		}
		// An empty value is a set, not a delete: the node sends it as
		// "value_base64": "", which the backend allows.
		if _, err := bob.SetState(ctx, q, "scores", "bob/empty", nil); err != nil {
			t.Fatalf("bob's empty value: %v", err)
		}
		u = nextUpdate(t, sub, "bob's empty state value", func(u client.Update) bool { return u.Kind == client.KindStateSet && u.Key == "bob/empty" })
		if len(u.Payload) != 0 {
			t.Errorf("alice got %q for bob's empty value", u.Payload)
		}
		// So is an empty payload, as "data_base64": "".
		if _, err := bob.Publish(ctx, q, "chat", nil); err != nil {
			t.Fatalf("bob's empty publish: %v", err)
		}
		u = nextUpdate(t, sub, "bob's empty message", func(u client.Update) bool { return u.Kind == client.KindEvent })
		if len(u.Payload) != 0 || u.Sender != "bob" {
			t.Errorf("alice got %q from %q, want bob's empty message", u.Payload, u.Sender)
		}
	})

	t.Run("leave logged", func(t *testing.T) {
		if err := sub.Leave(ctx); err != nil {
			t.Fatal(err)
		}
		testutil.WaitForNoError(t, wait, "the leave in the backend's log", func() error {
			data, err := os.ReadFile(b.leaveLog)
			if err != nil {
				return err
			}
			for line := range strings.Lines(string(data)) {
				var l struct{ User, Session, Queue string }
				if json.Unmarshal([]byte(line), &l) == nil && l.User == "alice" && l.Queue == q && l.Session == alice.Session() {
					return nil
				}
			}
			return fmt.Errorf("no line for alice in %q", data)
		})
	})

	t.Run("slow backend refuses", func(t *testing.T) {
		if status, body := b.post(t, "/slow", `{"ms":3000}`); status != http.StatusOK {
			t.Fatalf("POST /slow: %d %s", status, body)
		}
		defer b.post(t, "/slow", `{"ms":0}`)
		c := dial(t, d, client.WithUser("carol"))
		type joinEnd struct {
			err  error
			took time.Duration
		}
		joined := make(chan joinEnd, 1)
		go func() {
			start := time.Now()
			_, err := c.Join(ctx, q, client.Messages("chat"))
			joined <- joinEnd{err, time.Since(start)}
		}()
		// While carol's call-out waits, the node serves others. A php -S
		// worker may accept a connection and leave it queued behind the
		// sleeping call-out, so each poll gives up quickly and tries again.
		poll := &http.Client{Timeout: 200 * time.Millisecond}
		testutil.WaitForNoError(t, wait, "carol's call-out waiting in the backend", func() error {
			resp, err := poll.Get(b.url + "/slow")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			var st struct{ Started int }
			if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
				return err
			}
			if st.Started == 0 {
				return errors.New("no call-out has started")
			}
			return nil
		})
		pub := time.Now()
		if _, err := bob.Publish(ctx, "/lobby/callouts", "chat", []byte(`"meanwhile"`)); err != nil {
			t.Errorf("publish to /lobby/ while a call-out waits: %v", err)
		}
		if el := time.Since(pub); el > 500*time.Millisecond {
			t.Errorf("a publish without a call-out took %s while another's call-out waited", el)
		}
		var end joinEnd
		select {
		case end = <-joined:
		case <-time.After(wait):
			t.Fatal("the join did not end")
		}
		wantBackendFailure(t, "join with a slow backend", end.err)
		if end.took > 2500*time.Millisecond {
			t.Errorf("the join took %s: the 1s call-out timeout did not apply", end.took)
		}
	})

	t.Run("backend down refuses", func(t *testing.T) {
		b.stop(t)
		c := dial(t, d, client.WithUser("dave"))
		_, err := c.Join(ctx, q, client.Messages("chat"))
		wantBackendFailure(t, "join with the backend down", err)
		_, err = bob.Publish(ctx, q, "chat", []byte(`"hello?"`))
		wantBackendFailure(t, "publish with the backend down", err)
		// Queues without a call-out are not affected.
		if _, err := bob.Publish(ctx, "/lobby/callouts", "chat", []byte(`"still here"`)); err != nil {
			t.Errorf("publish to /lobby/ with the backend down: %v", err)
		}
	})
}

// TestCalloutFailOpen: with CalloutFailOpen, a backend that is down lets
// joins and publishes through unchanged.
func TestCalloutFailOpen(t *testing.T) {
	b := startBackend(t)
	d := startDev(t, func(c *launch.DevConfig) {
		c.QueueNode.Callouts = []queuenode.Callout{callout(t, "/room/="+b.url+"/imq/room")}
		c.QueueNode.CalloutTimeout = time.Second
		c.QueueNode.CalloutFailOpen = true
	})
	ctx := testutil.Context(t, 6*wait)
	const q = "/room/fail-open"
	// While it is up, its policy holds.
	banned := dial(t, d, client.WithUser("banned-eve"))
	if _, err := banned.Join(ctx, q, client.Messages("chat")); codeOf(t, err).Code != imqpb.Code_DENIED {
		t.Errorf("banned join with the backend up: %v, want DENIED", err)
	}
	b.stop(t)
	eve := dial(t, d, client.WithUser("banned-frank"))
	sub, err := eve.Join(ctx, q, client.Messages("chat"))
	if err != nil {
		t.Fatalf("join with the backend down and fail-open: %v", err)
	}
	if _, err := eve.Publish(ctx, q, "chat", []byte(`{"text":"darn, forbidden"}`)); err != nil {
		t.Fatalf("publish with the backend down and fail-open: %v", err)
	}
	u := nextUpdate(t, sub, "the publish", func(u client.Update) bool { return u.Kind == client.KindEvent })
	if string(u.Payload) != `{"text":"darn, forbidden"}` {
		t.Errorf("got %s, want the payload unchanged", u.Payload)
	}
}

// TestAuthCallout: the gateway asks backend.php about connect tokens.
func TestAuthCallout(t *testing.T) {
	b := startBackend(t)
	d := startDev(t, func(c *launch.DevConfig) {
		c.Gateway.AuthURL = b.url + "/imq/auth"
	})
	c := dial(t, d, client.WithToken("letmein-alice"))
	if c.User() != "alice" {
		t.Errorf("connected as %q, want alice", c.User())
	}
	ctx := testutil.Context(t, 6*wait)
	_, err := client.Dial(ctx, d.URL(), client.WithToken("let-me-in-please"))
	if e := codeOf(t, err); e.Code != imqpb.Code_UNAUTHORIZED || !strings.Contains(e.Message, "unknown token") {
		t.Errorf("bad token: %v, want UNAUTHORIZED with the backend's reason", err)
	}
}
