package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// The JWKS (RFC 7517) of a login service, fetched from Config.JWKSURL:
// every JWKSRefresh in the background, and again when a token names a key id
// the cache lacks (a rotated key), but at most once per JWKSMinRefetch, so
// that a flood of tokens with made-up key ids cannot hammer the login
// service. One fetch runs at a time; connects needing it wait for it.

// maxJWKSBytes bounds a JWKS document; a larger one fails the fetch.
const maxJWKSBytes = 1 << 20

// jwksCache holds the keys of the last good fetch; a failed fetch keeps
// them.
type jwksCache struct {
	url        string
	logURL     string // url with any password redacted
	client     *http.Client
	timeout    time.Duration
	refresh    time.Duration
	minRefetch time.Duration
	log        *slog.Logger
	onFetch    func(ok bool)   // counts fetches (metrics)
	ctx        context.Context // ends fetches at Shutdown

	mu       sync.Mutex
	byID     map[string]jwtKey // Guarded by mu: keys with a kid.
	noID     []jwtKey          // Guarded by mu: keys without one.
	fetched  bool              // Guarded by mu: a fetch has succeeded.
	lastTry  time.Time         // Guarded by mu: when the last fetch started.
	lastErr  error             // Guarded by mu: why the last fetch failed (nil: it did not).
	inflight chan struct{}     // Guarded by mu: closed when the running fetch ends; nil when none runs.
}

func newJWKSCache(ctx context.Context, cfg *Config, log *slog.Logger, onFetch func(bool)) *jwksCache {
	if cfg.JWKSURL == "" {
		return nil
	}
	logURL := cfg.JWKSURL
	if u, err := url.Parse(cfg.JWKSURL); err == nil {
		logURL = u.Redacted()
	}
	return &jwksCache{
		url: cfg.JWKSURL, logURL: logURL, timeout: cfg.JWKSTimeout, refresh: cfg.JWKSRefresh, minRefetch: cfg.JWKSMinRefetch,
		log: log, onFetch: onFetch, ctx: ctx, byID: map[string]jwtKey{},
		client: &http.Client{
			Timeout: cfg.JWKSTimeout,
			Transport: &http.Transport{
				Proxy:                 http.ProxyFromEnvironment,
				DialContext:           (&net.Dialer{Timeout: cfg.JWKSTimeout}).DialContext,
				TLSHandshakeTimeout:   cfg.JWKSTimeout,
				ResponseHeaderTimeout: cfg.JWKSTimeout,
				MaxIdleConns:          1,
				IdleConnTimeout:       time.Minute,
			},
			// A redirect could lead from https to http: refuse it.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// validJWKSURL accepts https URLs, and http ones to a loopback host (a
// login service beside the gateway, tests): keys fetched in the clear from
// elsewhere could be anyone's.
func validJWKSURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("JWKS URL %q is not an absolute URL", raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		host := u.Hostname()
		if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
			return nil
		}
		return fmt.Errorf("JWKS URL %q: use https (http only to a loopback host)", raw)
	}
	return fmt.Errorf("JWKS URL %q must be https://", raw)
}

// run keeps the cache fresh until ctx ends: a fetch now, then one every
// refresh (every minRefetch while fetches fail).
func (c *jwksCache) run(ctx context.Context) {
	for first := true; ; first = false {
		// The first round leaves out a fetch a connect has just made.
		err := c.refetch(ctx, !first)
		wait := c.refresh
		if err != nil {
			wait = c.minRefetch
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// lookup returns the key with id kid. found is false for an unknown kid
// (after a refetch, when one is allowed) and for kid "". err is
// errJWKSUnavailable while no fetch has succeeded.
func (c *jwksCache) lookup(ctx context.Context, kid string) (k jwtKey, found bool, err error) {
	c.mu.Lock()
	k, found = c.byID[kid]
	fetched := c.fetched
	c.mu.Unlock()
	if found && kid != "" {
		return k, true, nil
	}
	if fetched && kid == "" {
		return jwtKey{}, false, nil
	}
	c.refetch(ctx, false) // an unknown kid: perhaps a rotated key
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.fetched {
		return jwtKey{}, false, fmt.Errorf("%w: %v", errJWKSUnavailable, c.lastErr)
	}
	k, found = c.byID[kid]
	return k, found && kid != "", nil
}

// keysWithoutID returns the keys that carry no kid.
func (c *jwksCache) keysWithoutID() []jwtKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.noID
}

// refetch fetches the JWKS unless one fetched less than minRefetch ago
// (always when force), or joins the fetch already running. It returns the
// fetch's error.
func (c *jwksCache) refetch(ctx context.Context, force bool) error {
	c.mu.Lock()
	if done := c.inflight; done != nil {
		c.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.lastErr
	}
	if !force && !c.lastTry.IsZero() && time.Since(c.lastTry) < c.minRefetch {
		defer c.mu.Unlock()
		return c.lastErr
	}
	done := make(chan struct{})
	c.inflight, c.lastTry = done, time.Now()
	c.mu.Unlock()

	// The fetch is not bound to the waiting connect's ctx: others may wait
	// for it too. The client's timeout bounds it.
	byID, noID, err := c.fetch()
	c.onFetch(err == nil)
	c.mu.Lock()
	c.inflight, c.lastErr = nil, err
	if err == nil {
		c.byID, c.noID, c.fetched = byID, noID, true
	}
	c.mu.Unlock()
	close(done)
	if err != nil && c.ctx.Err() == nil {
		c.log.Warn("JWKS fetch failed; keeping the keys fetched before", "url", c.logURL, "err", err)
	}
	return err
}

// fetch gets and parses the JWKS. Keys it cannot use are skipped with a
// warning; a document without any usable key is an error.
func (c *jwksCache) fetch() (map[string]jwtKey, []jwtKey, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url, nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, nil, fmt.Errorf("no answer within %s", c.timeout)
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // clients see the cause, not the URL
		}
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, nil, fmt.Errorf("no complete answer within %s", c.timeout)
	case err != nil:
		return nil, nil, err
	case len(b) > maxJWKSBytes:
		return nil, nil, fmt.Errorf("the document is larger than %d bytes", maxJWKSBytes)
	}
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, nil, fmt.Errorf("not a JWKS: %v", err)
	}
	byID := map[string]jwtKey{}
	var noID []jwtKey
	for i, raw := range doc.Keys {
		k, err := parseJWK(raw)
		switch {
		case err != nil:
			c.log.Warn("JWKS key skipped", "url", c.logURL, "index", i, "err", err)
		case k.kid == "":
			noID = append(noID, k)
		case byID[k.kid].key != nil:
			c.log.Warn("JWKS key skipped: its kid is taken by an earlier key", "url", c.logURL, "kid", k.kid)
		default:
			byID[k.kid] = k
		}
	}
	if len(byID) == 0 && len(noID) == 0 {
		return nil, nil, fmt.Errorf("no usable signing key among its %d keys", len(doc.Keys))
	}
	return byID, noID, nil
}

