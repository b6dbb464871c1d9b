package link

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	imqpb "github.com/imq-dev/imq/proto"
)

// Protocol is the newest link protocol version this package speaks, and
// MinProtocol the oldest. Version 1 had no authentication: it is not
// spoken.
const (
	Protocol    uint32 = 2
	MinProtocol uint32 = 2
)

// The roles of the ends of a link.
const (
	RoleGateway = imqpb.LinkRole_LINK_ROLE_GATEWAY
	RoleNode    = imqpb.LinkRole_LINK_ROLE_NODE
)

// Handshake bounds and defaults.
const (
	// DefaultHandshakeTimeout bounds a handshake: dialling, the challenge,
	// the hello and its ack. A round trip or two on the cluster's network:
	// an acceptor holds a connection that proved nothing no longer than
	// this.
	DefaultHandshakeTimeout = 5 * time.Second
	// DefaultSendBuffer bounds the bytes queued for one connection's writer.
	DefaultSendBuffer = 64 << 20
	// DefaultWriteTimeout bounds one batched write.
	DefaultWriteTimeout = 30 * time.Second
	// MinKeyLen is the shortest cluster key accepted.
	MinKeyLen = 16
	// nonceLen is the length of each end's nonce.
	nonceLen = 32
	// maxIDLen bounds a peer's id.
	maxIDLen = 256
)

// Config configures one end of a link.
type Config struct {
	// Role is this end's role; ID its id (a gateway id, a node id). Both are
	// required.
	Role imqpb.LinkRole
	ID   string
	// PeerRoles are the roles this end accepts its peer in: a queue node
	// accepts gateways and nodes (hand-offs); a dialer, nodes. Required.
	PeerRoles []imqpb.LinkRole
	// Keys are the cluster keys, each at least MinKeyLen bytes. A dialer
	// proves it holds Keys[0]; an acceptor accepts a proof under any of
	// them and answers under the one that verified, so a key is rotated by
	// adding the new one to every acceptor, then putting it first
	// everywhere, then dropping the old one. Empty: insecure mode, the
	// handshake carries no MACs and both ends must run without keys.
	Keys [][]byte
	// MinProtocol and MaxProtocol are the link protocol versions this end
	// speaks, both included. Zero: MinProtocol and Protocol.
	MinProtocol, MaxProtocol uint32
	// HandshakeTimeout bounds the handshake (and a Dial's TCP connect).
	// Zero: DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// Timeout closes the link when nothing arrived on it for this long:
	// the dialer pings more often than that and the acceptor answers.
	// Zero: DefaultTimeout.
	Timeout time.Duration
	// SendBuffer bounds the bytes queued for the writer, in bytes; what
	// happens past it is Overflow. Zero: DefaultSendBuffer.
	SendBuffer int
	// Overflow is the policy when a Send does not fit in SendBuffer.
	// Zero: OverflowClose.
	Overflow Overflow
	// WriteTimeout bounds one write to the socket. Zero:
	// DefaultWriteTimeout.
	WriteTimeout time.Duration
	// PeerID, on a dialer, is the id the acceptor must answer with (the
	// node the bucket table names at the address dialled); another is
	// refused (ReasonPeer) before anything is sent: a redirected or
	// misconfigured address, or another member holding the key. Empty:
	// any id.
	PeerID string
	// TableVersion, on an acceptor, returns the version of the bucket table
	// it holds, sent in the HelloAck. nil: 0.
	TableVersion func() uint64
}

// ValidateKeys checks a cluster key list: each key at least MinKeyLen bytes.
// An empty list is valid (insecure mode).
func ValidateKeys(keys [][]byte) error {
	for i, k := range keys {
		if len(k) < MinKeyLen {
			return fmt.Errorf("cluster key %d has %d bytes, want at least %d", i+1, len(k), MinKeyLen)
		}
	}
	return nil
}

