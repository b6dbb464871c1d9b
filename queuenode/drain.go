package queuenode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
)

// A queue node's part in a drain (README "Operations"): at SIGTERM it asks
// the boss to drain it (POST /v1/nodes/{id}/drain, signed with the cluster
// key: a member needs no operator key) and waits until its table says it
// holds nothing, so that it can stop without costing a room; when it starts
// again it asks to be undrained. The boss moves the buckets (by hand-off, or
// at once when the boss runs without it); the node only asks and watches.

// Errors of Drain and Undrain.
var (
	// ErrStandalone: a node without a cluster has no boss to drain it.
	ErrStandalone = errors.New("queuenode: standalone (no cluster): there is no boss to drain or undrain this node")
	// ErrNoClusterKey: an insecure node cannot sign the request, and a
	// boss takes a member's drain only signed; drain it with the operator
	// key (imq drain) instead.
	ErrNoClusterKey = errors.New("queuenode: no cluster key (insecure): the boss takes a member's drain or undrain only signed with one; use imq drain with the operator key")
	// ErrNoDrainTarget: the boss has no other live queue node to move the
	// buckets to (this node is the last one, or every other one drains).
	ErrNoDrainTarget = errors.New("queuenode: no other live queue node can take this node's buckets")
)

const (
	// bossRetryMax caps the pause between attempts while the boss cannot
	// be reached or answers 5xx (such as 503 while it catches up).
	bossRetryMax = 2 * time.Second
	// gatewayCheckInterval is how often Drain looks at the gateways'
	// advertised table versions once its own table says it is drained.
	gatewayCheckInterval = 100 * time.Millisecond
)

// drainAnswer is the part of the boss's answer to a drain or undrain
// (boss.DrainView) the node reads; services never import each other.
type drainAnswer struct {
	Changed      bool   `json:"changed"`
	TableVersion uint64 `json:"table_version"`
	Buckets      int    `json:"buckets"`
	MovingOut    int    `json:"moving_out"`
	MovingIn     int    `json:"moving_in"`
	NoTarget     bool   `json:"no_target"`
	Message      string `json:"message"`
}

// Drain asks the boss to drain this node and returns once the node is
// drained: its table shows it owns no bucket and no move from or to it,
// and every live gateway routes by such a table (their advertised version),
// so that stopping it reaches no client. While the boss cannot be reached
// (or answers 5xx) it retries with backoff. It logs progress as the
// buckets leave. It returns ctx's error, saying what is left, when ctx ends
// first; ErrNoDrainTarget at once when the boss has nowhere to move the
// buckets; ErrStandalone or ErrNoClusterKey when it cannot ask. The node
// stays in the boss's draining set (persisted) until Undrain or imq undrain.
func (s *Server) Drain(ctx context.Context) error {
	ans, err := s.bossAction(ctx, "drain")
	if err != nil {
		return err
	}
	if ans.NoTarget {
		return fmt.Errorf("%w: %s", ErrNoDrainTarget, ans.Message)
	}
	s.log.Info("drain requested", "buckets", ans.Buckets, "moving_out", ans.MovingOut, "moving_in", ans.MovingIn, "table_version", ans.TableVersion)
	// The answer's version holds the drain: wait for it, then for each
	// newer one until the node holds nothing.
	t, err := s.cluster.WaitVersion(ctx, ans.TableVersion)
	var last drainProgress
	for err == nil {
		p := progressOf(t, s.cfg.NodeID)
		if p.drained() {
			break
		}
		if p != last {
			s.log.Info("draining", "buckets_left", p.buckets, "moving_out", p.movingOut, "moving_in", p.movingIn,
				"queues", s.queueCount.Load(), "table_version", t.Version())
			last = p
		}
		t, err = s.cluster.WaitVersion(ctx, t.Version()+1)
	}
	if err != nil {
		p := progressOf(t, s.cfg.NodeID)
		return fmt.Errorf("queuenode: drain not finished (table version %d: %d buckets left, %d moving away, %d moving in): %w",
			t.Version(), p.buckets, p.movingOut, p.movingIn, err)
	}
	s.log.Info("drained: holds no bucket", "table_version", t.Version(), "queues", s.queueCount.Load())
	if err := s.waitGateways(ctx, t.Version()); err != nil {
		return err
	}
	return nil
}

