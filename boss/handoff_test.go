package boss

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/clusterauth"
	"github.com/imq-dev/imq/internal/testutil"
	dto "github.com/prometheus/client_model/go"
)

var testClusterKey = []byte("cluster-key-for-tests")

const testOperatorKey = "operator-key-for-tests"

func handoffConfig(t *testing.T, dir string) Config {
	cfg := testConfig(t, dir)
	cfg.Handoff, cfg.MaxMoves = true, 3
	cfg.ClusterKeys = [][]byte{testClusterKey}
	cfg.OperatorKeys = [][]byte{[]byte(testOperatorKey)}
	return cfg
}

// reportReq builds a hand-off report of m, signed with key at `at` (key nil:
// unsigned).
func reportReq(t *testing.T, b *Boss, m bucket.Move, v uint64, key []byte, at time.Time) *http.Request {
	t.Helper()
	body, _ := json.Marshal(HandoffReport{Version: v, Bucket: m.Bucket, From: m.From, To: m.To})
	req, err := http.NewRequest(http.MethodPost, "http://"+b.Addr()+HandoffPath, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if key != nil {
		if err := clusterauth.Sign(req, body, key, at); err != nil {
			t.Fatal(err)
		}
	}
	return req
}

func do(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	buf.ReadFrom(resp.Body)
	return resp.StatusCode, buf.String()
}

func report(t *testing.T, b *Boss, m bucket.Move) (int, string) {
	t.Helper()
	return do(t, reportReq(t, b, m, b.Table().Version(), testClusterKey, time.Now()))
}

func action(t *testing.T, b *Boss, verb, node, bearer string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+b.Addr()+"/v1/nodes/"+node+"/"+verb, nil)
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	return do(t, req)
}

// settle reports every pending move as the old owners would, until the
// table has no moves and done holds.
func settle(t *testing.T, b *Boss, what string, done func(*bucket.Table) bool) *bucket.Table {
	t.Helper()
	testutil.WaitFor(t, 20*time.Second, what, func() bool {
		tb := b.Table()
		if tb.MovingCount() == 0 && done(tb) {
			return true
		}
		for _, m := range tb.Moving() {
			report(t, b, m) // a 409 is fine: the table may have moved on
		}
		return false
	})
	return b.Table()
}

func counts(tb *bucket.Table) map[string]int { return tb.Counts() }

