package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch/launchtest"
)

// nodesView is the part of the boss's /v1/nodes these tests read.
type nodesView struct {
	Members []struct {
		Role       string          `json:"role"`
		ID         string          `json:"id"`
		HTTPAddr   string          `json:"http_addr"`
		ClientAddr string          `json:"client_addr"`
		Varz       json.RawMessage `json:"varz"`
		VarzError  string          `json:"varz_error"`
	} `json:"members"`
}

// wantMember is what a test expects of one member in /v1/nodes: its internal
// and client addresses, and its id as its own /varz names it.
type wantMember struct {
	internal, client string
	varzID           func(json.RawMessage) string
}

func varzField(field string) func(json.RawMessage) string {
	return func(raw json.RawMessage) string {
		var m map[string]any
		json.Unmarshal(raw, &m)
		s, _ := m[field].(string)
		return s
	}
}

// nodesProblem says what in bossAddr's /v1/nodes differs from want (by
// member id), or "" when nothing does.
func nodesProblem(bossAddr string, want map[string]wantMember) string {
	resp, err := http.Get("http://" + bossAddr + "/v1/nodes")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	var v nodesView
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return err.Error()
	}
	if len(v.Members) != len(want) {
		return fmt.Sprintf("%d members, want %d", len(v.Members), len(want))
	}
	for _, m := range v.Members {
		w, ok := want[m.ID]
		switch {
		case !ok:
			return "unexpected member " + m.ID
		case m.VarzError != "" || len(m.Varz) == 0:
			return fmt.Sprintf("%s (%s): no varz: %q", m.ID, m.Role, m.VarzError)
		case m.HTTPAddr != w.internal || m.ClientAddr != w.client:
			return fmt.Sprintf("%s advertises internal %q, client %q; want %q, %q", m.ID, m.HTTPAddr, m.ClientAddr, w.internal, w.client)
		case w.varzID != nil && w.varzID(m.Varz) != m.ID:
			return fmt.Sprintf("%s's varz names %q", m.ID, w.varzID(m.Varz))
		}
	}
	return ""
}

func status(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestInternalListenerCluster: in a cluster of processes the gateways'
// client ports answer 404 for /varz, /v1/table and /metrics, their internal
// listeners serve them, and the boss's /v1/nodes shows every member's /varz,
// fetched from the internal address each advertises.
func TestInternalListenerCluster(t *testing.T) {
	c := startLocalCluster(t, 1, 2)
	want := map[string]wantMember{"boss": {internal: c.Boss.Addr("http")}}
	for _, n := range c.Nodes {
		want[n.Name] = wantMember{internal: n.Addr("internal"), varzID: varzField("node_id")}
	}
	for _, g := range c.Gateways {
		if g.Addr("internal") == "" || g.Addr("internal") == g.Addr("http") {
			t.Fatalf("%s: internal address %q, client %q", g.Name, g.Addr("internal"), g.Addr("http"))
		}
		want[g.Name] = wantMember{internal: g.Addr("internal"), client: g.Addr("http"), varzID: varzField("gateway_id")}
		for _, path := range []string{"/varz", "/v1/table", "/metrics"} {
			if st := status(t, "http://"+g.Addr("http")+path); st != http.StatusNotFound {
				t.Errorf("%s client port %s: %d, want 404", g.Name, path, st)
			}
			if st := status(t, "http://"+g.Addr("internal")+path); st != http.StatusOK {
				t.Errorf("%s internal %s: %d, want 200", g.Name, path, st)
			}
		}
		if st := status(t, "http://"+g.Addr("http")+"/healthz"); st != http.StatusOK {
			t.Errorf("%s client port /healthz: %d, want 200", g.Name, st)
		}
	}
	var last string
	defer func() {
		if t.Failed() {
			t.Logf("/v1/nodes: %s", last)
		}
	}()
	testutil.WaitFor(t, 15*time.Second, "/v1/nodes to show every member's varz", func() bool {
		last = nodesProblem(c.Boss.Addr("http"), want)
		return last == ""
	})
}

// TestDevNodesShowQueueNodeVarz: the imq dev binary's boss lists the queue
// node with its /varz (no varz_error), as it does the gateway and itself.
func TestDevNodesShowQueueNodeVarz(t *testing.T) {
	dev := launchtest.StartProcess(t, "dev", nil, "dev", "--addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--boss-addr", "127.0.0.1:0",
		"--link-addr", "127.0.0.1:0")
	bossAddr, nodeInternal := dev.Addr("boss"), dev.Addr("node_internal")
	want := map[string]wantMember{
		"boss":     {internal: bossAddr},
		"dev-node": {internal: nodeInternal, varzID: varzField("node_id")},
	}
	testutil.WaitFor(t, 15*time.Second, "the gateway to join", func() bool {
		var v nodesView
		getJSON(t, "http://"+bossAddr+"/v1/nodes", &v)
		for _, m := range v.Members {
			if m.Role == "gateway" {
				want[m.ID] = wantMember{internal: dev.Addr("internal"), client: dev.Addr("http"), varzID: varzField("gateway_id")}
				return true
			}
		}
		return false
	})
	var last string
	defer func() {
		if t.Failed() {
			t.Logf("/v1/nodes: %s", last)
		}
	}()
	testutil.WaitFor(t, 15*time.Second, "/v1/nodes to show every member's varz", func() bool {
		last = nodesProblem(bossAddr, want)
		return last == ""
	})
}
