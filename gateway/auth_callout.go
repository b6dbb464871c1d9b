package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// The connect-time auth call-out (Config.AuthURL): a connect token that is
// not a valid JWT of this gateway is POSTed to the backend, which names the
// user or refuses.

const (
	// maxAuthAnswer bounds the backend's answer, in bytes; a longer one
	// refuses the token.
	maxAuthAnswer = 64 << 10
	// maxAuthReason bounds the backend's reason passed on to the client.
	maxAuthReason = 512
)

// authCallout asks the backend about tokens. Its slots bound the calls in
// flight.
type authCallout struct {
	url    string
	client *http.Client
	slots  chan struct{}
}

func newAuthCallout(cfg *Config) *authCallout {
	if cfg.AuthURL == "" {
		return nil
	}
	return &authCallout{
		url:   cfg.AuthURL,
		slots: make(chan struct{}, cfg.AuthCalloutConcurrency),
		client: &http.Client{
			Transport: &http.Transport{
				Proxy:               http.ProxyFromEnvironment,
				DialContext:         (&net.Dialer{Timeout: cfg.AuthCalloutTimeout, KeepAlive: 30 * time.Second}).DialContext,
				MaxIdleConns:        cfg.AuthCalloutConcurrency,
				MaxIdleConnsPerHost: cfg.AuthCalloutConcurrency,
				IdleConnTimeout:     90 * time.Second,
				TLSHandshakeTimeout: cfg.AuthCalloutTimeout,
			},
			// A redirect is an answer other than 200: a refusal.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// authenticate returns the user a connect token names: a JWT signed with
// the gateway's secret is accepted locally; any other token goes to the
// auth call-out when there is one.
func (s *Server) authenticate(token string) (string, error) {
	if len(s.cfg.JWTSecret) > 0 || s.auth == nil {
		user, err := verifyToken(s.cfg.JWTSecret, token)
		if err == nil || s.auth == nil {
			return user, err
		}
	}
	if token == "" {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "connect carries no token")
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.AuthCalloutTimeout)
	defer cancel()
	start := time.Now()
	user, outcome, err := s.auth.check(ctx, token, s.cfg.AuthCalloutTimeout)
	s.m.authCallouts.WithLabelValues(outcome).Inc()
	s.m.authSeconds.Observe(time.Since(start).Seconds())
	if outcome == "failed" {
		s.log.Warn("auth call-out failed", "url", s.auth.url, "err", imqerr.From(err).Message)
	}
	return user, err
}

// check asks the backend about token. outcome is accepted, refused (the
// backend said no: UNAUTHORIZED) or failed (no usable answer: unreachable,
// timeout, a 5xx status, a malformed answer: a retryable UNAVAILABLE).
func (a *authCallout) check(ctx context.Context, token string, timeout time.Duration) (user, outcome string, err error) {
	refuse := func(outcome, format string, args ...any) (string, string, error) {
		code := imqpb.Code_UNAUTHORIZED
		if outcome == "failed" {
			// The backend refused nothing: the client may retry, and a
			// short backend outage does not log players out for good.
			code = imqpb.Code_UNAVAILABLE
		}
		return "", outcome, imqerr.New(code, format, args...)
	}
	select {
	case a.slots <- struct{}{}:
		defer func() { <-a.slots }()
	case <-ctx.Done():
		return refuse("failed", "the auth backend is busy; try again")
	}
	body, err := json.Marshal(map[string]string{"token": token})
	if err != nil {
		return refuse("failed", "encode the auth call-out: %v", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url, bytes.NewReader(body))
	if err != nil {
		return refuse("failed", "auth call-out: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return refuse("failed", "the auth backend did not answer within %s", timeout)
		}
		return refuse("failed", "the auth backend is unreachable")
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAuthAnswer+1))
	switch {
	case err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded):
		return refuse("failed", "the auth backend did not answer within %s", timeout)
	case err != nil:
		return refuse("failed", "reading the auth backend's answer: %v", err)
	case len(b) > maxAuthAnswer:
		return refuse("failed", "the auth backend's answer is larger than %d bytes", maxAuthAnswer)
	}
	var ans struct {
		User   string `json:"user"`
		Allow  *bool  `json:"allow"`
		Reason string `json:"reason"`
	}
	jsonErr := json.Unmarshal(b, &ans)
	reason := shortReason(ans.Reason)
	switch {
	case resp.StatusCode != http.StatusOK && reason != "":
		return refuse("refused", "%s", reason)
	case resp.StatusCode != http.StatusOK:
		outcome := "refused"
		if resp.StatusCode >= 500 {
			outcome = "failed"
		}
		return refuse(outcome, "the auth backend refused the token (HTTP %s)", strconv.Itoa(resp.StatusCode))
	case jsonErr != nil:
		return refuse("failed", "the auth backend's answer is not a JSON object")
	case ans.Allow != nil && !*ans.Allow, ans.User == "":
		if reason == "" {
			reason = "the auth backend refused the token"
		}
		return refuse("refused", "%s", reason)
	}
	if err := validUserID(ans.User); err != nil {
		return refuse("failed", "the auth backend named an invalid user: %s", imqerr.From(err).Message)
	}
	return ans.User, "accepted", nil
}

// shortReason bounds a backend's reason, on a UTF-8 boundary.
func shortReason(r string) string {
	if len(r) <= maxAuthReason {
		return r
	}
	n := maxAuthReason
	for n > 0 && !utf8.RuneStart(r[n]) {
		n--
	}
	return r[:n]
}
