package boss

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/clusterauth"
	imqpb "github.com/imq-dev/imq/proto"
)

// This file holds the boss's actions: hand-off reports from queue nodes and
// the operators' drain and undrain. Handlers authenticate and decode; the
// reconcile goroutine, the only writer of the table, applies them (ops),
// so that an action and a reconcile never race and several actions that
// arrive together are published in one table.

const (
	// HandoffPath is where an old owner reports a finished hand-off.
	HandoffPath = "/v1/handoff"
	// maxOps bounds the actions waiting for the reconcile goroutine; one
	// more is answered 503 (retryable).
	maxOps = 256
	// opBatch is how long the reconcile goroutine waits for more actions
	// after the first, so that reports arriving close together share one
	// table version.
	opBatch = 20 * time.Millisecond
	// maxActionBody bounds the body of an action request.
	maxActionBody = 4 << 10
)

// The labels of imq_boss_actions_refused_total: the credential an action
// was refused for, and why.
const (
	credOperator = "operator" // a bearer operator key
	credCluster  = "cluster"  // a cluster-key signature (a member's)

	refusedNoKey   = "no_key"  // the boss has no key of that kind
	refusedMissing = "missing" // the request carries none
	refusedInvalid = "invalid" // a wrong key or a bad signature
	refusedStale   = "stale"   // a signature outside the time window
	refusedReplay  = "replay"  // a signature already used
	refusedBusy    = "busy"    // too many signed requests in the window
)

type opKind int

const (
	opReport opKind = iota
	opDrain
	opUndrain
)

// op is one action for the reconcile goroutine, which answers on reply.
type op struct {
	kind   opKind
	node   string        // drain, undrain
	report HandoffReport // report
	reply  chan opResult // cap 1
}

// opResult is the HTTP answer of an op: a JSON body, or an error.
type opResult struct {
	status int
	code   imqpb.Code // set for an error
	msg    string     // the error's message
	body   any
}

func opError(status int, code imqpb.Code, format string, args ...any) opResult {
	return opResult{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

// HandoffReport is the body of POST /v1/handoff: the old owner From
// finished handing Bucket off to To, as marked in table Version.
type HandoffReport struct {
	Version uint64 `json:"version"`
	Bucket  int    `json:"bucket"`
	From    string `json:"from"`
	To      string `json:"to"`
	// Bits is the table's bits the bucket number is in (optional; 0: the
	// boss's current table). When the table has split since, the report
	// covers every bucket that Bucket became.
	Bits int `json:"bits,omitempty"`
}

// HandoffAccepted is the answer of an accepted report.
type HandoffAccepted struct {
	TableVersion uint64 `json:"table_version"` // the version in which To owns the bucket
	Bucket       int    `json:"bucket"`
	From         string `json:"from"`
	To           string `json:"to"`
}

// DrainView is the answer of POST /v1/nodes/{id}/drain and undrain.
type DrainView struct {
	Node     string `json:"node"`
	Draining bool   `json:"draining"`
	// Changed is false when the node already was (drain) or was not
	// (undrain) draining.
	Changed      bool   `json:"changed"`
	TableVersion uint64 `json:"table_version"`
	// Buckets, MovingOut and MovingIn are the node's in the published
	// table after the action.
	Buckets   int `json:"buckets"`
	MovingOut int `json:"moving_out"`
	MovingIn  int `json:"moving_in"`
	// NoTarget (drain only) says no other live queue node can take the
	// node's buckets (every live one drains): they stay until one joins. A
	// queue node draining itself at SIGTERM stops waiting then.
	NoTarget bool   `json:"no_target,omitempty"`
	Message  string `json:"message"`
}

// serveHandoff answers POST /v1/handoff.
func (b *Boss) serveHandoff(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxActionBody))
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, imqpb.Code_PAYLOAD_TOO_LARGE, fmt.Sprintf("a hand-off report is at most %d bytes", maxActionBody))
		return
	}
	if b.reportAuth != nil {
		if err := b.reportAuth.Verify(r, body, time.Now()); err != nil {
			b.m.reportsRefused.Inc()
			b.refuseSigned(w, r, err)
			return
		}
	}
	var rep HandoffReport
	if err := json.Unmarshal(body, &rep); err != nil {
		httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "hand-off report: "+err.Error())
		return
	}
	if rep.From == "" || rep.To == "" || rep.Bucket < 0 || rep.Bits < 0 {
		httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, `hand-off report needs {"version", "bucket" (>= 0), "from", "to"}`)
		return
	}
	b.do(w, r, op{kind: opReport, report: rep})
}

