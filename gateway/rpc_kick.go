package gateway

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// defaultKickMessage is the goodbye message of a kick without a reason.
const defaultKickMessage = "disconnected by the game server"

// kickAnswerMargin: the other gateways asked by a kick must answer by the
// call's deadline less RPCTimeout/kickAnswerMargin, the time kept to answer.
const kickAnswerMargin = 10

type kickParams struct {
	User   string `json:"user" rpc:"required"`
	Reason string `json:"reason"`
	// Local: close this gateway's sessions only. The gateway that serves a
	// kick sets it when it asks the other gateways.
	Local bool `json:"local"`
}

type kickResult struct {
	Sessions int      `json:"sessions"`
	Gateways int      `json:"gateways"`
	Failed   []string `json:"failed"`
}

// rpcKick closes the user's sessions on this gateway (goodbye KICKED, no
// reconnect, the reason as message) and, unless local, asks every other
// live gateway of the membership to do the same, concurrently and within
// the call's time. Gateways counts this one and those asked; Failed lists
// the ids of those that did not answer 200.
func (s *Server) rpcKick(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p kickParams
	if _, err := decodeParams(params, &p, ""); err != nil {
		return nil, err
	}
	if rc.signed && !p.Local {
		return nil, imqerr.New(imqpb.Code_FORBIDDEN, "a kick passed on by a gateway must be local")
	}
	if err := validUserID(p.User); err != nil {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"user\": %s", imqerr.From(err).Message)
	}
	if len(p.Reason) > maxKickReason {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"reason\" is %d bytes; at most %d", len(p.Reason), maxKickReason)
	}
	if q := "/user/" + p.User; !rc.key.allowsQueue(q) {
		return nil, imqerr.New(imqpb.Code_FORBIDDEN, "this API key may not act on user %s (queue %s)", p.User, q)
	}
	msg := p.Reason
	if msg == "" {
		msg = defaultKickMessage
	}
	out := &kickResult{Sessions: s.kickLocal(p.User, msg), Gateways: 1, Failed: []string{}}
	if p.Local {
		return out, nil
	}
	peers := s.otherGateways()
	if len(peers) == 0 {
		return out, nil
	}
	body, err := wire.MarshalUnescaped(kickParams{User: p.User, Reason: p.Reason, Local: true})
	if err != nil {
		return nil, err
	}
	// The peers must answer a little before the call's own deadline, so
	// that the answer naming those that did not reaches the caller before
	// its timeout (which is likely the same as ours).
	pctx := ctx
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		pctx, cancel = context.WithDeadline(ctx, dl.Add(-s.cfg.RPCTimeout/kickAnswerMargin))
		defer cancel()
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, peer := range peers {
		wg.Go(func() { // ends within pctx
			n, err := s.kickRemote(pctx, rc, peer, body)
			mu.Lock()
			defer mu.Unlock()
			out.Gateways++
			if err != nil {
				s.log.Warn("kick: a gateway did not answer", "peer", peer.Meta.ID, "addr", peer.Meta.HTTPAddr, "request_id", rc.id, "err", err)
				out.Failed = append(out.Failed, peer.Meta.ID)
				return
			}
			out.Sessions += n
		})
	}
	wg.Wait()
	slices.Sort(out.Failed)
	return out, nil
}

// kickLocal closes this gateway's connections of user and counts those it
// closed (not those closing already).
func (s *Server) kickLocal(user, msg string) int {
	n := 0
	for _, c := range s.conns.ofUser(user) {
		if c.kick(msg) {
			n++
		}
	}
	if n > 0 {
		s.log.Info("kicked sessions", "user", user, "sessions", n)
	}
	return n
}

// otherGateways returns the live gateways of the membership but this one
// (none standalone).
func (s *Server) otherGateways() []member.Peer {
	if s.cluster == nil {
		return nil
	}
	m := s.cluster.Member()
	var out []member.Peer
	for _, p := range m.Peers() {
		if p.Meta.Role == member.RoleGateway && p.Name != m.Name() {
			out = append(out, p)
		}
	}
	return out
}

// kickRemote asks peer to close its sessions of the user (body: kick params
// with local set), signed with the caller's API key (the key itself stays
// here), and returns how many it closed. It posts to the peer's advertised
// HTTP address, its internal listener, which serves RPCPath+"kick" too.
func (s *Server) kickRemote(ctx context.Context, rc *rpcCall, peer member.Peer, body []byte) (int, error) {
	if peer.Meta.HTTPAddr == "" {
		return 0, fmt.Errorf("gateway %s advertises no internal HTTP address", peer.Meta.ID)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+peer.Meta.HTTPAddr+RPCPath+"kick", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", signKick(rc.key, body, time.Now()))
	req.Header.Set("X-Request-Id", rc.id)
	resp, err := s.rpcClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("answered %s: %s", resp.Status, bytes.TrimSpace(b))
	}
	var r kickResult
	if err := json.Unmarshal(b, &r); err != nil {
		return 0, fmt.Errorf("answered malformed JSON: %w", err)
	}
	return r.Sessions, nil
}

