package queuenode

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/imq-dev/imq/internal/clusterauth"
)

// bossCallTimeout bounds one call of the boss's API (a hand-off report, a
// drain or an undrain).
const bossCallTimeout = 10 * time.Second

// maxBossAnswer bounds the body of the boss's answer that is read.
const maxBossAnswer = 64 << 10

// errNoBoss: the membership names no boss with an API address yet.
var errNoBoss = errors.New("no boss known yet")

// postBoss POSTs body (JSON, or nothing) to the boss's API at path, signed
// with the node's first cluster key (unsigned without keys: an insecure
// boss takes that), and returns the status and the answer's body. The one
// way the queue node calls the boss: hand-off reports (handoff_out.go)
// and drains (drain.go). An error says no answer came; a call that may
// succeed later (no boss known, no connection) is the caller's to retry.
func (s *Server) postBoss(ctx context.Context, path string, body []byte) (status int, answer []byte, err error) {
	base, ok := s.cluster.BossURL()
	if !ok {
		return 0, nil, errNoBoss
	}
	ctx, cancel := context.WithTimeout(ctx, bossCallTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, fmt.Errorf("queuenode: %w", err)
	}
	if len(body) > 0 {
		req.Header.Set("Content-Type", "application/json")
	}
	if len(s.cfg.ClusterKeys) > 0 {
		if err := clusterauth.Sign(req, body, s.cfg.ClusterKeys[0], time.Now()); err != nil {
			return 0, nil, fmt.Errorf("queuenode: %w", err)
		}
	}
	resp, err := s.bossClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	answer, err = io.ReadAll(io.LimitReader(resp.Body, maxBossAnswer))
	if err != nil {
		return 0, nil, err
	}
	return resp.StatusCode, bytes.TrimSpace(answer), nil
}