func (c *Config) withDefaults() Config {
	d := *c
	if d.MinProtocol == 0 {
		d.MinProtocol = MinProtocol
	}
	if d.MaxProtocol == 0 {
		d.MaxProtocol = Protocol
	}
	if d.HandshakeTimeout == 0 {
		d.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if d.Timeout == 0 {
		d.Timeout = DefaultTimeout
	}
	if d.SendBuffer == 0 {
		d.SendBuffer = DefaultSendBuffer
	}
	if d.WriteTimeout == 0 {
		d.WriteTimeout = DefaultWriteTimeout
	}
	return d
}

// Dial connects to a link acceptor at addr and runs the dialer's side of
// the handshake, within cfg.HandshakeTimeout.
func Dial(ctx context.Context, addr string, cfg Config) (*Conn, error) {
	cfg = cfg.withDefaults()
	d := net.Dialer{Timeout: cfg.HandshakeTimeout, KeepAlive: 15 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	return Client(nc, cfg)
}

// Client runs the dialer's side of the handshake on nc. On failure it
// closes nc and returns a *HandshakeError.
func Client(nc net.Conn, cfg Config) (*Conn, error) {
	cfg = cfg.withDefaults()
	nc.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	fr := newHandshakeReader(nc)
	fail := func(reason Reason, format string, args ...any) (*Conn, error) {
		nc.Close()
		return nil, &HandshakeError{Reason: reason, Err: fmt.Errorf(format, args...)}
	}

	var down imqpb.LinkDown
	if err := readMsg(fr, &down); err != nil {
		nc.Close()
		return nil, ioFailure("reading the acceptor's challenge", err)
	}
	ch := down.GetChallenge()
	if ch == nil || len(ch.GetNonce()) != nonceLen {
		return fail(ReasonMalformed, "the acceptor's first frame is not a challenge (a queue node older than link protocol 2?)")
	}
	keyed := len(cfg.Keys) > 0
	hello := &imqpb.Hello{Id: cfg.ID, Role: cfg.Role, MinProtocol: cfg.MinProtocol, MaxProtocol: cfg.MaxProtocol, Nonce: newNonce()}
	if keyed {
		hello.Mac = sign(cfg.Keys[0], dialerTranscript(ch, hello))
	}
	if err := writeMsg(nc, &imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: hello}}); err != nil {
		nc.Close()
		return nil, ioFailure("sending the hello", err)
	}
	// The hello goes even when the ends cannot agree, so that the acceptor
	// logs why too.
	protocol, ok := negotiate(ch.GetMinProtocol(), ch.GetMaxProtocol(), cfg.MinProtocol, cfg.MaxProtocol)
	switch {
	case !ok:
		return fail(ReasonVersion, "the acceptor speaks link protocol %d to %d, this end %d to %d", ch.GetMinProtocol(), ch.GetMaxProtocol(), cfg.MinProtocol, cfg.MaxProtocol)
	case keyed && !ch.GetKeyed():
		return fail(ReasonMode, "the acceptor runs without a cluster key (insecure mode) and this end has one: both ends need the same mode")
	case !keyed && ch.GetKeyed():
		return fail(ReasonMode, "the acceptor requires a cluster key and this end has none (insecure mode): both ends need the same mode")
	}

	down.Reset()
	if err := readMsg(fr, &down); err != nil {
		nc.Close()
		return nil, ioFailure("reading the acceptor's hello ack", err)
	}
	ack := down.GetHelloAck()
	switch {
	case ack == nil:
		return fail(ReasonMalformed, "the acceptor did not answer the hello with a hello ack")
	case ack.GetRefused() != "":
		return fail(ReasonRefused, "the acceptor refused the hello: %s", ack.GetRefused())
	case ack.GetProtocol() != protocol:
		return fail(ReasonVersion, "the acceptor chose link protocol %d, not %d", ack.GetProtocol(), protocol)
	case !slices.Contains(cfg.PeerRoles, ack.GetRole()):
		return fail(ReasonPeer, "the acceptor's role %s is not one this end links to", ack.GetRole())
	case !validID(ack.GetNodeId()):
		return fail(ReasonPeer, "the acceptor's id is empty or longer than %d bytes", maxIDLen)
	case keyed && !hmac.Equal(ack.GetMac(), sign(cfg.Keys[0], acceptorTranscript(ch, hello, ack))):
		return fail(ReasonAuth, "the acceptor's MAC does not verify: it does not hold this end's cluster key")
	case !keyed && len(ack.GetMac()) > 0:
		return fail(ReasonMode, "the acceptor sent a MAC and this end has no cluster key (insecure mode)")
	case cfg.PeerID != "" && ack.GetNodeId() != cfg.PeerID:
		return fail(ReasonPeer, "the acceptor is %q, not %q: the address does not reach the node expected there", ack.GetNodeId(), cfg.PeerID)
	}
	nc.SetDeadline(time.Time{})
	fr.authenticated()
	return newConn(nc, fr, cfg, Peer{Role: ack.GetRole(), ID: ack.GetNodeId()}, protocol, ack.GetTableVersion()), nil
}

