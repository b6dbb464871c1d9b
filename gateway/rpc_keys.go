package gateway

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
)

// minAPIKeyBytes is the shortest API key secret accepted.
const minAPIKeyBytes = 16

// APIKey is one key of the admin RPC: a secret sent as "Authorization:
// Bearer <secret>", and what it may do. Its String and LogValue never show
// the secret.
type APIKey struct {
	// Secret is the key itself, at least 16 bytes, without whitespace.
	Secret string
	// Methods lists the RPC methods the key may call (batch and broadcast
	// included: a batch's calls are each checked as well). Empty: all.
	Methods []string
	// Prefixes lists queue name prefixes ("/room/"): the key may act on a
	// queue only if its name starts with one of them. Kick acts on the
	// user's queue /user/<id>; batch on no queue (its calls are checked).
	// Empty: every queue.
	Prefixes []string
}

// ParseAPIKey parses a key spec: the secret, optionally followed by
// space-separated options, "methods=" and "prefixes=", each a
// comma-separated list:
//
//	0123456789abcdef0123 methods=publish,get_state prefixes=/room/,/lobby/
//
// Unknown options, unknown method names and prefixes that cannot start a
// queue name are errors. Errors never quote the secret.
func ParseAPIKey(spec string) (APIKey, error) {
	fields := strings.Fields(spec)
	if len(fields) == 0 {
		return APIKey{}, errors.New("empty API key")
	}
	k := APIKey{Secret: fields[0]}
	seen := map[string]bool{}
	for _, f := range fields[1:] {
		name, val, ok := strings.Cut(f, "=")
		if !ok {
			return APIKey{}, fmt.Errorf("API key option %q is not name=value (options: methods=, prefixes=)", f)
		}
		if seen[name] {
			return APIKey{}, fmt.Errorf("API key option %s= given twice", name)
		}
		seen[name] = true
		var list []string
		for item := range strings.SplitSeq(val, ",") {
			if item == "" {
				return APIKey{}, fmt.Errorf("API key option %s= has an empty item", name)
			}
			list = append(list, item)
		}
		switch name {
		case "methods":
			k.Methods = list
		case "prefixes":
			k.Prefixes = list
		default:
			return APIKey{}, fmt.Errorf("unknown API key option %s= (options: methods=, prefixes=)", name)
		}
	}
	if err := k.validate(); err != nil {
		return APIKey{}, err
	}
	return k, nil
}

