package link_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

var (
	keyA = []byte("key-a-0123456789abcdef0123456789")
	keyB = []byte("key-b-0123456789abcdef0123456789")
)

func gatewayEnd(keys ...[]byte) link.Config {
	return link.Config{Role: link.RoleGateway, ID: "gw-1", PeerRoles: []imqpb.LinkRole{link.RoleNode}, Keys: keys, HandshakeTimeout: 2 * time.Second}
}

func nodeEnd(keys ...[]byte) link.Config {
	return link.Config{Role: link.RoleNode, ID: "node-1", PeerRoles: []imqpb.LinkRole{link.RoleGateway, link.RoleNode}, Keys: keys, HandshakeTimeout: 2 * time.Second,
		TableVersion: func() uint64 { return 7 }}
}

// handshake runs both ends over a pipe.
func handshake(t *testing.T, dialer, acceptor link.Config) (client, server *link.Conn, cerr, serr error) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	done := make(chan struct{})
	go func() {
		defer close(done)
		server, serr = link.Server(b, acceptor)
	}()
	client, cerr = link.Client(a, dialer)
	if cerr != nil {
		a.Close() // the acceptor may still be writing its refusal
	}
	<-done
	return client, server, cerr, serr
}

func TestHandshake(t *testing.T) {
	with := func(c link.Config, f func(*link.Config)) link.Config { f(&c); return c }
	for _, c := range []struct {
		name             string
		dialer, acceptor link.Config
		client, server   link.Reason // "": that end succeeds
		protocol         uint32
	}{
		{"insecure", gatewayEnd(), nodeEnd(), "", "", link.Protocol},
		{"keyed", gatewayEnd(keyA), nodeEnd(keyA), "", "", link.Protocol},
		{"rotation: old key first on the dialer", gatewayEnd(keyA, keyB), nodeEnd(keyB, keyA), "", "", link.Protocol},
		{"rotation: the acceptor has both", gatewayEnd(keyB), nodeEnd(keyB, keyA), "", "", link.Protocol},
		{"the dialer proves a key the acceptor lacks", gatewayEnd(keyB, keyA), nodeEnd(keyA), link.ReasonRefused, link.ReasonAuth, 0},
		{"wrong key", gatewayEnd(keyB), nodeEnd(keyA), link.ReasonRefused, link.ReasonAuth, 0},
		{"keyed dialer, insecure acceptor", gatewayEnd(keyA), nodeEnd(), link.ReasonMode, link.ReasonMode, 0},
		{"insecure dialer, keyed acceptor", gatewayEnd(), nodeEnd(keyA), link.ReasonMode, link.ReasonMode, 0},
		{"highest common version", with(gatewayEnd(), func(c *link.Config) { c.MinProtocol, c.MaxProtocol = 2, 5 }),
			with(nodeEnd(), func(c *link.Config) { c.MinProtocol, c.MaxProtocol = 3, 4 }), "", "", 4},
		{"no common version", with(gatewayEnd(), func(c *link.Config) { c.MinProtocol, c.MaxProtocol = 5, 6 }),
			nodeEnd(), link.ReasonVersion, link.ReasonVersion, 0},
		{"a role the acceptor refuses", with(gatewayEnd(), func(c *link.Config) { c.Role = imqpb.LinkRole_LINK_ROLE_UNSPECIFIED }),
			nodeEnd(), link.ReasonRefused, link.ReasonPeer, 0},
		{"no id", with(gatewayEnd(), func(c *link.Config) { c.ID = "" }), nodeEnd(), link.ReasonRefused, link.ReasonPeer, 0},
		{"an acceptor with another id than expected", with(gatewayEnd(keyA), func(c *link.Config) { c.PeerID = "node-2" }),
			nodeEnd(keyA), link.ReasonPeer, "", 0},
		{"an acceptor with the id expected", with(gatewayEnd(keyA), func(c *link.Config) { c.PeerID = "node-1" }),
			nodeEnd(keyA), "", "", link.Protocol},
		{"an acceptor in a role the dialer refuses", with(gatewayEnd(), func(c *link.Config) { c.PeerRoles = []imqpb.LinkRole{link.RoleGateway} }),
			nodeEnd(), link.ReasonPeer, "", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			client, server, cerr, serr := handshake(t, c.dialer, c.acceptor)
			if got := link.ReasonOf(cerr); got != c.client || (cerr == nil) != (c.client == "") {
				t.Fatalf("dialer: %v (reason %q), want reason %q", cerr, got, c.client)
			}
			if got := link.ReasonOf(serr); got != c.server || (serr == nil) != (c.server == "") {
				t.Fatalf("acceptor: %v (reason %q), want reason %q", serr, got, c.server)
			}
			if client == nil {
				return
			}
			if client.Protocol() != c.protocol || client.Peer() != (link.Peer{Role: link.RoleNode, ID: "node-1"}) || client.TableVersion() != 7 {
				t.Fatalf("dialer sees protocol %d, peer %v, table %d", client.Protocol(), client.Peer(), client.TableVersion())
			}
			if server == nil {
				return
			}
			if server.Protocol() != c.protocol || server.Peer() != (link.Peer{Role: link.RoleGateway, ID: "gw-1"}) {
				t.Fatalf("acceptor sees protocol %d, peer %v", server.Protocol(), server.Peer())
			}
			// The link carries frames both ways.
			go client.WriteLoop()
			go server.WriteLoop()
			client.Send(link.AppendFrame(nil, []byte("up")))
			server.Send(link.AppendFrame(nil, []byte("down")))
			if b, err := server.Next(); err != nil || string(b) != "up" {
				t.Fatalf("acceptor read %q, %v", b, err)
			}
			if b, err := client.Next(); err != nil || string(b) != "down" {
				t.Fatalf("dialer read %q, %v", b, err)
			}
			client.Close(nil)
			server.Close(nil)
		})
	}
}