// serveDrain answers POST /v1/nodes/{id}/drain and /undrain, from an
// operator (the operator key) or a cluster member (signed with the cluster
// key, see drainAuthorized).
func (b *Boss) serveDrain(kind opKind) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxActionBody))
		if err != nil {
			httpError(w, http.StatusRequestEntityTooLarge, imqpb.Code_PAYLOAD_TOO_LARGE, fmt.Sprintf("a drain request is at most %d bytes", maxActionBody))
			return
		}
		if !b.drainAuthorized(w, r, body) {
			return
		}
		id := r.PathValue("id")
		if id == "" || strings.ContainsAny(id, "/ \t\n") {
			httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, fmt.Sprintf("node id %q is not valid", id))
			return
		}
		b.do(w, r, op{kind: kind, node: id})
	}
}

// drainAuthorized reports whether r may drain or undrain a node, answering
// it when not. A request signed with the cluster key (clusterauth.Header)
// comes from a cluster member: a queue node asking to be drained at SIGTERM,
// or undrained when it starts again. The signature proves that the sender
// holds the cluster key, not which member it is, so any member may drain
// any node: cluster members are trusted (one holding the key can already
// join as a queue node and take buckets); the signature covers the path,
// so it names the node and cannot be replayed for another. Everyone else
// needs the operator key. A boss without a cluster key (insecure) takes no
// signed request: there, only the operator key drains.
func (b *Boss) drainAuthorized(w http.ResponseWriter, r *http.Request, body []byte) bool {
	if r.Header.Get(clusterauth.Header) == "" {
		return b.operator(w, r)
	}
	if b.reportAuth == nil {
		b.noteRefused(r, credCluster, refusedNoKey, nil)
		httpError(w, http.StatusForbidden, imqpb.Code_FORBIDDEN,
			"this boss has no cluster key (insecure): it cannot check a member's signature; drain with the operator key (Authorization: Bearer <key>)")
		return false
	}
	if err := b.reportAuth.Verify(r, body, time.Now()); err != nil {
		b.refuseSigned(w, r, err)
		return false
	}
	b.log.Info("drain request from a cluster member", "path", r.URL.Path, "remote", r.RemoteAddr)
	return true
}