func TestHandoffMarksAndCompletes(t *testing.T) {
	b, _ := startBoss(t, handoffConfig(t, t.TempDir()))
	startNode(t, b, "qn-1")
	first := waitNodes(t, b, "qn-1") // an empty table is filled at once
	if first.MovingCount() != 0 {
		t.Fatalf("first node's buckets marked moving: %v", first.Moving())
	}
	startNode(t, b, "qn-2")
	testutil.WaitFor(t, 10*time.Second, "moves to qn-2 marked", func() bool { return b.Table().MovingCount() > 0 })
	marked := b.Table()
	if got := counts(marked); got["qn-1"] != marked.Buckets() || got["qn-2"] != 0 {
		t.Fatalf("a bucket changed owner before its hand-off: %v", got)
	}
	if marked.MovingCount() != 3 || !slices.Contains(ids(marked), "qn-2") {
		t.Fatalf("want 3 (max moves) marked and the target listed: %v, nodes %v", marked.Moving(), ids(marked))
	}
	if ht := httpTable(t, b); ht.MovingCount() != 3 {
		t.Fatalf("/v1/table carries %d moves", ht.MovingCount())
	}

	m := marked.Moving()[0]
	refused := counter(t, b, "imq_boss_handoff_reports_refused_total")
	for name, req := range map[string]*http.Request{
		"unsigned":  reportReq(t, b, m, marked.Version(), nil, time.Now()),
		"other key": reportReq(t, b, m, marked.Version(), []byte("not the cluster key"), time.Now()),
		"stale":     reportReq(t, b, m, marked.Version(), testClusterKey, time.Now().Add(-time.Hour)),
	} {
		if code, body := do(t, req); code != http.StatusUnauthorized {
			t.Errorf("%s report: %d %s", name, code, body)
		}
	}
	if got := counter(t, b, "imq_boss_handoff_reports_refused_total"); got != refused+3 {
		t.Errorf("refused reports counted %v, want %v", got, refused+3)
	}
	if code, body := report(t, b, bucket.Move{Bucket: m.Bucket, From: m.From, To: "qn-9"}); code != http.StatusConflict || !strings.Contains(body, "not accepted") {
		t.Fatalf("report of a move not marked: %d %s", code, body)
	}
	if b.Table() != marked {
		t.Fatal("refused reports changed the table")
	}

	req := reportReq(t, b, m, marked.Version(), testClusterKey, time.Now())
	replay := req.Clone(req.Context())
	replay.Body, _ = req.GetBody()
	code, body := do(t, req)
	if code != http.StatusOK {
		t.Fatalf("report: %d %s", code, body)
	}
	var acc HandoffAccepted
	if err := json.Unmarshal([]byte(body), &acc); err != nil {
		t.Fatal(err)
	}
	after := b.Table()
	if acc.TableVersion <= marked.Version() || after.Version() < acc.TableVersion || after.Owner(m.Bucket).ID != "qn-2" {
		t.Fatalf("accepted %+v after v%d; now v%d owner %s", acc, marked.Version(), after.Version(), after.Owner(m.Bucket).ID)
	}
	if code, body := do(t, replay); code != http.StatusUnauthorized || !strings.Contains(body, "replayed") {
		t.Fatalf("replayed report: %d %s", code, body)
	}
	// A report sent again (its answer lost) is answered as applied, so that
	// the node does not conclude its new owner is gone.
	if code, body := report(t, b, m); code != http.StatusOK {
		t.Fatalf("second report of a completed move: %d %s", code, body)
	}
	if got := b.Table().Owner(m.Bucket).ID; got != "qn-2" {
		t.Fatalf("bucket %d owned by %s after the report was sent again, want qn-2", m.Bucket, got)
	}

	// A hand-off that happened is a fact even when the table no longer
	// marks it (a split, a new layout or a move timeout changed the mark
	// while the report was on its way): the reporter still owns the bucket
	// and the new owner is live, so the new owner gets it. Refusing would
	// leave the queues on a node the table does not name, the old owner
	// forwarding to it for good.
	unmarked := -1
	for bk := range after.Buckets() {
		if _, moving := after.Target(bk); !moving && after.Owner(bk).ID == "qn-1" {
			unmarked = bk
			break
		}
	}
	if unmarked < 0 {
		t.Fatalf("no unmarked bucket of qn-1 in %v", after)
	}
	if code, body := report(t, b, bucket.Move{Bucket: unmarked, From: "qn-1", To: "qn-2"}); code != http.StatusOK {
		t.Fatalf("report of a hand-off the table does not mark: %d %s", code, body)
	}
	if got := b.Table().Owner(unmarked).ID; got != "qn-2" {
		t.Fatalf("bucket %d owned by %s after its hand-off was reported, want qn-2", unmarked, got)
	}

	// Every move goes the same way, at most 3 at a time, to the layout.
	most := 0
	done := settle(t, b, "the table balanced between qn-1 and qn-2", func(tb *bucket.Table) bool {
		most = max(most, tb.MovingCount())
		c := counts(tb)
		return c["qn-1"] == c["qn-2"]
	})
	if most > 3 {
		t.Fatalf("%d moves at once, max 3", most)
	}
	// Half the buckets moved to qn-2, plus the unmarked hand-off above and
	// the move that took its bucket's place back to qn-1.
	if got := counter(t, b, "imq_boss_moves_completed_total"); got != float64(done.Buckets()/2+2) {
		t.Fatalf("moves completed %v, want %d", got, done.Buckets()/2+2)
	}
}

func TestHandoffDeadOwnerAssignedAtOnce(t *testing.T) {
	b, _ := startBoss(t, handoffConfig(t, t.TempDir()))
	qn1 := startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	startNode(t, b, "qn-2")
	testutil.WaitFor(t, 10*time.Second, "moves marked", func() bool { return b.Table().MovingCount() > 0 })
	qn1.Shutdown()
	tb := waitNodes(t, b, "qn-2")
	if tb.MovingCount() != 0 || counts(tb)["qn-2"] != tb.Buckets() {
		t.Fatalf("after qn-1 died: counts %v moving %v", counts(tb), tb.Moving())
	}
}