// Undrain asks the boss to put this node back in the bucket layout, if it
// drains (a restarted node: the draining set outlives the process), and
// returns once the boss has answered; it retries while the boss cannot be
// reached, until ctx ends.
func (s *Server) Undrain(ctx context.Context) error {
	ans, err := s.bossAction(ctx, "undrain")
	if err != nil {
		return err
	}
	if ans.Changed {
		s.log.Info("undrained: back in the bucket layout; buckets come to it as the table rebalances", "table_version", ans.TableVersion)
	} else {
		s.log.Debug("not draining; nothing to undrain", "table_version", ans.TableVersion)
	}
	return nil
}

// drainProgress is what a table says of one node's buckets.
type drainProgress struct{ buckets, movingOut, movingIn int }

func progressOf(t *bucket.Table, id string) drainProgress {
	p := drainProgress{buckets: t.Counts()[id]}
	for _, m := range t.Moving() {
		if m.From == id {
			p.movingOut++
		}
		if m.To == id {
			p.movingIn++
		}
	}
	return p
}

// drained: the node owns nothing and nothing moves to or from it. A node
// may still hold queues of buckets it no longer owns (the hand-off's
// forwarding grace); those are not its to keep.
func (p drainProgress) drained() bool { return p == drainProgress{} }

// waitGateways waits until every live gateway advertises table version v
// or newer: then none routes a request to this node.
func (s *Server) waitGateways(ctx context.Context, v uint64) error {
	tick := time.NewTicker(gatewayCheckInterval)
	defer tick.Stop()
	for {
		behind := gatewaysBehind(s.cluster.Member().Peers(), v)
		if len(behind) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("queuenode: drained, but gateways %v still route by a table older than version %d: %w", behind, v, ctx.Err())
		case <-tick.C:
		}
	}
}

// gatewaysBehind returns the ids of the gateways among peers that hold a
// table older than v.
func gatewaysBehind(peers []member.Peer, v uint64) []string {
	var out []string
	for _, p := range peers {
		if p.Meta.Role == member.RoleGateway && p.Meta.TableVersion < v {
			out = append(out, p.Meta.ID)
		}
	}
	return out
}

// bossAction posts this node's drain or undrain (verb) to the boss, signed
// with the cluster key, and returns the boss's answer. It retries with
// backoff while no boss is known, the boss cannot be reached or answers
// 5xx, until ctx ends; any other answer but 200 is an error, except a 404
// to a drain (the boss knows no such node: it holds nothing), answered as
// an empty drain.
func (s *Server) bossAction(ctx context.Context, verb string) (drainAnswer, error) {
	if s.cluster == nil {
		return drainAnswer{}, ErrStandalone
	}
	if len(s.cfg.ClusterKeys) == 0 {
		return drainAnswer{}, ErrNoClusterKey
	}
	path := "/v1/nodes/" + url.PathEscape(s.cfg.NodeID) + "/" + verb
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		ans, retry, err := s.bossAttempt(ctx, path)
		if !retry {
			return ans, err
		}
		if attempt == 1 || attempt%10 == 0 {
			s.log.Warn("cannot reach the boss to "+verb+" this node; retrying", "err", err, "attempts", attempt)
		}
		select {
		case <-ctx.Done():
			return drainAnswer{}, fmt.Errorf("queuenode: %s: the boss did not answer: %w (last: %v)", verb, ctx.Err(), err)
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(2*backoff, bossRetryMax)
	}
}

// bossAttempt makes one attempt of bossAction; retry says a later one may
// succeed.
func (s *Server) bossAttempt(ctx context.Context, path string) (ans drainAnswer, retry bool, err error) {
	status, body, err := s.postBoss(ctx, path, nil)
	switch {
	case err != nil:
		return ans, ctx.Err() == nil, err
	case status == http.StatusOK:
		if err := json.Unmarshal(body, &ans); err != nil {
			return ans, false, fmt.Errorf("queuenode: the boss's answer to %s: %w", path, err)
		}
		return ans, false, nil
	case status == http.StatusNotFound && strings.HasSuffix(path, "/drain"):
		return drainAnswer{}, false, nil
	case status >= 500:
		return ans, true, fmt.Errorf("the boss answered %d: %s", status, body)
	}
	return ans, false, fmt.Errorf("queuenode: POST %s: the boss answered %d: %s", path, status, body)
}
