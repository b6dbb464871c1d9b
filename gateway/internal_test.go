package gateway_test

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/launch"
)

// TestInternalEndpointsOffTheClientPort: the client port serves /ws, the
// admin RPC and /healthz only; /varz, /v1/table and /metrics, which show
// internal addresses and load, are on the internal listener alone.
func TestInternalEndpointsOffTheClientPort(t *testing.T) {
	d := startRPC(t, nil)
	public, internal := d.Gateway.Addr(), d.Gateway.InternalAddr()
	if public == internal {
		t.Fatalf("one address %s for both listeners", public)
	}
	get := func(addr, path string) int {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, path := range []string{"/varz", "/v1/table", "/metrics"} {
		if got := get(public, path); got != http.StatusNotFound {
			t.Errorf("client port GET %s: %d, want 404", path, got)
		}
		if got := get(internal, path); got != http.StatusOK {
			t.Errorf("internal GET %s: %d, want 200", path, got)
		}
	}
	for _, addr := range []string{public, internal} {
		if got := get(addr, "/healthz"); got != http.StatusOK {
			t.Errorf("GET %s/healthz: %d, want 200 (load balancers check the client port)", addr, got)
		}
	}
	var v gateway.Varz
	getJSON(t, "http://"+internal+"/varz", &v)
	if v.Addr != public || v.InternalAddr != internal {
		t.Errorf("varz addresses %q and %q, want %s and %s", v.Addr, v.InternalAddr, public, internal)
	}

	// The admin RPC and WebSockets stay on the client port.
	if a := rpcDo(t, public, http.MethodPost, "publish", testAPIKey, `{"queue":"/room/split","mount":"chat","data":1}`, nil); a.status != http.StatusOK {
		t.Fatalf("client port publish: %s", a)
	}
	c := mustDial(t, d, "alice", false)
	c.connected()
	if got := get(internal, "/ws"); got != http.StatusNotFound {
		t.Errorf("internal GET /ws: %d, want 404", got)
	}
	// The internal listener takes kicks passed on by other gateways, and no
	// other RPC.
	req, _ := http.NewRequest(http.MethodPost, "http://"+internal+gateway.RPCPath+"publish", strings.NewReader(`{"queue":"/room/split","mount":"chat","data":1}`))
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("internal publish: %s, want 404", resp.Status)
	}
	// Kicks signed by a gateway only: an API key is for the client port.
	if a := rpcDo(t, internal, http.MethodPost, "kick", testAPIKey, `{"user":"nobody","local":true}`, nil); a.status != http.StatusUnauthorized {
		t.Errorf("internal kick with an API key: %s, want 401", a)
	}
	body := `{"user":"nobody","local":true}`
	sig := http.Header{"Authorization": {gateway.SignKick(testAPIKey, []byte(body), time.Now())}}
	if a := rpcDo(t, internal, http.MethodPost, "kick", "", body, sig); a.status != http.StatusOK {
		t.Errorf("internal signed kick: %s, want 200", a)
	}
}

// TestInternalAddrMustDiffer: one address for both listeners is a config
// error, not a bind failure.
func TestInternalAddrMustDiffer(t *testing.T) {
	cfg := launch.LocalDevConfig().Gateway
	cfg.QueueNode = "127.0.0.1:1"
	cfg.Addr, cfg.InternalAddr = "127.0.0.1:18080", "127.0.0.1:18080"
	gw, err := gateway.New(cfg)
	if err == nil {
		gw.Shutdown(t.Context())
		t.Fatal("New accepted the same address for the client port and the internal listener")
	}
	if !strings.Contains(err.Error(), "must differ") {
		t.Fatalf("error %q does not say the addresses must differ", err)
	}
}