// ParseAPIKeys parses keys separated by newlines or ';' (the IMQ_API_KEYS
// environment variable); blank entries are skipped.
func ParseAPIKeys(env string) ([]APIKey, error) {
	var keys []APIKey
	n := 0
	for entry := range strings.FieldsFuncSeq(env, func(r rune) bool { return r == '\n' || r == ';' }) {
		if strings.TrimSpace(entry) == "" {
			continue
		}
		n++
		k, err := ParseAPIKey(entry)
		if err != nil {
			return nil, fmt.Errorf("API key %d: %w", n, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// validate checks a key, however it was made.
func (k APIKey) validate() error {
	if len(k.Secret) < minAPIKeyBytes {
		return fmt.Errorf("the secret is %d bytes; use at least %d", len(k.Secret), minAPIKeyBytes)
	}
	if strings.ContainsFunc(k.Secret, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return errors.New("the secret contains whitespace or control characters")
	}
	for _, m := range k.Methods {
		if rpcMethods[m] == nil {
			return fmt.Errorf("unknown method %q (methods: %s)", m, strings.Join(rpcMethodNames(), ", "))
		}
	}
	for _, p := range k.Prefixes {
		if err := validatePrefix(p); err != nil {
			return err
		}
	}
	return nil
}

// validatePrefix checks that p can start a valid queue name: "/", then
// queue name characters, where every complete segment is valid ("/room/",
// "/room/eu-", "/user/").
func validatePrefix(p string) error {
	if p == "" || p[0] != '/' {
		return fmt.Errorf("queue prefix %q must start with '/'", p)
	}
	if len(p) > 255 {
		return fmt.Errorf("queue prefix is %d bytes; a queue name has at most 255", len(p))
	}
	segs := strings.Split(p[1:], "/")
	for i, seg := range segs {
		last := i == len(segs)-1
		if seg == "" && !last {
			return fmt.Errorf("queue prefix %q has an empty segment", p)
		}
		if !last && (seg == "." || seg == "..") {
			return fmt.Errorf("queue prefix %q has a %q segment", p, seg)
		}
		for j := 0; j < len(seg); j++ {
			if !queuePrefixChar(seg[j]) {
				return fmt.Errorf("queue prefix %q: character %q is not allowed in queue names", p, rune(seg[j]))
			}
		}
	}
	return nil
}

func queuePrefixChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("_.:@+=~-", c) >= 0
}

// String describes the key without its secret.
func (k APIKey) String() string {
	var b strings.Builder
	b.WriteString("APIKey{secret: [redacted]")
	if len(k.Methods) > 0 {
		b.WriteString(" methods=" + strings.Join(k.Methods, ","))
	}
	if len(k.Prefixes) > 0 {
		b.WriteString(" prefixes=" + strings.Join(k.Prefixes, ","))
	}
	b.WriteString("}")
	return b.String()
}

// GoString describes the key without its secret, for %#v.
func (k APIKey) GoString() string { return k.String() }

// LogValue keeps the secret out of structured logs.
func (k APIKey) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalJSON keeps the secret out of JSON (a configuration dump, a log
// handler encoding a slice of keys): it encodes the key as String does.
func (k APIKey) MarshalJSON() ([]byte, error) { return json.Marshal(k.String()) }

// apiKey is a configured key as the RPC checks it.
type apiKey struct {
	index    int // 1-based, for logs: which key was used, never the key
	hash     [sha256.Size]byte
	secret   []byte          // signs and checks the kicks gateways pass on (rpc_kick.go)
	methods  map[string]bool // nil: all
	prefixes []string        // nil: all
}

func newAPIKeys(keys []APIKey) []apiKey {
	out := make([]apiKey, len(keys))
	for i, k := range keys {
		out[i] = apiKey{index: i + 1, hash: sha256.Sum256([]byte(k.Secret)), secret: []byte(k.Secret), prefixes: slices.Clone(k.Prefixes)}
		if len(k.Methods) > 0 {
			out[i].methods = map[string]bool{}
			for _, m := range k.Methods {
				out[i].methods[m] = true
			}
		}
	}
	return out
}

// findKey returns the key whose secret is secret, or nil. Every key is
// compared, each in constant time over equal-length hashes, so the time
// taken says nothing about which key or how much of one matched.
func findKey(keys []apiKey, secret string) *apiKey {
	h := sha256.Sum256([]byte(secret))
	var found *apiKey
	for i := range keys {
		if subtle.ConstantTimeCompare(h[:], keys[i].hash[:]) == 1 {
			found = &keys[i]
		}
	}
	return found
}

// findKeyByID returns the key whose id (keyID) is id, or nil, comparing
// every key in constant time.
func findKeyByID(keys []apiKey, id string) *apiKey {
	var found *apiKey
	for i := range keys {
		if subtle.ConstantTimeCompare([]byte(keys[i].id()), []byte(id)) == 1 {
			found = &keys[i]
		}
	}
	return found
}

// id names the key to other gateways without revealing it: the first 8
// bytes of its SHA-256, in hex.
func (k *apiKey) id() string { return hex.EncodeToString(k.hash[:8]) }

func (k *apiKey) allowsMethod(m string) bool { return k.methods == nil || k.methods[m] }

func (k *apiKey) allowsQueue(q string) bool {
	if k.prefixes == nil {
		return true
	}
	for _, p := range k.prefixes {
		if strings.HasPrefix(q, p) {
			return true
		}
	}
	return false
}