// fakeAcceptor answers a dialer's hello with answer (given the challenge
// it sent and the hello), as a process without the key might.
func fakeAcceptor(t *testing.T, answer func(ch *imqpb.Challenge, h *imqpb.Hello) *imqpb.HelloAck) error {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		defer b.Close()
		ch := &imqpb.Challenge{Nonce: bytes.Repeat([]byte{9}, 32), MinProtocol: link.Protocol, MaxProtocol: link.Protocol, Keyed: true}
		frame, _ := link.MarshalFrame(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Challenge{Challenge: ch}})
		b.Write(frame)
		raw, err := link.NewFrameReader(b, link.MaxHandshakeFrame).Next()
		var up imqpb.LinkUp
		if err != nil || proto.Unmarshal(raw, &up) != nil {
			return
		}
		frame, _ = link.MarshalFrame(&imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: answer(ch, up.GetHello())}})
		b.Write(frame)
		// Anything the dialer sends now would be a request for a fake.
		if raw, err := link.NewFrameReader(b, link.MaxFrame).Next(); err == nil {
			t.Errorf("the dialer sent %d bytes to an acceptor that did not prove the key", len(raw))
		}
	}()
	conn, err := link.Client(a, gatewayEnd(keyA))
	if conn != nil {
		conn.Close(nil)
	}
	return err
}

// TestDialerVerifiesTheAcceptor: a fake acceptor that cannot compute the
// MAC (none, a random one, the dialer's own reflected back) is refused by
// the dialer before it sends anything.
func TestDialerVerifiesTheAcceptor(t *testing.T) {
	for name, mac := range map[string]func(h *imqpb.Hello) []byte{
		"no MAC":        func(*imqpb.Hello) []byte { return nil },
		"random MAC":    func(*imqpb.Hello) []byte { return bytes.Repeat([]byte{3}, 32) },
		"reflected MAC": func(h *imqpb.Hello) []byte { return h.GetMac() },
	} {
		t.Run(name, func(t *testing.T) {
			err := fakeAcceptor(t, func(ch *imqpb.Challenge, h *imqpb.Hello) *imqpb.HelloAck {
				return &imqpb.HelloAck{NodeId: "fake", Role: link.RoleNode, Protocol: link.Protocol, Mac: mac(h)}
			})
			if link.ReasonOf(err) != link.ReasonAuth {
				t.Fatalf("dialer: %v, want an auth failure", err)
			}
		})
	}
}

