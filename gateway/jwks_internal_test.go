package gateway

import (
	"strings"
	"testing"
)

func TestValidJWKSURL(t *testing.T) {
	for url, ok := range map[string]bool{
		"https://login.example.com/.well-known/jwks.json": true,
		"http://127.0.0.1:8000/jwks":                      true,
		"http://localhost/jwks":                           true,
		"http://[::1]:80/jwks":                            true,
		"http://login.example.com/jwks":                   false,
		"http://10.0.0.1/jwks":                            false,
		"ftp://login.example.com/jwks":                    false,
		"/jwks":                                           false,
	} {
		if err := validJWKSURL(url); (err == nil) != ok {
			t.Errorf("validJWKSURL(%q) = %v, want ok %v", url, err, ok)
		}
	}
}

func TestParseJWKRefuses(t *testing.T) {
	for name, tc := range map[string]struct{ jwk, errHas string }{
		"symmetric":       {`{"kty":"oct","kid":"a","k":"c2VjcmV0"}`, "key type"},
		"encryption key":  {`{"kty":"RSA","kid":"a","use":"enc","n":"AQAB","e":"AQAB"}`, "use"},
		"small RSA":       {`{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"}`, "at least 2048"},
		"even exponent":   {`{"kty":"RSA","kid":"a","n":"AQAB","e":"Ag"}`, "exponent"},
		"P-521":           {`{"kty":"EC","kid":"a","crv":"P-521","x":"AA","y":"AA"}`, "curve"},
		"EC off curve":    {`{"kty":"EC","kid":"a","crv":"P-256","x":"` + strings.Repeat("A", 43) + `","y":"` + strings.Repeat("A", 43) + `"}`, "EC key"},
		"short Ed25519":   {`{"kty":"OKP","kid":"a","crv":"Ed25519","x":"AAAA"}`, "Ed25519"},
		"X25519":          {`{"kty":"OKP","kid":"a","crv":"X25519","x":"` + strings.Repeat("A", 43) + `"}`, "Ed25519"},
		"alg mismatch":    {`{"kty":"OKP","kid":"a","crv":"Ed25519","alg":"RS256","x":"` + strings.Repeat("A", 43) + `"}`, "does not fit"},
		"not JSON object": {`[1]`, "cannot unmarshal"},
	} {
		_, err := parseJWK([]byte(tc.jwk))
		if err == nil || !strings.Contains(err.Error(), tc.errHas) {
			t.Errorf("%s: err %v, want one mentioning %q", name, err, tc.errHas)
		}
	}
	if k, err := parseJWK([]byte(`{"kty":"OKP","kid":"ok","crv":"Ed25519","alg":"EdDSA","x":"` + strings.Repeat("A", 43) + `"}`)); err != nil || k.alg != "EdDSA" {
		t.Errorf("a valid Ed25519 JWK: %v, %+v", err, k)
	}
}
