package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
)

// nodeWithWebSocket returns the node command line that has a global
// WebSocket (node 22 has it; 20.10 and later behind a flag), or skips.
func nodeWithWebSocket(t *testing.T) []string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed: the README's browser snippet is not run")
	}
	for _, cmd := range [][]string{{node}, {node, "--experimental-websocket"}} {
		check := exec.Command(cmd[0], append(cmd[1:], "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)")...)
		if check.Run() == nil {
			return cmd
		}
	}
	t.Skip("this node has no WebSocket: the README's browser snippet is not run")
	return nil
}

// readmeSnippet returns the first js block of README.md's section title.
func readmeSnippet(t *testing.T, title string) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## "+title+"\n")
	if !ok {
		t.Fatalf("README.md has no section %q", title)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	_, code, ok := strings.Cut(section, "```js\n")
	if !ok {
		t.Fatalf("README.md's %q has no js block", title)
	}
	code, _, _ = strings.Cut(code, "```")
	return code
}

// TestReadmeBrowserSnippet runs the README's browser console snippet in
// node against a development cluster: it joins, publishes and sets state
// with the frames the README shows, and logs what arrives, including an
// event from imq pub.
func TestReadmeBrowserSnippet(t *testing.T) {
	node := nodeWithWebSocket(t)
	snippet := readmeSnippet(t, "Try it without writing code")
	url := startDev(t)
	if !strings.Contains(snippet, defaultURL+"?user=alice") {
		t.Fatalf("the snippet does not connect to %s?user=alice:\n%s", defaultURL, snippet)
	}
	// console.log writes each call as one JSON array, for the test to read.
	script := "console.log = (...a) => process.stdout.write(JSON.stringify(a) + '\\n');\n" +
		strings.ReplaceAll(snippet, defaultURL, url)
	file := filepath.Join(t.TempDir(), "snippet.js")
	if err := os.WriteFile(file, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node[0], append(node[1:], file)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr testutil.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logged []map[string]json.RawMessage // the messages the snippet logged
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var call []json.RawMessage
			var m map[string]json.RawMessage
			if json.Unmarshal(sc.Bytes(), &call) != nil || len(call) != 2 || json.Unmarshal(call[1], &m) != nil {
				t.Errorf("the snippet logged %s, want \"<\" and a message", sc.Bytes())
				continue
			}
			mu.Lock()
			logged = append(logged, m)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-readDone
		cmd.Wait()
		if t.Failed() {
			t.Logf("node's stderr: %s", stderr.String())
		}
	})
	// has reports whether a logged message of kind holds every field of want.
	has := func(kind, want string) func() bool {
		var w map[string]any
		if err := json.Unmarshal([]byte(want), &w); err != nil {
			t.Fatal(err)
		}
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, m := range logged {
				var got map[string]any
				if json.Unmarshal(m[kind], &got) != nil {
					continue
				}
				match := true
				for k, v := range w {
					a, _ := json.Marshal(got[k])
					b, _ := json.Marshal(v)
					match = match && string(a) == string(b)
				}
				if match {
					return true
				}
			}
			return false
		}
	}
	for _, c := range []struct{ what, kind, want string }{
		{"the join's reply", "reply", `{"id":"1"}`},
		{"its own chat event", "event", `{"queue":"/room/1","mount":"chat","sender":"alice","payload":{"text":"hello from the console"}}`},
		{"its own state change", "state", `{"queue":"/room/1","mount":"scores","key":"alice","value":3220,"sender":"alice"}`},
	} {
		testutil.WaitFor(t, 15*time.Second, "the snippet to log "+c.what, has(c.kind, c.want))
	}
	mustRun(t, "", "pub", "/room/1", `{"text":"hi alice"}`, "--url", url, "--user", "bob")
	testutil.WaitFor(t, 10*time.Second, "the snippet to log imq pub's event", has("event", `{"sender":"bob","payload":{"text":"hi alice"}}`))
	mu.Lock()
	defer mu.Unlock()
	for _, m := range logged {
		r, ok := m["reply"]
		if !ok {
			continue
		}
		var reply map[string]json.RawMessage
		json.Unmarshal(r, &reply)
		if _, refused := reply["code"]; refused {
			t.Errorf("a request of the snippet was refused: %s", r)
		}
		if string(reply["id"]) == `"1"` && !strings.Contains(string(reply["joined"]), `"queue":"/room/1"`) {
			t.Errorf("the join's reply is %s, want joined /room/1", r)
		}
	}
}