// Server runs the acceptor's side of the handshake on nc, a connection
// the caller's listener accepted. It reads nothing but the hello, of at
// most MaxHandshakeFrame bytes, before the hello is verified. On failure it
// closes nc (after a HelloAck that says why, when it got a hello) and
// returns a *HandshakeError.
func Server(nc net.Conn, cfg Config) (*Conn, error) {
	cfg = cfg.withDefaults()
	nc.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	fr := newHandshakeReader(nc)
	keyed := len(cfg.Keys) > 0
	ch := &imqpb.Challenge{Nonce: newNonce(), MinProtocol: cfg.MinProtocol, MaxProtocol: cfg.MaxProtocol, Keyed: keyed}
	if err := writeMsg(nc, &imqpb.LinkDown{Msg: &imqpb.LinkDown_Challenge{Challenge: ch}}); err != nil {
		nc.Close()
		return nil, ioFailure("sending the challenge", err)
	}
	var up imqpb.LinkUp
	if err := readMsg(fr, &up); err != nil {
		nc.Close()
		return nil, ioFailure("reading the hello", err)
	}
	hello := up.GetHello()
	if hello == nil {
		nc.Close()
		return nil, &HandshakeError{Reason: ReasonMalformed, Err: errors.New("the dialer's first frame is not a hello")}
	}
	refuse := func(reason Reason, format string, args ...any) (*Conn, error) {
		err := fmt.Errorf(format, args...)
		writeMsg(nc, &imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: &imqpb.HelloAck{Refused: err.Error()}}})
		nc.Close()
		return nil, &HandshakeError{Reason: reason, Err: err}
	}
	// A version 1 hello names one protocol and no range. Version 1 had no
	// authentication: it is refused by name, never negotiated.
	if hello.GetMaxProtocol() == 0 {
		return refuse(ReasonVersion, "the dialer speaks link protocol %d only (an unauthenticated version 1 hello); the acceptor speaks %d to %d", hello.GetProtocol(), cfg.MinProtocol, cfg.MaxProtocol)
	}
	// Every hello that goes on carries a full nonce: the acceptor's MAC
	// covers it, which makes that proof this connection's.
	if len(hello.GetNonce()) != nonceLen {
		return refuse(ReasonMalformed, "the hello's nonce has %d bytes, want %d", len(hello.GetNonce()), nonceLen)
	}
	dMin, dMax := hello.GetMinProtocol(), hello.GetMaxProtocol()
	protocol, ok := negotiate(cfg.MinProtocol, cfg.MaxProtocol, dMin, dMax)
	if !ok {
		return refuse(ReasonVersion, "the dialer speaks link protocol %d to %d, the acceptor %d to %d", dMin, dMax, cfg.MinProtocol, cfg.MaxProtocol)
	}
	if !slices.Contains(cfg.PeerRoles, hello.GetRole()) {
		return refuse(ReasonPeer, "the acceptor takes no links from role %s", hello.GetRole())
	}
	if !validID(hello.GetId()) {
		return refuse(ReasonPeer, "the dialer's id is empty or longer than %d bytes", maxIDLen)
	}
	var key []byte
	switch {
	case keyed && len(hello.GetMac()) == 0:
		return refuse(ReasonMode, "the dialer has no cluster key (insecure mode) and the acceptor requires one: both ends need the same mode")
	case !keyed && len(hello.GetMac()) > 0:
		return refuse(ReasonMode, "the dialer has a cluster key and the acceptor runs without one (insecure mode): both ends need the same mode")
	case keyed:
		t := dialerTranscript(ch, hello)
		for _, k := range cfg.Keys {
			if hmac.Equal(hello.GetMac(), sign(k, t)) {
				key = k
				break
			}
		}
		if key == nil {
			return refuse(ReasonAuth, "the hello's MAC does not verify under any of the acceptor's cluster keys")
		}
	}
	var tableVersion uint64
	if cfg.TableVersion != nil {
		tableVersion = cfg.TableVersion()
	}
	ack := &imqpb.HelloAck{NodeId: cfg.ID, Role: cfg.Role, Protocol: protocol, TableVersion: tableVersion}
	if keyed {
		ack.Mac = sign(key, acceptorTranscript(ch, hello, ack))
	}
	if err := writeMsg(nc, &imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: ack}}); err != nil {
		nc.Close()
		return nil, ioFailure("sending the hello ack", err)
	}
	nc.SetDeadline(time.Time{})
	fr.authenticated()
	return newConn(nc, fr, cfg, Peer{Role: hello.GetRole(), ID: hello.GetId()}, protocol, 0), nil
}