func TestHandoffMoveTimeout(t *testing.T) {
	cfg := handoffConfig(t, t.TempDir())
	cfg.MoveTimeout = 300 * time.Millisecond
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	startNode(t, b, "qn-2")
	testutil.WaitFor(t, 10*time.Second, "moves marked", func() bool { return b.Table().MovingCount() > 0 })
	first := b.Table()
	testutil.WaitFor(t, 10*time.Second, "a move given up", func() bool { return counter(t, b, "imq_boss_moves_given_up_total") > 0 })
	testutil.WaitFor(t, 10*time.Second, "moves marked again", func() bool {
		tb := b.Table()
		return tb.Version() > first.Version()+1 && tb.MovingCount() > 0
	})
	if c := counts(b.Table()); c["qn-2"] != 0 {
		t.Fatalf("a given-up move changed the owner: %v", c)
	}
}

func TestOperatorKeyRequired(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	code, body := action(t, b, "drain", "qn-1", "anything")
	if code != http.StatusForbidden || !strings.Contains(body, "IMQ_OPERATOR_KEY") {
		t.Fatalf("drain without an operator key configured: %d %s", code, body)
	}
	for _, path := range []string{"/v1/nodes", "/v1/table", "/varz", "/healthz"} {
		if resp, body := get(t, "http://"+b.Addr()+path); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s %s", path, resp.Status, body)
		}
	}
	// No cluster key: the boss is insecure and takes unsigned reports (here
	// of a move that does not exist: 409, not 401).
	if code, body := do(t, reportReq(t, b, bucket.Move{Bucket: 0, From: "qn-1", To: "qn-2"}, 1, nil, time.Now())); code != http.StatusConflict {
		t.Fatalf("unsigned report to an insecure boss: %d %s", code, body)
	}
}

func TestDrainHandoff(t *testing.T) {
	dir := t.TempDir()
	b1, stop1 := startBoss(t, handoffConfig(t, dir))
	startNode(t, b1, "qn-1")
	waitNodes(t, b1, "qn-1")
	startNode(t, b1, "qn-2")
	settle(t, b1, "balanced", func(tb *bucket.Table) bool { return counts(tb)["qn-1"] == counts(tb)["qn-2"] })

	for _, c := range []struct {
		bearer string
		want   int
	}{{"", http.StatusUnauthorized}, {"wrong", http.StatusUnauthorized}} {
		if code, body := action(t, b1, "drain", "qn-1", c.bearer); code != c.want {
			t.Fatalf("drain with %q: %d %s", c.bearer, code, body)
		}
	}
	if code, body := action(t, b1, "drain", "qn-9", testOperatorKey); code != http.StatusNotFound {
		t.Fatalf("drain of an unknown node: %d %s", code, body)
	}
	before := b1.Table()
	code, body := action(t, b1, "drain", "qn-1", testOperatorKey)
	var dv DrainView
	if err := json.Unmarshal([]byte(body), &dv); code != http.StatusOK || err != nil {
		t.Fatalf("drain: %d %s", code, body)
	}
	if !dv.Draining || !dv.Changed || dv.Buckets != counts(before)["qn-1"] || dv.MovingOut != 3 || !strings.Contains(dv.Message, "draining") {
		t.Fatalf("drain answered %+v", dv)
	}
	var nv NodesView
	_, raw := get(t, "http://"+b1.Addr()+"/v1/nodes")
	json.Unmarshal(raw, &nv)
	if !slices.Equal(nv.Draining, []string{"qn-1"}) || len(nv.Moving) != 3 || !nv.Handoff {
		t.Fatalf("/v1/nodes draining %v moving %v handoff %v", nv.Draining, nv.Moving, nv.Handoff)
	}
	for _, m := range nv.Members {
		if m.ID == "qn-1" && (!m.Draining || m.MovingOut != 3 || m.Status != StatusDraining) {
			t.Fatalf("qn-1 in /v1/nodes: %+v", m)
		}
		if m.ID == "qn-2" && m.MovingIn != 3 {
			t.Fatalf("qn-2 in /v1/nodes: %+v", m)
		}
	}
	drained := settle(t, b1, "qn-1 drained", func(tb *bucket.Table) bool { return slices.Equal(ids(tb), []string{"qn-2"}) })
	_, raw = get(t, "http://"+b1.Addr()+"/v1/nodes")
	json.Unmarshal(raw, &nv)
	for _, m := range nv.Members {
		if m.ID == "qn-1" && m.Status != StatusDrained {
			t.Fatalf("drained qn-1 in /v1/nodes: %+v", m)
		}
	}

	// A restarted boss keeps draining qn-1.
	stop1()
	b2, _ := startBoss(t, handoffConfig(t, dir))
	if !slices.Equal(b2.Draining(), []string{"qn-1"}) || jsonOf(t, b2.Table()) != jsonOf(t, drained) {
		t.Fatalf("restarted boss: draining %v, table %s", b2.Draining(), jsonOf(t, b2.Table()))
	}
	testutil.WaitFor(t, 10*time.Second, "the restarted boss to reconcile", func() bool { return b2.Ready() })
	waitReconcile(t, b2)
	if !slices.Equal(ids(b2.Table()), []string{"qn-2"}) {
		t.Fatalf("restarted boss gave qn-1 buckets back: %v", counts(b2.Table()))
	}

	code, body = action(t, b2, "undrain", "qn-1", testOperatorKey)
	if code != http.StatusOK || !strings.Contains(body, `"changed":true`) {
		t.Fatalf("undrain: %d %s", code, body)
	}
	settle(t, b2, "qn-1 back", func(tb *bucket.Table) bool {
		c := counts(tb)
		return c["qn-1"] > 0 && c["qn-1"] == c["qn-2"]
	})
	if len(b2.Draining()) != 0 {
		t.Fatalf("still draining %v", b2.Draining())
	}
}

