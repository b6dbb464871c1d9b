package gateway_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
)

// claims builds a token's claims: sub, then iat and exp relative to now
// (zero: left out), then any extra claims as name/value pairs.
func claims(sub string, iat, exp time.Duration, extra ...any) jwt.MapClaims {
	c := jwt.MapClaims{"sub": sub}
	now := time.Now()
	if iat != 0 {
		c["iat"] = now.Add(iat).Unix()
	}
	if exp != 0 {
		c["exp"] = now.Add(exp).Unix()
	}
	for i := 0; i+1 < len(extra); i += 2 {
		c[extra[i].(string)] = extra[i+1]
	}
	return c
}

// sign signs c with method and key, kid in the header unless empty.
func sign(t testing.TB, method jwt.SigningMethod, key any, kid string, c jwt.Claims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, c)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// connectWith opens a connection, sends connect with tok and returns the
// reply.
func connectWith(t testing.TB, d *launch.Dev, tok string) *imqpb.Reply {
	t.Helper()
	c, _, err := dialRaw(t, d, "", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: tok}}})
}

func expectConnect(t testing.TB, d *launch.Dev, tok string, code imqpb.Code, msgHas string) {
	t.Helper()
	r := connectWith(t, d, tok)
	expectCode(t, r, code)
	if !strings.Contains(r.GetMessage(), msgHas) {
		t.Fatalf("reply message %q does not mention %q", r.GetMessage(), msgHas)
	}
}

// TestJWTClaimRules: exp is required, the lifetime bounded, iss checked
// when configured and aud always, and no token picks a key type of its own.
func TestJWTClaimRules(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})

	plain := startDev(t, func(c *gateway.Config) { c.JWTMaxAge = time.Hour })
	hs := func(c jwt.Claims) string { return sign(t, jwt.SigningMethodHS256, testSecret, "", c) }
	for _, tc := range []struct {
		name   string
		tok    string
		code   imqpb.Code
		msgHas string
	}{
		{"exp and iat", hs(claims("ann", -time.Second, 30*time.Minute)), imqpb.Code_OK, ""},
		{"no exp", hs(claims("ann", -time.Second, 0)), imqpb.Code_UNAUTHORIZED, "exp"},
		{"expired", hs(claims("ann", -2*time.Hour, -time.Hour)), imqpb.Code_UNAUTHORIZED, "expired"},
		{"lifetime over max age", hs(claims("ann", -time.Second, 2*time.Hour)), imqpb.Code_UNAUTHORIZED, "--jwt-max-age"},
		{"no iat, exp too far", hs(claims("ann", 0, 2*time.Hour)), imqpb.Code_UNAUTHORIZED, "--jwt-max-age"},
		{"issued in the future", hs(claims("ann", time.Hour, 90*time.Minute)), imqpb.Code_UNAUTHORIZED, "before issued"},
		{"not yet valid", hs(claims("ann", 0, 30*time.Minute, "nbf", time.Now().Add(time.Minute).Unix())), imqpb.Code_UNAUTHORIZED, "not valid yet"},
		{"any aud without an audience configured", hs(claims("ann", 0, time.Minute, "aud", "imq")), imqpb.Code_UNAUTHORIZED, "audience"},
		{"iss without an issuer configured", hs(claims("ann", 0, time.Minute, "iss", "anyone")), imqpb.Code_OK, ""},
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "", claims("ann", 0, time.Minute)), imqpb.Code_UNAUTHORIZED, "signing method"},
		{"crit header", critToken(t), imqpb.Code_UNAUTHORIZED, "crit"},
		{"RS256 without public keys", sign(t, jwt.SigningMethodRS256, rsaKey, "", claims("ann", 0, time.Minute)), imqpb.Code_UNAUTHORIZED, "signing method"},
	} {
		t.Run(tc.name, func(t *testing.T) { expectConnect(t, plain, tc.tok, tc.code, tc.msgHas) })
	}

	strict := startDev(t, func(c *gateway.Config) {
		c.JWTAudience, c.JWTIssuer = "imq", "https://login.example.com"
		c.JWTPublicKeys = pubPEM
	})
	rs := func(c jwt.Claims) string { return sign(t, jwt.SigningMethodRS256, rsaKey, "", c) }
	const iss = "https://login.example.com"
	for _, tc := range []struct {
		name   string
		tok    string
		code   imqpb.Code
		msgHas string
	}{
		{"aud and iss", rs(claims("bo", 0, time.Minute, "aud", "imq", "iss", iss)), imqpb.Code_OK, ""},
		{"aud among several", rs(claims("bo", 0, time.Minute, "aud", []string{"chat", "imq"}, "iss", iss)), imqpb.Code_OK, ""},
		{"HS256 with the secret", hs(claims("bo", 0, time.Minute, "aud", "imq", "iss", iss)), imqpb.Code_OK, ""},
		{"no aud", rs(claims("bo", 0, time.Minute, "iss", iss)), imqpb.Code_UNAUTHORIZED, "aud"},
		{"another aud", rs(claims("bo", 0, time.Minute, "aud", "billing", "iss", iss)), imqpb.Code_UNAUTHORIZED, "audience"},
		{"no iss", rs(claims("bo", 0, time.Minute, "aud", "imq")), imqpb.Code_UNAUTHORIZED, "iss"},
		{"another iss", rs(claims("bo", 0, time.Minute, "aud", "imq", "iss", "https://evil.example.com")), imqpb.Code_UNAUTHORIZED, "issuer"},
		// Algorithm confusion: the public key as an HMAC secret.
		{"HS256 keyed with the public key", sign(t, jwt.SigningMethodHS256, pubPEM, "", claims("bo", 0, time.Minute, "aud", "imq", "iss", iss)), imqpb.Code_UNAUTHORIZED, "signature"},
		{"PS256 with the RSA key", sign(t, jwt.SigningMethodPS256, rsaKey, "", claims("bo", 0, time.Minute, "aud", "imq", "iss", iss)), imqpb.Code_UNAUTHORIZED, "signing method"},
	} {
		t.Run(tc.name, func(t *testing.T) { expectConnect(t, strict, tc.tok, tc.code, tc.msgHas) })
	}

	lax := startDev(t, func(c *gateway.Config) { c.JWTAllowNoExp = true })
	t.Run("no exp allowed", func(t *testing.T) {
		expectConnect(t, lax, hs(claims("cy", -time.Second, 0)), imqpb.Code_OK, "")
	})
}