// negotiate returns the highest version in both ranges.
func negotiate(aMin, aMax, bMin, bMax uint32) (uint32, bool) {
	v := min(aMax, bMax)
	return v, v >= max(aMin, bMin) && v > 0
}

func validID(id string) bool { return id != "" && len(id) <= maxIDLen }

func newNonce() []byte {
	b := make([]byte, nonceLen)
	rand.Read(b) // never fails (crypto/rand)
	return b
}

// The transcript labels keep each end's MAC from being taken for the
// other's: a proof cannot be reflected.
const (
	dialerLabel   = "imq link dialer proof\x00"
	acceptorLabel = "imq link acceptor proof\x00"
)

// dialerTranscript is what the dialer's MAC covers: the challenge and its
// hello (all but the MAC). The acceptor's fresh nonce makes it one
// connection's: a recorded hello does not verify on another.
func dialerTranscript(ch *imqpb.Challenge, h *imqpb.Hello) []byte {
	return appendHello(appendChallenge([]byte(dialerLabel), ch), h)
}

// acceptorTranscript is what the acceptor's MAC covers: the challenge, the
// whole hello (the dialer's nonce makes it this connection's) and its ack
// (all but the MAC).
func acceptorTranscript(ch *imqpb.Challenge, h *imqpb.Hello, ack *imqpb.HelloAck) []byte {
	b := appendHello(appendChallenge([]byte(acceptorLabel), ch), h)
	b = appendBytes(b, h.GetMac())
	b = binary.BigEndian.AppendUint64(b, uint64(ack.GetRole()))
	b = appendBytes(b, []byte(ack.GetNodeId()))
	b = binary.BigEndian.AppendUint64(b, uint64(ack.GetProtocol()))
	return binary.BigEndian.AppendUint64(b, ack.GetTableVersion())
}

func appendChallenge(b []byte, ch *imqpb.Challenge) []byte {
	b = appendBytes(b, ch.GetNonce())
	b = binary.BigEndian.AppendUint64(b, uint64(ch.GetMinProtocol()))
	b = binary.BigEndian.AppendUint64(b, uint64(ch.GetMaxProtocol()))
	if ch.GetKeyed() {
		return append(b, 1)
	}
	return append(b, 0)
}

func appendHello(b []byte, h *imqpb.Hello) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(h.GetRole()))
	b = appendBytes(b, []byte(h.GetId()))
	b = binary.BigEndian.AppendUint64(b, uint64(h.GetMinProtocol()))
	b = binary.BigEndian.AppendUint64(b, uint64(h.GetMaxProtocol()))
	return appendBytes(b, h.GetNonce())
}

// appendBytes appends v with its length, so that no two field lists encode
// alike.
func appendBytes(b, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func sign(key, transcript []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(transcript)
	return m.Sum(nil)
}

func writeMsg(nc net.Conn, m proto.Message) error {
	b, err := MarshalFrame(m)
	if err != nil {
		return err
	}
	_, err = nc.Write(b)
	return err
}

func readMsg(fr *FrameReader, m proto.Message) error {
	b, err := fr.Next()
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return fmt.Errorf("%w: %v", errUndecodable, err)
	}
	return nil
}

var errUndecodable = errors.New("undecodable handshake frame")

// ioFailure classifies a handshake read or write error.
func ioFailure(doing string, err error) error {
	reason := ReasonClosed
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		reason = ReasonTimeout
	case errors.Is(err, ErrFrameTooLarge), errors.Is(err, errUndecodable):
		reason = ReasonMalformed
	case errors.Is(err, io.EOF):
		err = io.ErrUnexpectedEOF
	}
	return &HandshakeError{Reason: reason, Err: fmt.Errorf("%s: %w", doing, err)}
}