// TestDrainWithoutHandoff: with hand-off off (today's nodes), a drain moves
// the node's buckets at once.
func TestDrainWithoutHandoff(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.OperatorKeys = [][]byte{[]byte(testOperatorKey)}
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	startNode(t, b, "qn-2")
	waitNodes(t, b, "qn-1", "qn-2")
	if code, body := action(t, b, "drain", "qn-2", testOperatorKey); code != http.StatusOK {
		t.Fatalf("drain: %d %s", code, body)
	}
	tb := b.Table()
	if !slices.Equal(ids(tb), []string{"qn-1"}) || tb.MovingCount() != 0 {
		t.Fatalf("after the drain's answer: nodes %v moving %v", ids(tb), tb.Moving())
	}
}

// memberAction is a drain or undrain of node signed with key at `at`, as a
// cluster member sends it (no operator key).
func memberAction(t *testing.T, b *Boss, verb, node string, key []byte, at time.Time) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+b.Addr()+"/v1/nodes/"+node+"/"+verb, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := clusterauth.Sign(req, nil, key, at); err != nil {
		t.Fatal(err)
	}
	return req
}

// TestDrainSignedByMember: a member holding the cluster key drains and
// undrains a node without the operator key; an unsigned request, a wrong
// key, a stale or replayed signature, or a signature for another node are
// refused; an insecure boss takes no signed request.
func TestDrainSignedByMember(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.ClusterKeys = [][]byte{[]byte("old-key"), testClusterKey} // either verifies
	cfg.OperatorKeys = [][]byte{[]byte(testOperatorKey)}
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	startNode(t, b, "qn-2")
	waitNodes(t, b, "qn-1", "qn-2")

	signedForOther := memberAction(t, b, "drain", "qn-1", testClusterKey, time.Now())
	signedForOther.URL.Path = "/v1/nodes/qn-2/drain"
	for name, req := range map[string]*http.Request{
		"unsigned":         memberAction(t, b, "drain", "qn-2", testClusterKey, time.Now()),
		"other key":        memberAction(t, b, "drain", "qn-2", []byte("not the cluster key"), time.Now()),
		"stale":            memberAction(t, b, "drain", "qn-2", testClusterKey, time.Now().Add(-time.Hour)),
		"signed for qn-1":  signedForOther,
		"operator key bad": memberAction(t, b, "drain", "qn-2", []byte("x"), time.Now()),
	} {
		switch name {
		case "unsigned":
			req.Header.Del(clusterauth.Header)
		case "operator key bad":
			req.Header.Del(clusterauth.Header)
			req.Header.Set("Authorization", "Bearer wrong")
		}
		if code, body := do(t, req); code != http.StatusUnauthorized {
			t.Errorf("%s drain: %d %s", name, code, body)
		}
	}
	if d := b.Draining(); len(d) != 0 {
		t.Fatalf("refused requests drained %v", d)
	}

	req := memberAction(t, b, "drain", "qn-2", testClusterKey, time.Now())
	replay := req.Clone(req.Context())
	code, body := do(t, req)
	var dv DrainView
	if code != http.StatusOK || json.Unmarshal([]byte(body), &dv) != nil || !dv.Draining || !dv.Changed || dv.NoTarget {
		t.Fatalf("signed drain: %d %s", code, body)
	}
	if tb := b.Table(); !slices.Equal(ids(tb), []string{"qn-1"}) || !slices.Equal(b.Draining(), []string{"qn-2"}) {
		t.Fatalf("after a signed drain: nodes %v draining %v", ids(tb), b.Draining())
	}
	if code, body := do(t, replay); code != http.StatusUnauthorized || !strings.Contains(body, "replayed") {
		t.Fatalf("replayed signed drain: %d %s", code, body)
	}
	// Draining the last node left in the layout: nowhere to go.
	code, body = do(t, memberAction(t, b, "drain", "qn-1", []byte("old-key"), time.Now()))
	if code != http.StatusOK || json.Unmarshal([]byte(body), &dv) != nil || !dv.NoTarget || dv.Buckets == 0 {
		t.Fatalf("drain of the last node: %d %s", code, body)
	}
	for _, n := range []string{"qn-1", "qn-2"} {
		if code, body := do(t, memberAction(t, b, "undrain", n, testClusterKey, time.Now())); code != http.StatusOK {
			t.Fatalf("signed undrain of %s: %d %s", n, code, body)
		}
	}
	if d := b.Draining(); len(d) != 0 {
		t.Fatalf("after signed undrains: draining %v", d)
	}
	waitNodes(t, b, "qn-1", "qn-2")
}