// newRPCClient returns the keep-alive HTTP client the gateway asks other
// gateways with. It follows no redirects and uses no proxy: the peers are
// cluster members at the addresses they advertise.
func newRPCClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// A kick one gateway passes on to another is signed, not sent with the
// caller's key: Authorization: IMQ-Kick id=<key id>, ts=<unix s>,
// n=<random nonce>, sig=<hex HMAC-SHA256 of "imq-kick-v2\n" ts "\n" nonce
// "\n" body, keyed by the key>. (A gateway of the previous release sends no
// nonce and signs "imq-kick-v1\n" ts "\n" body.) The receiving gateway,
// which has the same keys, checks it on its internal listener only, and
// that it is fresh and not seen before (kickReplay); a key never travels
// between gateways.
const (
	kickScheme    = "IMQ-Kick"
	kickSigMaxAge = time.Minute
	// maxKickBody bounds a passed-on kick's body: a user id and a reason.
	maxKickBody = 4 << 10
)

type kickSignature struct {
	keyID string
	ts    int64
	nonce string // empty from a gateway of the previous release
	sig   []byte
}

func kickMAC(secret []byte, ts int64, nonce string, body []byte) []byte {
	m := hmac.New(sha256.New, secret)
	if nonce == "" {
		fmt.Fprintf(m, "imq-kick-v1\n%d\n", ts)
	} else {
		fmt.Fprintf(m, "imq-kick-v2\n%d\n%s\n", ts, nonce)
	}
	m.Write(body)
	return m.Sum(nil)
}

// signKick returns the Authorization header of a kick passed on with key.
func signKick(key *apiKey, body []byte, now time.Time) string {
	ts := now.Unix()
	var b [12]byte
	rand.Read(b[:])
	nonce := hex.EncodeToString(b[:])
	return fmt.Sprintf("%s id=%s, ts=%d, n=%s, sig=%s", kickScheme, key.id(), ts, nonce, hex.EncodeToString(kickMAC(key.secret, ts, nonce, body)))
}

func parseKickSignature(v string) (*kickSignature, error) {
	bad := imqerr.New(imqpb.Code_UNAUTHORIZED, "a malformed %s signature", kickScheme)
	var ks kickSignature
	for _, part := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, bad
		}
		var err error
		switch k {
		case "id":
			ks.keyID = val
		case "ts":
			ks.ts, err = strconv.ParseInt(val, 10, 64)
		case "n":
			if len(val) > 64 || !isHex(val) {
				return nil, bad
			}
			ks.nonce = val
		case "sig":
			ks.sig, err = hex.DecodeString(val)
		default:
			return nil, bad
		}
		if err != nil {
			return nil, bad
		}
	}
	if ks.keyID == "" || ks.ts == 0 || len(ks.sig) != sha256.Size {
		return nil, bad
	}
	return &ks, nil
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

// noKey stands in for a key id this gateway does not have, so that an
// unknown id costs the same MAC and gets the same answer as a bad
// signature: the answer tells nothing of which key ids exist.
var noKey = func() []byte { b := make([]byte, 32); rand.Read(b); return b }()

// verify checks the signature over body with key (nil: an unknown key id)
// and that it is fresh.
func (ks *kickSignature) verify(key *apiKey, body []byte, now time.Time) error {
	if d := now.Sub(time.Unix(ks.ts, 0)); d > kickSigMaxAge || d < -kickSigMaxAge {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "a %s signature %s from now; at most %s (are the clocks in step?)", kickScheme, d.Round(time.Second), kickSigMaxAge)
	}
	secret := noKey
	if key != nil {
		secret = key.secret
	}
	if !hmac.Equal(ks.sig, kickMAC(secret, ks.ts, ks.nonce, body)) || key == nil {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "a %s signature that does not verify", kickScheme)
	}
	return nil
}

// maxKickSigs bounds the signatures one generation of kickReplay holds.
const maxKickSigs = 1 << 16

// kickReplay remembers the signatures of the passed-on kicks taken while
// they are fresh, so that one captured on the way cannot be played again.
// Signatures are kept in two generations swapped every 2*kickSigMaxAge: a
// signature is fresh for at most 2*kickSigMaxAge after it arrives (its
// timestamp up to kickSigMaxAge ahead), and stays at least that long. Only
// signatures that verified are added, so only a key holder can fill it;
// when full it refuses kicks (retryable) rather than forget.
type kickReplay struct {
	mu      sync.Mutex
	cur     map[[sha256.Size]byte]struct{} // Guarded by mu.
	prev    map[[sha256.Size]byte]struct{} // Guarded by mu.
	rotated time.Time                      // Guarded by mu.
}

// take records sig, or refuses it when seen before or when full.
func (k *kickReplay) take(sig []byte, now time.Time) error {
	var key [sha256.Size]byte
	copy(key[:], sig)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cur == nil || now.Sub(k.rotated) >= 2*kickSigMaxAge {
		k.prev, k.cur = k.cur, make(map[[sha256.Size]byte]struct{})
		k.rotated = now
	}
	if _, ok := k.cur[key]; ok {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "a %s signature already used", kickScheme)
	}
	if _, ok := k.prev[key]; ok {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "a %s signature already used", kickScheme)
	}
	if len(k.cur) >= maxKickSigs {
		return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "more than %d kicks passed on in %s; retry later", maxKickSigs, 2*kickSigMaxAge)
	}
	k.cur[key] = struct{}{}
	return nil
}