// operator reports whether r carries an operator key, answering 403 (no key
// configured) or 401 when not.
func (b *Boss) operator(w http.ResponseWriter, r *http.Request) bool {
	if len(b.operatorDigests) == 0 {
		b.noteRefused(r, credOperator, refusedNoKey, nil)
		httpError(w, http.StatusForbidden, imqpb.Code_FORBIDDEN,
			"operator actions are disabled: start the boss with an operator key (IMQ_OPERATOR_KEY, or --operator-key-file) and send it as Authorization: Bearer <key>")
		return false
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if ok && b.isOperatorKey(token) {
		return true
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="imq-boss"`)
	msg, reason := "missing operator key: send Authorization: Bearer <operator key>", refusedMissing
	if ok {
		msg, reason = "wrong operator key", refusedInvalid
	}
	b.noteRefused(r, credOperator, reason, nil)
	httpError(w, http.StatusUnauthorized, imqpb.Code_UNAUTHORIZED, msg)
	return false
}

// isOperatorKey compares token with every operator key by their SHA-256
// digests, in constant time: neither how long a key is nor which one
// matched shows in the time the answer takes.
func (b *Boss) isOperatorKey(token string) bool {
	d := sha256.Sum256([]byte(token))
	match := 0
	for _, k := range b.operatorDigests {
		match |= subtle.ConstantTimeCompare(d[:], k[:])
	}
	return match == 1
}

// refuseSigned answers a request whose cluster-key signature did not
// verify: 503 when the verifier was too busy (retry), 401 otherwise.
func (b *Boss) refuseSigned(w http.ResponseWriter, r *http.Request, err error) {
	status, reason := http.StatusUnauthorized, refusedInvalid
	switch {
	case errors.Is(err, clusterauth.ErrBusy):
		status, reason = http.StatusServiceUnavailable, refusedBusy
	case errors.Is(err, clusterauth.ErrMissing):
		reason = refusedMissing
	case errors.Is(err, clusterauth.ErrStale):
		reason = refusedStale
	case errors.Is(err, clusterauth.ErrReplay):
		reason = refusedReplay
	}
	b.noteRefused(r, credCluster, reason, err)
	httpError(w, status, imqpb.Code_UNAUTHORIZED, err.Error())
}

// noteRefused counts a refused action and logs it, at most once per
// credential and reason every 10 s: a scan or a misconfigured member does
// not flood the log.
func (b *Boss) noteRefused(r *http.Request, cred, reason string, err error) {
	b.m.actionsRefused.WithLabelValues(cred, reason).Inc()
	if ok, skipped := b.refusedLog.Allow(cred+"/"+reason, time.Now()); ok {
		b.log.Warn("action refused", "path", r.URL.Path, "remote", r.RemoteAddr, "credential", cred, "reason", reason, "err", err, "skipped", skipped)
	}
}

// do hands o to the reconcile goroutine and writes its answer.
func (b *Boss) do(w http.ResponseWriter, r *http.Request, o op) {
	o.reply = make(chan opResult, 1)
	select {
	case b.ops <- o:
	default:
		httpError(w, http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "too many actions waiting for the boss; retry later")
		return
	}
	var res opResult
	select {
	case res = <-o.reply:
	case <-b.closing:
		httpError(w, http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "the boss is shutting down; retry with the next boss")
		return
	case <-r.Context().Done():
		return
	}
	if res.msg != "" {
		httpError(w, res.status, res.code, res.msg)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(res.status)
	json.NewEncoder(w).Encode(res.body)
}

// gatherOps returns first and the ops that arrive within opBatch of it (at
// most maxOps).
func (b *Boss) gatherOps(first op) []op {
	ops := []op{first}
	timer := time.NewTimer(opBatch)
	defer timer.Stop()
	for len(ops) < maxOps {
		select {
		case o := <-b.ops:
			ops = append(ops, o)
		case <-timer.C:
			return ops
		}
	}
	return ops
}

// applyDrains applies the drain and undrain ops to the draining set and
// reports whether it changed. known tells whether an id is a queue node
// the boss knows. Their answers are filled in by answerDrains after the
// commit.
func (b *Boss) applyDrains(ops []op, known func(string) bool) (changed bool, results map[int]bool) {
	results = make(map[int]bool) // op index → whether it changed the set
	for i, o := range ops {
		switch o.kind {
		case opDrain:
			if !known(o.node) && !b.draining[o.node] {
				continue
			}
			results[i] = !b.draining[o.node]
			b.draining[o.node] = true
		case opUndrain:
			results[i] = b.draining[o.node]
			delete(b.draining, o.node)
		default:
			continue
		}
		changed = changed || results[i]
	}
	if changed {
		b.publishDraining()
	}
	return changed, results
}

// answerDrains answers the drain and undrain ops from the published table t.
func (b *Boss) answerDrains(ops []op, results map[int]bool, t *bucket.Table, live int) {
	for i, o := range ops {
		if o.kind != opDrain && o.kind != opUndrain {
			continue
		}
		changed, ok := results[i]
		if !ok {
			o.reply <- opError(http.StatusNotFound, imqpb.Code_NOT_FOUND, "no queue node %q: it is neither live nor in the bucket table", o.node)
			continue
		}
		v := DrainView{Node: o.node, Draining: o.kind == opDrain, Changed: changed, TableVersion: t.Version(), Buckets: t.Counts()[o.node]}
		for _, m := range t.Moving() {
			if m.From == o.node {
				v.MovingOut++
			}
			if m.To == o.node {
				v.MovingIn++
			}
		}
		switch {
		case o.kind == opUndrain && !changed:
			v.Message = fmt.Sprintf("%s was not draining; nothing changed", o.node)
		case o.kind == opUndrain:
			v.Message = fmt.Sprintf("%s is back in the layout: buckets return to it as the table rebalances", o.node)
		case live == 0:
			v.NoTarget = true
			v.Message = fmt.Sprintf("%s is draining, but no other live queue node can take its %d buckets: they stay until one joins", o.node, v.Buckets)
		case v.Buckets == 0 && v.MovingIn == 0:
			v.Message = fmt.Sprintf("%s is draining and holds no buckets: it can be stopped", o.node)
		case !changed:
			v.Message = fmt.Sprintf("%s was already draining: %d buckets left, %d moving away now", o.node, v.Buckets, v.MovingOut)
		default:
			v.Message = fmt.Sprintf("%s is draining: %d buckets left, %d moving away now", o.node, v.Buckets, v.MovingOut)
		}
		o.reply <- opResult{status: http.StatusOK, body: v}
	}
}

// reportMoves checks the report ops against cur and returns the moves to
// complete, answering refused reports with 409 at once. accepted maps an
// op index to its moves.
func reportMoves(ops []op, cur *bucket.Table, alive []bucket.Node) (moves []bucket.Move, accepted map[int]bool) {
	accepted = make(map[int]bool)
	claimed := make(map[int]bool)
	for i, o := range ops {
		if o.kind != opReport {
			continue
		}
		r := o.report
		bits := r.Bits
		if bits == 0 {
			bits = cur.Bits()
		}
		switch {
		case r.Version > cur.Version():
			// The boss is behind (a restarted boss catching up): not a
			// refusal, the node tries again.
			o.reply <- opError(http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "hand-off report for table version %d, but the boss's table is version %d; retry", r.Version, cur.Version())
			continue
		case bits > cur.Bits() || r.Bucket >= 1<<bits:
			o.reply <- opError(http.StatusConflict, imqpb.Code_MOVED, "bucket %d (of %d bits) is not in table version %d (%d buckets)", r.Bucket, bits, cur.Version(), cur.Buckets())
			continue
		}
		shift := cur.Bits() - bits
		var ms []bucket.Move
		// A hand-off is a fact once the new owner holds the queues: it is
		// applied whether or not the table still marks it (a split or a new
		// layout may have changed the mark, or a move timeout given it up,
		// while the report was on its way), as long as the reporter still
		// owns the bucket and the new owner is live (Table.HandedOff).
		for sub := range 1 << shift {
			b := r.Bucket<<shift + sub
			if claimed[b] {
				ms = nil
				break
			}
			ms = append(ms, bucket.Move{Bucket: b, From: r.From, To: r.To})
		}
		if ms != nil && applied(cur, ms) {
			// A report sent again after its answer was lost: already in
			// the table. Saying so (200) keeps the node from concluding
			// that the new owner is gone.
			o.reply <- opResult{status: http.StatusOK, body: HandoffAccepted{TableVersion: cur.Version(), Bucket: r.Bucket, From: r.From, To: r.To}}
			continue
		}
		var err error
		if ms == nil {
			err = fmt.Errorf("bucket %d: another report in this batch claims it", r.Bucket)
		} else if _, errs := cur.HandedOff(ms, alive); errors.Join(errs...) != nil {
			err = errors.Join(errs...)
		}
		if err != nil {
			o.reply <- opError(http.StatusConflict, imqpb.Code_MOVED, "hand-off not accepted: %v", err)
			continue
		}
		for _, m := range ms {
			claimed[m.Bucket] = true
		}
		moves = append(moves, ms...)
		accepted[i] = true
	}
	return moves, accepted
}

// applied reports whether t already gives every bucket of ms to its To.
func applied(t *bucket.Table, ms []bucket.Move) bool {
	for _, m := range ms {
		if t.Owner(m.Bucket).ID != m.To {
			return false
		}
	}
	return true
}

// answerReports answers the accepted reports with the published version.
func answerReports(ops []op, accepted map[int]bool, v uint64) {
	for i, o := range ops {
		if accepted[i] {
			o.reply <- opResult{status: http.StatusOK, body: HandoffAccepted{TableVersion: v, Bucket: o.report.Bucket, From: o.report.From, To: o.report.To}}
		}
	}
}

// publishDraining stores a sorted snapshot of the draining set for readers.
// Reconcile goroutine (or New) only.
func (b *Boss) publishDraining() {
	ids := make([]string, 0, len(b.draining))
	for id := range b.draining {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	b.drainingView.Store(&ids)
}

// Draining returns the nodes an operator drained, sorted by id.
func (b *Boss) Draining() []string { return slices.Clone(*b.drainingView.Load()) }