// TestJWTPublicKeyFile: RSA, P-256 and Ed25519 public keys (and a
// certificate) verify tokens of their own algorithm only; a private key in
// the file is refused at start.
func TestJWTPublicKeyFile(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	edPub, edKey, _ := ed25519.GenerateKey(rand.Reader)
	certKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &certKey.PublicKey, certKey)
	if err != nil {
		t.Fatal(err)
	}
	var file []byte
	for _, pub := range []crypto.PublicKey{&rsaKey.PublicKey, &ecKey.PublicKey, edPub} {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		file = append(file, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})...)
	}
	file = append(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})...)

	d := startDev(t, func(c *gateway.Config) { c.JWTSecret, c.JWTPublicKeys = nil, file })
	c := claims("dee", 0, time.Minute)
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tc := range []struct {
		name   string
		tok    string
		code   imqpb.Code
		msgHas string
	}{
		{"RS256", sign(t, jwt.SigningMethodRS256, rsaKey, "", c), imqpb.Code_OK, ""},
		{"ES256", sign(t, jwt.SigningMethodES256, ecKey, "", c), imqpb.Code_OK, ""},
		{"EdDSA", sign(t, jwt.SigningMethodEdDSA, edKey, "", c), imqpb.Code_OK, ""},
		{"ES384 from the certificate", sign(t, jwt.SigningMethodES384, certKey, "any-kid", c), imqpb.Code_OK, ""},
		{"ES256 by another key", sign(t, jwt.SigningMethodES256, otherEC, "", c), imqpb.Code_UNAUTHORIZED, "signature"},
		{"HS256 without a secret", sign(t, jwt.SigningMethodHS256, testSecret, "", c), imqpb.Code_UNAUTHORIZED, "signing method"},
		{"RS512 with the RSA key", sign(t, jwt.SigningMethodRS512, rsaKey, "", c), imqpb.Code_UNAUTHORIZED, "signing method"},
	} {
		t.Run(tc.name, func(t *testing.T) { expectConnect(t, d, tc.tok, tc.code, tc.msgHas) })
	}

	t.Run("private key refused", func(t *testing.T) {
		der, _ := x509.MarshalPKCS8PrivateKey(ecKey)
		cfg := launch.LocalDevConfig().Gateway
		cfg.QueueNode = "127.0.0.1:1"
		cfg.JWTPublicKeys = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		if _, err := gateway.New(cfg); err == nil || !strings.Contains(err.Error(), "private key") {
			t.Fatalf("New with a private key: %v", err)
		}
	})
}

