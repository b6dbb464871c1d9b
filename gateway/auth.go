package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// Connect tokens are JWTs (RFC 7519) whose sub is the user id. What the
// gateway accepts:
//   - signature: HS256 with Config.JWTSecret, or RS256, ES256, ES384 or
//     EdDSA with a public key from Config.JWTPublicKeys or the JWKS at
//     Config.JWKSURL. Each key verifies only the algorithm of its type (an
//     RSA key RS256 only, a P-256 key ES256 only...), and the secret only
//     HS256, so no token can pick how its signature is checked.
//   - exp is required unless Config.JWTAllowNoExp; a token whose lifetime
//     (exp - iat, or exp - now without iat) exceeds Config.JWTMaxAge is
//     refused. nbf and iat are honoured, with jwtLeeway.
//   - iss must equal Config.JWTIssuer when that is set.
//   - aud must name Config.JWTAudience when that is set; without it, a token
//     carrying any aud is meant for another service and is refused.
// Every refusal is UNAUTHORIZED, except that a token needing the JWKS
// while the JWKS was never fetched is UNAVAILABLE (retryable).

// jwtLeeway tolerates clock skew between the token's issuer and the gateway.
const jwtLeeway = 5 * time.Second

// jwtKey is a public key and the one algorithm it verifies.
type jwtKey struct {
	kid string // "" for keys from a PEM file
	alg string
	key any // *rsa.PublicKey, *ecdsa.PublicKey or ed25519.PublicKey
}

// asymmetricAlgs are the algorithms public keys may verify.
var asymmetricAlgs = []string{"RS256", "ES256", "ES384", "EdDSA"}

// errJWKSUnavailable: a token needs the JWKS, which has not been fetched.
var errJWKSUnavailable = errors.New("the JWKS has not been fetched")

// verifier checks connect tokens; it is immutable after New, apart from its
// JWKS cache.
type verifier struct {
	secret     []byte
	static     []jwtKey
	jwks       *jwksCache // nil without Config.JWKSURL
	parser     *jwt.Parser
	audience   string
	maxAge     time.Duration
	allowNoExp bool
}

func newVerifier(cfg *Config, jwks *jwksCache) (*verifier, error) {
	static, err := parseJWTPublicKeys(cfg.JWTPublicKeys)
	if err != nil {
		return nil, err
	}
	v := &verifier{secret: cfg.JWTSecret, static: static, jwks: jwks, audience: cfg.JWTAudience,
		maxAge: cfg.JWTMaxAge, allowNoExp: cfg.JWTAllowNoExp}
	var algs []string
	if len(v.secret) > 0 {
		algs = append(algs, "HS256")
	}
	for _, k := range static {
		if !slices.Contains(algs, k.alg) {
			algs = append(algs, k.alg)
		}
	}
	if jwks != nil {
		for _, a := range asymmetricAlgs {
			if !slices.Contains(algs, a) {
				algs = append(algs, a)
			}
		}
	}
	opts := []jwt.ParserOption{jwt.WithValidMethods(algs), jwt.WithLeeway(jwtLeeway), jwt.WithIssuedAt()}
	if !cfg.JWTAllowNoExp {
		opts = append(opts, jwt.WithExpirationRequired())
	}
	if cfg.JWTIssuer != "" {
		opts = append(opts, jwt.WithIssuer(cfg.JWTIssuer))
	}
	if cfg.JWTAudience != "" {
		opts = append(opts, jwt.WithAudience(cfg.JWTAudience))
	}
	v.parser = jwt.NewParser(opts...)
	return v, nil
}

// configured reports whether any key can verify a token.
func (v *verifier) configured() bool {
	return len(v.secret) > 0 || len(v.static) > 0 || v.jwks != nil
}

// verify checks token and returns its subject, the user id. ctx bounds a
// JWKS fetch the token's key id may cause.
func (v *verifier) verify(ctx context.Context, token string) (string, error) {
	if !v.configured() {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "this gateway accepts no tokens (development mode: use ?user=ID)")
	}
	if token == "" {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "connect carries no token")
	}
	var claims jwt.RegisteredClaims
	_, err := v.parser.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) { return v.keyFor(ctx, t) })
	switch {
	case errors.Is(err, errJWKSUnavailable):
		return "", imqerr.New(imqpb.Code_UNAVAILABLE, "token not checked: %v", err)
	case err != nil:
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "token rejected: %v", err)
	}
	if v.audience == "" && len(claims.Audience) > 0 {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "token rejected: it is for audience %q and this gateway has no audience configured (--jwt-audience)", []string(claims.Audience))
	}
	if claims.ExpiresAt != nil {
		from := time.Now()
		if claims.IssuedAt != nil {
			from = claims.IssuedAt.Time
		}
		if life := claims.ExpiresAt.Sub(from); life > v.maxAge+jwtLeeway {
			return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "token rejected: it is valid for %s, longer than this gateway's maximum %s (--jwt-max-age)", life.Round(time.Second), v.maxAge)
		}
	}
	if err := validUserID(claims.Subject); err != nil {
		return "", err
	}
	return claims.Subject, nil
}

