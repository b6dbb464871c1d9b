package link

import (
	"bytes"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	imqpb "github.com/imq-dev/imq/proto"
)

// TestAcceptorRefusesHellosWithoutANonce: a hello signed with the right
// key but without a full nonce (a version 1 hello, or a version 2 one with
// a short nonce) is refused: every hello the acceptor answers carries the
// dialer's fresh nonce that its proof covers.
func TestAcceptorRefusesHellosWithoutANonce(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	for _, c := range []struct {
		name   string
		hello  *imqpb.Hello
		reason Reason
	}{
		{"version 1, no nonce", &imqpb.Hello{Id: "gw", Role: RoleGateway, Protocol: 2}, ReasonVersion},
		{"version 1, a full nonce", &imqpb.Hello{Id: "gw", Role: RoleGateway, Protocol: 2, Nonce: newNonce()}, ReasonVersion},
		{"version 2, no nonce", &imqpb.Hello{Id: "gw", Role: RoleGateway, MinProtocol: 2, MaxProtocol: 2}, ReasonMalformed},
		{"version 2, a short nonce", &imqpb.Hello{Id: "gw", Role: RoleGateway, MinProtocol: 2, MaxProtocol: 2, Nonce: []byte{1, 2, 3}}, ReasonMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer b.Close()
			done := make(chan error, 1)
			go func() {
				_, err := Server(a, Config{Role: RoleNode, ID: "n1", PeerRoles: []imqpb.LinkRole{RoleGateway}, Keys: [][]byte{key}, HandshakeTimeout: 2 * time.Second})
				done <- err
			}()
			fr := newHandshakeReader(b)
			var down imqpb.LinkDown
			if err := readMsg(fr, &down); err != nil {
				t.Fatal(err)
			}
			c.hello.Mac = sign(key, dialerTranscript(down.GetChallenge(), c.hello))
			go writeMsg(b, &imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: c.hello}})
			down.Reset()
			if err := readMsg(fr, &down); err != nil {
				t.Fatal(err)
			}
			if ack := down.GetHelloAck(); ack.GetRefused() == "" || len(ack.GetMac()) > 0 {
				t.Fatalf("the acceptor answered %v, want a refusal", ack)
			}
			if err := <-done; ReasonOf(err) != c.reason {
				t.Fatalf("acceptor: %v, want reason %q", err, c.reason)
			}
		})
	}
}

// TestHandshakeReaderHasNoReadBuffer: before the peer is authenticated a
// connection's reader holds no read buffer (a few hundred bytes for a
// hello, not 32 KiB) and reads nothing past the frame, so the buffered
// reader that follows the handshake loses nothing.
func TestHandshakeReaderHasNoReadBuffer(t *testing.T) {
	hello := AppendFrame(nil, bytes.Repeat([]byte{7}, 200))
	next := AppendFrame(nil, []byte("after the handshake"))
	src := bytes.NewReader(append(append([]byte{}, hello...), next...))
	fr := newHandshakeReader(src)
	if b, err := fr.Next(); err != nil || len(b) != 200 {
		t.Fatalf("hello: %d bytes, %v", len(b), err)
	}
	if src.Len() != len(next) {
		t.Fatalf("the handshake reader read %d bytes past the hello", len(next)-src.Len())
	}
	fr.authenticated()
	if b, err := fr.Next(); err != nil || string(b) != "after the handshake" {
		t.Fatalf("after the handshake: %q, %v", b, err)
	}

	const n = 100
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		fr := newHandshakeReader(bytes.NewReader(hello))
		if _, err := fr.Next(); err != nil {
			t.Fatal(err)
		}
		if _, err := fr.Next(); err != io.EOF {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / n; per > 4<<10 {
		t.Fatalf("reading a 200-byte hello allocated %d bytes per connection, want at most 4 KiB", per)
	}
}
