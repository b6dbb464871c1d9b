package queuenode

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/obs"
)

// TestInternalListener: with InternalAddr the node serves /metrics,
// /healthz, /varz and /v1/table itself, advertises that address in the
// membership (where the boss reads /varz), and stops serving at Shutdown.
func TestInternalListener(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member, cfg.InternalAddr = "qn-int", testMemberConfig(), "127.0.0.1:0"
	s := startNode(t, cfg)
	addr := s.InternalAddr()
	if addr == "" {
		t.Fatal("no internal address")
	}
	if got := s.cluster.Member().Meta().HTTPAddr; got != addr {
		t.Fatalf("membership advertises HTTP address %q, want the internal %s", got, addr)
	}
	for _, path := range []string{"/metrics", "/healthz", "/varz", cluster.TablePath} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s", path, resp.Status)
		}
		if path == "/varz" {
			var v Varz
			if err := json.Unmarshal(body, &v); err != nil || v.NodeID != "qn-int" {
				t.Fatalf("/varz %s (%v)", body, err)
			}
		}
	}
	if err := s.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.Get("http://" + addr + "/varz"); err == nil {
		resp.Body.Close()
		t.Fatalf("the internal listener still answers after Shutdown: %s", resp.Status)
	}
}

// TestNoInternalListener: without InternalAddr nothing is bound or
// advertised.
func TestNoInternalListener(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.Member = "qn-none", testMemberConfig()
	s := startNode(t, cfg)
	if s.InternalAddr() != "" || s.cluster.Member().Meta().HTTPAddr != "" {
		t.Fatalf("internal address %q, advertised %q; want none", s.InternalAddr(), s.cluster.Member().Meta().HTTPAddr)
	}
}

// TestInternalListenerLimits: the internal listener has the limits of every
// internal listener (obs.NewInternalServer): a 64 KiB header is refused
// with 431 (it had no header limit but the net/http default of 1 MiB), and
// the metrics carry the memory budget under their names.
func TestInternalListenerLimits(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.InternalAddr, cfg.MaxNodeBytes = "qn-limits", "127.0.0.1:0", 8<<20
	s := startNode(t, cfg)
	if s.internal.WriteTimeout != obs.InternalWriteTimeout || s.internal.ReadTimeout != obs.InternalReadTimeout {
		t.Errorf("write timeout %s, read timeout %s; want obs's %s and %s", s.internal.WriteTimeout, s.internal.ReadTimeout, obs.InternalWriteTimeout, obs.InternalReadTimeout)
	}
	req, err := http.NewRequest("GET", "http://"+s.InternalAddr()+"/varz", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("a 64 KiB header: %s, want 431", resp.Status)
	}
	resp, err = http.Get("http://" + s.InternalAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"\nimq_queuenode_budget_used_bytes 0\n", "\nimq_queuenode_budget_bytes 8.388608e+06\n"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", strings.TrimSpace(want))
		}
	}
}