// jwk is the part of a JSON Web Key the gateway reads.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	Crv string `json:"crv"`
	N   string `json:"n"`
	E   string `json:"e"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

// parseJWK turns one JWK into a key pinned to its algorithm: RSA to RS256,
// EC P-256 to ES256, P-384 to ES384, OKP Ed25519 to EdDSA. A key whose
// "alg" names another algorithm, or whose "use" is not "sig", is refused.
func parseJWK(raw []byte) (jwtKey, error) {
	var j jwk
	if err := json.Unmarshal(raw, &j); err != nil {
		return jwtKey{}, err
	}
	if j.Use != "" && j.Use != "sig" {
		return jwtKey{}, fmt.Errorf("key %q is for use %q, not sig", j.Kid, j.Use)
	}
	var pub any
	switch j.Kty {
	case "RSA":
		n, err1 := b64url(j.N)
		e, err2 := b64url(j.E)
		if err := errors.Join(err1, err2); err != nil || len(n) == 0 || len(e) == 0 || len(e) > 4 {
			return jwtKey{}, fmt.Errorf("RSA key %q: bad n or e", j.Kid)
		}
		exp := new(big.Int).SetBytes(e)
		if !exp.IsInt64() || exp.Int64() < 3 || exp.Int64()%2 == 0 {
			return jwtKey{}, fmt.Errorf("RSA key %q: bad exponent", j.Kid)
		}
		pub = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(exp.Int64())}
	case "EC":
		var curve elliptic.Curve
		switch j.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		default:
			return jwtKey{}, fmt.Errorf("EC key %q: curve %q (use P-256 or P-384)", j.Kid, j.Crv)
		}
		size := (curve.Params().BitSize + 7) / 8
		x, err1 := b64url(j.X)
		y, err2 := b64url(j.Y)
		if errors.Join(err1, err2) != nil || len(x) != size || len(y) != size {
			return jwtKey{}, fmt.Errorf("EC key %q: bad x or y", j.Kid)
		}
		k, err := ecdsa.ParseUncompressedPublicKey(curve, append(append([]byte{4}, x...), y...))
		if err != nil {
			return jwtKey{}, fmt.Errorf("EC key %q: %v", j.Kid, err)
		}
		pub = k
	case "OKP":
		x, err := b64url(j.X)
		if j.Crv != "Ed25519" || err != nil || len(x) != ed25519.PublicKeySize {
			return jwtKey{}, fmt.Errorf("OKP key %q: want an Ed25519 key (crv Ed25519, x of 32 bytes)", j.Kid)
		}
		pub = ed25519.PublicKey(x)
	default:
		return jwtKey{}, fmt.Errorf("key %q: key type %q (use RSA, EC or OKP)", j.Kid, j.Kty)
	}
	k, err := keyOf(j.Kid, pub)
	if err != nil {
		return jwtKey{}, fmt.Errorf("key %q: %v", j.Kid, err)
	}
	if j.Alg != "" && j.Alg != k.alg && !(k.alg == "EdDSA" && j.Alg == "Ed25519") {
		return jwtKey{}, fmt.Errorf("key %q: alg %q does not fit its key type (the gateway verifies %s with it)", j.Kid, j.Alg, k.alg)
	}
	return k, nil
}

// b64url decodes base64url with or without padding.
func b64url(s string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
}
