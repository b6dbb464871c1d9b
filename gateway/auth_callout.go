package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
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
	// authWarnEvery rate-limits the warning logged when call-outs fail.
	authWarnEvery = 10 * time.Second
)

// authCallout asks the backend about tokens. Its slots bound the calls in
// flight.
type authCallout struct {
	url    string
	logURL string // url with any password redacted, for logs
	client *http.Client
	slots  chan struct{}
	// lastWarn is when a failure was last logged as a warning (Unix ns).
	lastWarn atomic.Int64
}

func newAuthCallout(cfg *Config) *authCallout {
	if cfg.AuthURL == "" {
		return nil
	}
	logURL := cfg.AuthURL
	if u, err := url.Parse(cfg.AuthURL); err == nil {
		logURL = u.Redacted()
	}
	return &authCallout{
		url:    cfg.AuthURL,
		logURL: logURL,
		slots:  make(chan struct{}, cfg.AuthCalloutConcurrency),
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

// authenticate returns the user a connect token names: a JWT that verifies
// (auth.go) is accepted locally; any other token goes to the auth call-out
// when there is one.
func (s *Server) authenticate(token string) (string, error) {
	if s.jwt.configured() || s.auth == nil {
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.JWKSTimeout)
		user, err := s.jwt.verify(ctx, token)
		cancel()
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
		// Once per authWarnEvery at warning level: a backend outage fails
		// every connect, and the metrics count them all.
		level, now, last := slog.LevelDebug, time.Now().UnixNano(), s.auth.lastWarn.Load()
		if now-last >= int64(authWarnEvery) && s.auth.lastWarn.CompareAndSwap(last, now) {
			level = slog.LevelWarn
		}
		s.log.Log(context.Background(), level, "auth call-out failed", "url", s.auth.logURL, "err", imqerr.From(err).Message)
	}
	return user, err
}

// check asks the backend about token. outcome is accepted, refused (the
// backend said no: UNAUTHORIZED) or failed (no usable answer: unreachable,
// timeout, a 5xx, 429 or 408 status with or without a reason, a malformed
// answer: a retryable UNAVAILABLE).
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
	case backendFailed(resp.StatusCode) && reason != "":
		// A 5xx, 429 or 408 judged no token, whatever its body says: a
		// backend in maintenance must not log its players out for good.
		return refuse("failed", "%s", reason)
	case backendFailed(resp.StatusCode):
		return refuse("failed", "the auth backend failed (HTTP %s)", strconv.Itoa(resp.StatusCode))
	case resp.StatusCode != http.StatusOK && reason != "":
		return refuse("refused", "%s", reason)
	case resp.StatusCode != http.StatusOK:
		return refuse("refused", "the auth backend refused the token (HTTP %s)", strconv.Itoa(resp.StatusCode))
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

// backendFailed reports whether an answer's HTTP status says the backend
// could not judge the token (server errors, rate limits, its own timeouts)
// rather than refused it.
func backendFailed(status int) bool {
	return status >= 500 || status == http.StatusTooManyRequests || status == http.StatusRequestTimeout
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