// keyFor returns the keys that may verify t: the secret for HS256, else the
// public keys pinned to t's algorithm, the one named by its kid when the
// JWKS has it.
func (v *verifier) keyFor(ctx context.Context, t *jwt.Token) (any, error) {
	if _, ok := t.Header["crit"]; ok {
		// RFC 7515 4.1.11: a token whose critical extensions are not
		// understood must be refused; this gateway understands none.
		return nil, errors.New("it has a \"crit\" header; this gateway understands no critical extensions")
	}
	alg := t.Method.Alg()
	if alg == "HS256" {
		return v.secret, nil // WithValidMethods admits HS256 only with a secret
	}
	kid, _ := t.Header["kid"].(string)
	var keys []jwt.VerificationKey
	if v.jwks != nil {
		k, found, err := v.jwks.lookup(ctx, kid)
		switch {
		case found && k.alg != alg:
			return nil, fmt.Errorf("key %q verifies %s, not %s", kid, k.alg, alg)
		case found:
			return k.key, nil
		case err != nil && len(v.static) == 0:
			return nil, err
		}
		if kid == "" {
			for _, k := range v.jwks.keysWithoutID() {
				if k.alg == alg {
					keys = append(keys, k.key)
				}
			}
		}
	}
	for _, k := range v.static {
		if k.alg == alg {
			keys = append(keys, k.key)
		}
	}
	if len(keys) == 0 {
		if kid != "" {
			return nil, fmt.Errorf("no %s key with id %q", alg, kid)
		}
		return nil, fmt.Errorf("no %s key", alg)
	}
	return jwt.VerificationKeySet{Keys: keys}, nil
}

// parseJWTPublicKeys parses PEM blocks of public keys (PKIX "PUBLIC KEY",
// PKCS #1 "RSA PUBLIC KEY") or certificates into the keys that verify
// connect tokens: RSA of at least 2048 bits (RS256), ECDSA P-256 (ES256)
// or P-384 (ES384), Ed25519 (EdDSA). A private key is an error, so that one
// is never deployed to a gateway by mistake, and so is data without a key
// (nil data: none configured).
func parseJWTPublicKeys(data []byte) ([]jwtKey, error) {
	var keys []jwtKey
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		var pub any
		var err error
		switch b.Type {
		case "PUBLIC KEY":
			pub, err = x509.ParsePKIXPublicKey(b.Bytes)
		case "RSA PUBLIC KEY":
			pub, err = x509.ParsePKCS1PublicKey(b.Bytes)
		case "CERTIFICATE":
			var cert *x509.Certificate
			if cert, err = x509.ParseCertificate(b.Bytes); err == nil {
				pub = cert.PublicKey
			}
		case "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY":
			return nil, fmt.Errorf("JWT public keys: PEM block %d is a private key (%s); give the gateway the public key only", len(keys)+1, b.Type)
		default:
			return nil, fmt.Errorf("JWT public keys: PEM block %d is a %q, not a public key or certificate", len(keys)+1, b.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("JWT public keys: PEM block %d: %w", len(keys)+1, err)
		}
		k, err := keyOf("", pub)
		if err != nil {
			return nil, fmt.Errorf("JWT public keys: PEM block %d: %w", len(keys)+1, err)
		}
		keys = append(keys, k)
	}
	if data != nil && len(keys) == 0 { // given, even empty (an empty file): a gateway that would verify no token
		return nil, errors.New("JWT public keys: no PEM block found (want PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE blocks)")
	}
	return keys, nil
}

// keyOf pins pub to the algorithm of its type.
func keyOf(kid string, pub any) (jwtKey, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return jwtKey{}, fmt.Errorf("RSA key of %d bits; use at least 2048", k.N.BitLen())
		}
		return jwtKey{kid: kid, alg: "RS256", key: k}, nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return jwtKey{kid: kid, alg: "ES256", key: k}, nil
		case elliptic.P384():
			return jwtKey{kid: kid, alg: "ES384", key: k}, nil
		}
		return jwtKey{}, fmt.Errorf("ECDSA key on curve %s; use P-256 (ES256) or P-384 (ES384)", k.Curve.Params().Name)
	case ed25519.PublicKey:
		return jwtKey{kid: kid, alg: "EdDSA", key: k}, nil
	}
	return jwtKey{}, fmt.Errorf("unsupported key type %T; use RSA, ECDSA P-256/P-384 or Ed25519", pub)
}

// validUserID checks that id can name the user's queue /user/<id>
// (wire.ValidateUserID), refusing it as UNAUTHORIZED.
func validUserID(id string) error {
	if err := wire.ValidateUserID(id); err != nil {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "%s", err.Error())
	}
	return nil
}