// jwksServer serves a JWKS document that a test may change, counting
// fetches.
type jwksServer struct {
	*httptest.Server
	mu      sync.Mutex
	keys    []map[string]string
	fetches atomic.Int64
}

func newJWKSServer(t *testing.T) *jwksServer {
	j := &jwksServer{}
	j.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		j.fetches.Add(1)
		j.mu.Lock()
		b, _ := json.Marshal(map[string]any{"keys": j.keys})
		j.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	}))
	t.Cleanup(j.Close)
	return j
}

func (j *jwksServer) add(k map[string]string) {
	j.mu.Lock()
	j.keys = append(j.keys, k)
	j.mu.Unlock()
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func rsaJWK(kid string, k *rsa.PublicKey) map[string]string {
	return map[string]string{"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(k.N.Bytes()), "e": b64(big.NewInt(int64(k.E)).Bytes())}
}

func ecJWK(kid string, k *ecdsa.PublicKey) map[string]string {
	b, _ := k.Bytes() // 0x04 || x || y
	return map[string]string{"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(b[1:33]), "y": b64(b[33:])}
}

func okpJWK(kid string, k ed25519.PublicKey) map[string]string {
	return map[string]string{"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(k)}
}

// TestJWKS: keys of the three types are chosen by kid from a cached JWKS;
// a rotated-in key is fetched on first use; forged key ids cost at most one
// fetch per JWKSMinRefetch.
func TestJWKS(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	edPub, edKey, _ := ed25519.GenerateKey(rand.Reader)
	srv := newJWKSServer(t)
	srv.add(rsaJWK("r1", &rsaKey.PublicKey))
	srv.add(ecJWK("e1", &ecKey.PublicKey))
	srv.add(okpJWK("o1", edPub))
	srv.add(map[string]string{"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}) // skipped: symmetric
	srv.add(map[string]string{"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"})

	d := startDev(t, func(c *gateway.Config) {
		c.JWTSecret, c.JWKSURL, c.JWKSMinRefetch = nil, srv.URL, time.Hour
	})
	c := claims("eli", 0, time.Minute)
	expectConnect(t, d, sign(t, jwt.SigningMethodRS256, rsaKey, "r1", c), imqpb.Code_OK, "")
	expectConnect(t, d, sign(t, jwt.SigningMethodES256, ecKey, "e1", c), imqpb.Code_OK, "")
	expectConnect(t, d, sign(t, jwt.SigningMethodEdDSA, edKey, "o1", c), imqpb.Code_OK, "")
	// A key verifies only its own algorithm, whatever the token's kid says.
	expectConnect(t, d, sign(t, jwt.SigningMethodHS256, []byte("c2VjcmV0"), "secret", c), imqpb.Code_UNAUTHORIZED, "signing method")
	expectConnect(t, d, sign(t, jwt.SigningMethodES256, ecKey, "r1", c), imqpb.Code_UNAUTHORIZED, "verifies RS256")
	if n := srv.fetches.Load(); n != 1 {
		t.Fatalf("%d JWKS fetches for tokens of known keys, want 1 (the cache)", n)
	}

	// Forged key ids: the first may cause a refetch, not the others (the
	// start's fetch was less than JWKSMinRefetch ago: none at all).
	for i := range 20 {
		kid := "forged-" + string(rune('a'+i))
		expectConnect(t, d, sign(t, jwt.SigningMethodRS256, rsaKey, kid, c), imqpb.Code_UNAUTHORIZED, kid)
	}
	if n := srv.fetches.Load(); n != 1 {
		t.Fatalf("%d JWKS fetches after 20 forged key ids, want still 1", n)
	}

	t.Run("rotation", func(t *testing.T) {
		srv := newJWKSServer(t)
		srv.add(rsaJWK("old", &rsaKey.PublicKey))
		d := startDev(t, func(c *gateway.Config) {
			c.JWTSecret, c.JWKSURL, c.JWKSMinRefetch = nil, srv.URL, 50*time.Millisecond
		})
		expectConnect(t, d, sign(t, jwt.SigningMethodRS256, rsaKey, "old", c), imqpb.Code_OK, "")
		newKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		srv.add(ecJWK("new", &newKey.PublicKey))
		tok := sign(t, jwt.SigningMethodES256, newKey, "new", c)
		start := time.Now()
		testutil.WaitFor(t, 5*time.Second, "the token accepted", func() bool { return connectWith(t, d, tok).GetCode() == imqpb.Code_OK })
		// At most one fetch per 50 ms since the start, and the first.
		if n, most := srv.fetches.Load(), int64(time.Since(start)/(50*time.Millisecond))+2; n > most {
			t.Fatalf("%d JWKS fetches, want at most %d", n, most)
		}
	})
}

// TestJWKSKeepsKeys: a JWKS that fails after a good fetch leaves the keys
// of that fetch in use.
func TestJWKSKeepsKeys(t *testing.T) {
	edPub, edKey, _ := ed25519.GenerateKey(rand.Reader)
	var failing atomic.Bool
	var fetches atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		if failing.Load() {
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{okpJWK("k1", edPub)}})
	}))
	t.Cleanup(srv.Close)
	d := startDev(t, func(c *gateway.Config) {
		c.JWTSecret, c.JWKSURL, c.JWKSMinRefetch = nil, srv.URL, 10*time.Millisecond
	})
	good := sign(t, jwt.SigningMethodEdDSA, edKey, "k1", claims("gus", 0, time.Minute))
	expectConnect(t, d, good, imqpb.Code_OK, "")
	failing.Store(true)
	before := fetches.Load()
	// An unknown kid makes the gateway fetch again, in vain.
	testutil.WaitFor(t, 5*time.Second, "an unknown kid refused after a fetch", func() bool {
		r := connectWith(t, d, sign(t, jwt.SigningMethodEdDSA, edKey, "k2", claims("gus", 0, time.Minute)))
		return r.GetCode() == imqpb.Code_UNAUTHORIZED && fetches.Load() > before
	})
	expectConnect(t, d, good, imqpb.Code_OK, "")
}

// TestJWKSFailures: a JWKS that is slow, too large, failing or not JSON
// gives a retryable UNAVAILABLE naming the cause, within the fetch timeout.
func TestJWKSFailures(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		msgHas  string
	}{
		{"slow", func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done() // the gateway gives up first
		}, "within"},
		{"oversized", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"keys":["` + strings.Repeat("x", 2<<20) + `"]}`))
		}, "larger than"},
		{"failing", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "down", http.StatusInternalServerError) }, "status 500"},
		{"not JSON", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("<html>")) }, "not a JWKS"},
		{"no usable key", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"keys":[{"kty":"RSA","kid":"small","n":"AQAB","e":"AQAB"}]}`))
		}, "no usable signing key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(tc.handler)
			t.Cleanup(srv.Close)
			d := startDev(t, func(c *gateway.Config) {
				c.JWTSecret, c.JWKSURL, c.JWKSTimeout, c.JWKSMinRefetch = nil, srv.URL, 300*time.Millisecond, 10*time.Millisecond
			})
			start := time.Now()
			r := connectWith(t, d, sign(t, jwt.SigningMethodRS256, rsaKey, "k", claims("fay", 0, time.Minute)))
			expectCode(t, r, imqpb.Code_UNAVAILABLE)
			if !r.GetRetryable() || !strings.Contains(r.GetMessage(), tc.msgHas) {
				t.Fatalf("reply %q (retryable %v), want a retryable error mentioning %q", r.GetMessage(), r.GetRetryable(), tc.msgHas)
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Fatalf("the refusal took %s with a fetch timeout of 300ms", el)
			}
		})
	}
}

// critToken is a valid HS256 token but for a "crit" header naming an
// extension (RFC 7515 4.1.11), which the gateway must refuse.
func critToken(t *testing.T) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, claims("ann", -time.Second, 30*time.Minute))
	tok.Header["crit"] = []string{"imq-ext"}
	tok.Header["imq-ext"] = true
	s, err := tok.SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
