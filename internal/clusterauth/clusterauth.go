// Package clusterauth signs and verifies HTTP requests between cluster
// members with the cluster key: a queue node reporting a finished hand-off
// to the boss proves it holds the key, and the key never travels.
//
// The signature is an HMAC-SHA256, keyed with the cluster key, over the
// method, the path, a timestamp, a random nonce and the body. It travels in
// one header (Header):
//
//	X-IMQ-Cluster-Auth: v1 t=1735830245,n=5f0c...(32 hex),s=9a1b...(64 hex)
//
// A Verifier accepts a request signed with any of its keys (rotation: sign
// with the first, accept them all) whose timestamp is within its window of
// the verifier's clock, and refuses a nonce it has already accepted within
// the window (a replay). Its memory of nonces is bounded.
//
// It imports only the standard library. A Verifier is safe for concurrent
// use; Sign is a pure function of its arguments and a random nonce.
package clusterauth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Header is the request header carrying the signature.
const Header = "X-IMQ-Cluster-Auth"

// DefaultWindow is how far a signed timestamp may be from the verifier's
// clock, either way. It bounds clock skew and how long nonces are kept.
const DefaultWindow = 30 * time.Second

// MaxNonces bounds the nonces a Verifier remembers. Past it (more than
// MaxNonces valid requests within one window) requests are refused with
// ErrBusy until old nonces expire: refusing is safe, forgetting is not.
const MaxNonces = 1 << 16

// Errors of Verify; each tells the operator what to look at.
var (
	ErrMissing = errors.New("clusterauth: request not signed with the cluster key (no " + Header + " header)")
	ErrInvalid = errors.New("clusterauth: bad signature: the sender does not hold this cluster's key, or altered the request")
	ErrStale   = errors.New("clusterauth: signature timestamp outside the accepted window: check the clocks")
	ErrReplay  = errors.New("clusterauth: replayed request: this signature was already used")
	ErrBusy    = errors.New("clusterauth: too many signed requests within the window; retry later")
)

const version = "v1"

// Sign sets req's Header to a signature over req's method and path, now,
// a fresh nonce and body (the bytes req will send; nil for none) with key.
func Sign(req *http.Request, body, key []byte, now time.Time) error {
	if len(key) == 0 {
		return errors.New("clusterauth: sign: empty key")
	}
	var n [16]byte
	if _, err := rand.Read(n[:]); err != nil {
		return fmt.Errorf("clusterauth: sign: %w", err)
	}
	ts := strconv.FormatInt(now.Unix(), 10)
	nonce := hex.EncodeToString(n[:])
	req.Header.Set(Header, fmt.Sprintf("%s t=%s,n=%s,s=%s", version, ts, nonce,
		hex.EncodeToString(mac(key, req.Method, req.URL.Path, ts, nonce, body))))
	return nil
}

func mac(key []byte, method, path, ts, nonce string, body []byte) []byte {
	h := hmac.New(sha256.New, key)
	// Lengths first, so that no two inputs share a MAC by shifting bytes
	// between fields.
	fmt.Fprintf(h, "imq-cluster-auth %s\n%d %d %d %d %d\n", version, len(method), len(path), len(ts), len(nonce), len(body))
	h.Write([]byte(method))
	h.Write([]byte(path))
	h.Write([]byte(ts))
	h.Write([]byte(nonce))
	h.Write(body)
	return h.Sum(nil)
}

// Verifier checks signed requests; see the package documentation.
type Verifier struct {
	keys   [][]byte
	window time.Duration

	mu   sync.Mutex
	seen map[string]time.Time // nonce → when it may be forgotten; guarded by mu
}

// NewVerifier returns a Verifier accepting keys (at least one) and
// timestamps within window of its clock (0: DefaultWindow).
func NewVerifier(keys [][]byte, window time.Duration) (*Verifier, error) {
	if len(keys) == 0 {
		return nil, errors.New("clusterauth: no keys to verify with")
	}
	for i, k := range keys {
		if len(k) == 0 {
			return nil, fmt.Errorf("clusterauth: key %d is empty", i+1)
		}
	}
	if window <= 0 {
		window = DefaultWindow
	}
	return &Verifier{keys: keys, window: window, seen: make(map[string]time.Time)}, nil
}

// Verify checks that req, whose body is body, carries a valid signature by
// one of the keys, timestamped within the window of now, with a nonce not
// seen before within the window. It returns nil or one of the errors above.
func (v *Verifier) Verify(req *http.Request, body []byte, now time.Time) error {
	hv := req.Header.Get(Header)
	if hv == "" {
		return ErrMissing
	}
	ts, nonce, sig, ok := parse(hv)
	if !ok {
		return fmt.Errorf("%w (malformed %s header)", ErrInvalid, Header)
	}
	good := false
	for _, k := range v.keys {
		if hmac.Equal(sig, mac(k, req.Method, req.URL.Path, ts, nonce, body)) {
			good = true
		}
	}
	if !good {
		return ErrInvalid
	}
	sec, _ := strconv.ParseInt(ts, 10, 64) // parse checked it
	at := time.Unix(sec, 0)
	if d := now.Sub(at); d > v.window || d < -v.window {
		return fmt.Errorf("%w (signed %s, now %s, window %s)", ErrStale, at.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), v.window)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, dup := v.seen[nonce]; dup {
		return ErrReplay
	}
	if len(v.seen) >= MaxNonces {
		for n, until := range v.seen {
			if now.After(until) {
				delete(v.seen, n)
			}
		}
		if len(v.seen) >= MaxNonces {
			return ErrBusy
		}
	}
	// A nonce is kept until its timestamp leaves the window: after that the
	// timestamp check refuses the request anyway.
	v.seen[nonce] = at.Add(v.window)
	return nil
}

// parse reads "v1 t=TS,n=NONCE,s=SIG".
func parse(hv string) (ts, nonce string, sig []byte, ok bool) {
	rest, found := strings.CutPrefix(hv, version+" ")
	if !found {
		return "", "", nil, false
	}
	for _, kv := range strings.Split(rest, ",") {
		k, val, _ := strings.Cut(kv, "=")
		switch k {
		case "t":
			ts = val
		case "n":
			nonce = val
		case "s":
			sig, _ = hex.DecodeString(val)
		}
	}
	if _, err := strconv.ParseInt(ts, 10, 64); err != nil || len(nonce) != 32 || len(sig) != sha256.Size {
		return "", "", nil, false
	}
	return ts, nonce, sig, true
}
