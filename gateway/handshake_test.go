package gateway_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawHTTP sends req, a hand-written HTTP request, to addr and returns the
// response, its body read.
func rawHTTP(t *testing.T, addr, req string) (*http.Response, []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return resp, body
}

// TestMalformedHandshakes: a request to /ws that cannot become a WebSocket is
// answered with a 4xx and the JSON error body, not an empty 200.
func TestMalformedHandshakes(t *testing.T) {
	d := startDev(t, nil)
	addr := d.Gateway.Addr()
	const key = "dGhlIHNhbXBsZSBub25jZQ=="
	handshake := func(method string, headers ...string) string {
		h := map[string]string{
			"Host": addr, "Upgrade": "websocket", "Connection": "Upgrade",
			"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": key, "Sec-WebSocket-Protocol": "imq.v1",
		}
		for i := 0; i+1 < len(headers); i += 2 {
			if headers[i+1] == "" {
				delete(h, headers[i])
			} else {
				h[headers[i]] = headers[i+1]
			}
		}
		var b strings.Builder
		b.WriteString(method + " /ws?user=alice HTTP/1.1\r\n")
		for k, v := range h {
			b.WriteString(k + ": " + v + "\r\n")
		}
		b.WriteString("\r\n")
		return b.String()
	}
	for _, tc := range []struct {
		name   string
		req    string
		status int
		header string // a header the answer must carry, "Name: value"
	}{
		{"version 8", handshake("GET", "Sec-WebSocket-Version", "8"), http.StatusUpgradeRequired, "Sec-Websocket-Version: 13"},
		{"no version", handshake("GET", "Sec-WebSocket-Version", ""), http.StatusUpgradeRequired, "Sec-Websocket-Version: 13"},
		{"no key", handshake("GET", "Sec-WebSocket-Key", ""), http.StatusBadRequest, ""},
		{"short key", handshake("GET", "Sec-WebSocket-Key", "c2hvcnQ="), http.StatusBadRequest, ""},
		{"key not base64", handshake("GET", "Sec-WebSocket-Key", "!!!!!!!!!!!!!!!!!!!!!!=="), http.StatusBadRequest, ""},
		{"no upgrade header", handshake("GET", "Upgrade", ""), http.StatusBadRequest, ""},
		{"no connection upgrade", handshake("GET", "Connection", "keep-alive"), http.StatusBadRequest, ""},
		{"POST", handshake("POST", "Content-Length", "0"), http.StatusMethodNotAllowed, "Allow: GET"},
		{"plain GET", "GET /ws HTTP/1.1\r\nHost: " + addr + "\r\n\r\n", http.StatusBadRequest, ""},
		{"HTTP/1.0", strings.Replace(handshake("GET"), "HTTP/1.1", "HTTP/1.0", 1), http.StatusHTTPVersionNotSupported, ""},
		{"body", handshake("GET", "Content-Length", "5") + "hello", http.StatusBadRequest, ""},
		{"chunked body", handshake("GET", "Transfer-Encoding", "chunked") + "0\r\n\r\n", http.StatusBadRequest, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := rawHTTP(t, addr, tc.req)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %q", resp.StatusCode, tc.status, body)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q, want application/json", ct)
			}
			var e struct {
				Error struct{ Code, Message string }
			}
			if err := json.Unmarshal(body, &e); err != nil || e.Error.Code != "BAD_REQUEST" || e.Error.Message == "" {
				t.Fatalf("body %q (%v), want a BAD_REQUEST error with a message", body, err)
			}
			if tc.header != "" {
				name, value, _ := strings.Cut(tc.header, ": ")
				if got := resp.Header.Get(name); got != value {
					t.Fatalf("header %s: %q, want %q", name, got, value)
				}
			}
		})
	}
	// A well-formed handshake on the same path still upgrades.
	if code := rawHTTPStatus(t, addr, handshake("GET")); code != http.StatusSwitchingProtocols {
		t.Fatalf("a valid handshake got %d, want 101", code)
	}
	// So does one with its first frame (an empty masked binary frame) sent
	// right behind it, in the same write: that is no HTTP body.
	if code := rawHTTPStatus(t, addr, handshake("GET")+"\x82\x80\x01\x02\x03\x04"); code != http.StatusSwitchingProtocols {
		t.Fatalf("a handshake with its first frame behind it got %d, want 101", code)
	}
}

// rawHTTPStatus sends req and returns only the status line's code: a 101
// answer has no body to read.
func rawHTTPStatus(t *testing.T, addr, req string) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, req)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}

// TestClientPortAnswersJSON: a request for a path the client port does not
// serve (a stray trailing slash, the root, a typo) or /healthz by POST gets
// a JSON error like every other answer of the port, not net/http's text.
func TestClientPortAnswersJSON(t *testing.T) {
	d := startDev(t, nil)
	for _, c := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/", http.StatusNotFound, "NOT_FOUND"},
		{"GET", "/ws/", http.StatusNotFound, "NOT_FOUND"},
		{"GET", "/metrics", http.StatusNotFound, "NOT_FOUND"},
		{"POST", "/nope", http.StatusNotFound, "NOT_FOUND"},
		{"POST", "/healthz", http.StatusMethodNotAllowed, "BAD_REQUEST"},
	} {
		req, err := http.NewRequest(c.method, "http://"+d.Gateway.Addr()+c.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var e struct {
			Error struct {
				Code string `json:"code"`
			} `json:"error"`
		}
		if resp.StatusCode != c.status || resp.Header.Get("Content-Type") != "application/json" || json.Unmarshal(b, &e) != nil || e.Error.Code != c.code {
			t.Errorf("%s %s: %d %q %s; want %d, JSON, code %s", c.method, c.path, resp.StatusCode, resp.Header.Get("Content-Type"), b, c.status, c.code)
		}
	}
	if resp, err := http.Get("http://" + d.Gateway.Addr() + "/healthz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: %v %v; want 200", resp, err)
	} else {
		resp.Body.Close()
	}
}