// TestDrainSignedInsecureBoss: a boss without a cluster key cannot check a
// signature, so a signed request without the operator key is refused.
func TestDrainSignedInsecureBoss(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.OperatorKeys = [][]byte{[]byte(testOperatorKey)}
	b, _ := startBoss(t, cfg)
	startNode(t, b, "qn-1")
	waitNodes(t, b, "qn-1")
	if code, body := do(t, memberAction(t, b, "drain", "qn-1", testClusterKey, time.Now())); code != http.StatusForbidden || !strings.Contains(body, "operator key") {
		t.Fatalf("signed drain to an insecure boss: %d %s", code, body)
	}
	if d := b.Draining(); len(d) != 0 {
		t.Fatalf("drained %v", d)
	}
}

// TestOperatorKeys: any of the operator keys is taken (rotation); a key's
// prefix, an extension of it, another key and none are refused, each
// counted by reason.
func TestOperatorKeys(t *testing.T) {
	const oldKey, newKey = "old-operator-key-0123456789", "new-operator-key-0123456789abcdef"
	cfg := testConfig(t, t.TempDir())
	cfg.OperatorKeys = [][]byte{[]byte(oldKey), []byte(newKey)}
	b, _ := startBoss(t, cfg)
	for _, key := range []string{oldKey, newKey} {
		// Authorized: qn-9 was not draining.
		if code, body := action(t, b, "undrain", "qn-9", key); code != http.StatusOK {
			t.Fatalf("undrain with %q: %d %s, want 200", key, code, body)
		}
	}
	for _, key := range []string{oldKey[:16], oldKey + "x", newKey[:len(newKey)-1], "wrong", ""} {
		if code, body := action(t, b, "undrain", "qn-9", key); code != http.StatusUnauthorized {
			t.Fatalf("undrain with %q: %d %s, want 401", key, code, body)
		}
	}
	if got := refusedCount(t, b, credOperator, refusedInvalid); got != 4 {
		t.Errorf("refused for an invalid operator key: %v, want 4", got)
	}
	if got := refusedCount(t, b, credOperator, refusedMissing); got != 1 {
		t.Errorf("refused for a missing operator key: %v, want 1", got)
	}
}

func refusedCount(t *testing.T, b *Boss, cred, reason string) float64 {
	t.Helper()
	var m dto.Metric
	if err := b.m.actionsRefused.WithLabelValues(cred, reason).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