// TestHandshakeFrameBound: before the handshake is done, a frame over
// MaxHandshakeFrame is refused from its header, and a silent peer is
// dropped at HandshakeTimeout.
func TestHandshakeFrameBound(t *testing.T) {
	for _, c := range []struct {
		name   string
		send   []byte
		reason link.Reason
	}{
		{"16 MiB header", []byte{0x00, 0xff, 0xff, 0xff}, link.ReasonMalformed},
		{"one byte over", binaryHeader(link.MaxHandshakeFrame + 1), link.ReasonMalformed},
		{"silent after a header", binaryHeader(100), link.ReasonTimeout},
		{"silent", nil, link.ReasonTimeout},
		{"not a protobuf", link.AppendFrame(nil, []byte{0xff, 0xff, 0xff}), link.ReasonMalformed},
		{"closed", []byte{0}, link.ReasonClosed},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			go func() { // the peer: read the challenge, send c.send
				link.NewFrameReader(a, link.MaxFrame).Next()
				a.Write(c.send)
				if c.reason == link.ReasonClosed {
					a.Close()
				}
			}()
			cfg := nodeEnd()
			cfg.HandshakeTimeout = 100 * time.Millisecond
			_, err := link.Server(b, cfg)
			if link.ReasonOf(err) != c.reason {
				t.Fatalf("got %v, want reason %q", err, c.reason)
			}
		})
	}
}

func binaryHeader(n uint32) []byte {
	return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
}

// TestFrameReaderAllocatesAsBytesArrive: a header announcing MaxFrame with
// a few bytes behind it costs about what arrived, not what was announced.
func TestFrameReaderAllocatesAsBytesArrive(t *testing.T) {
	stream := append(binaryHeader(link.MaxFrame), bytes.Repeat([]byte{1}, 1000)...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := link.NewFrameReader(bytes.NewReader(stream), link.MaxFrame).Next()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Next = %v, want unexpected EOF", err)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
		t.Fatalf("reading 1000 bytes of a frame announced at %d allocated %d bytes", link.MaxFrame, grew)
	}
}

// TestOverflowPolicies: past the send buffer, OverflowClose closes the
// link and OverflowRefuse only refuses; TrySend never closes; SendAlways
// ignores the bound.
func TestOverflowPolicies(t *testing.T) {
	for _, policy := range []link.Overflow{link.OverflowClose, link.OverflowRefuse} {
		dialer, acceptor := gatewayEnd(), nodeEnd()
		acceptor.SendBuffer, acceptor.Overflow = 10, policy
		_, server, _, err := handshake(t, dialer, acceptor)
		if err != nil {
			t.Fatal(err)
		}
		// No WriteLoop runs: frames stay queued.
		if err := server.Send(make([]byte, 8)); err != nil {
			t.Fatal(err)
		}
		if err := server.TrySend(make([]byte, 8)); !errors.Is(err, link.ErrOverflow) {
			t.Fatalf("TrySend past the bound: %v", err)
		}
		if err := server.SendAlways(make([]byte, 8)); err != nil {
			t.Fatalf("SendAlways past the bound: %v", err)
		}
		if err := server.Send(make([]byte, 8)); !errors.Is(err, link.ErrOverflow) {
			t.Fatalf("Send past the bound: %v", err)
		}
		closed := server.Send(nil) == link.ErrClosed
		if closed != (policy == link.OverflowClose) {
			t.Fatalf("policy %d: closed %v after an overflow", policy, closed)
		}
	}
}
