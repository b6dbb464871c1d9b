package queuenode

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

func startLinkNode(t *testing.T, mod func(*Config)) *Server {
	t.Helper()
	cfg := DefaultConfig()
	cfg.LinkAddr = "127.0.0.1:0"
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go s.Run(context.Background())
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	return s
}

// TestSilentGatewayLinkIsDropped: a gateway that says hello and then sends
// nothing, not even pings, has its link closed after LinkTimeout.
func TestSilentGatewayLinkIsDropped(t *testing.T) {
	s := startLinkNode(t, func(c *Config) { c.LinkTimeout = 300 * time.Millisecond })
	l := dialLink(t, s.LinkAddr(), "gw-silent")
	start := time.Now()
	if _, err := l.fr.Next(); err == nil {
		t.Fatal("the node sent a frame to a silent gateway")
	}
	if elapsed := time.Since(start); elapsed < 250*time.Millisecond || elapsed > 3*time.Second {
		t.Fatalf("link closed after %s, want about the 300ms link timeout", elapsed)
	}
	waitLinks := time.Now().Add(2 * time.Second)
	for s.linkCount() != 0 {
		if time.Now().After(waitLinks) {
			t.Fatal("the node still counts the link")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var (
	testOldKey = []byte("old-cluster-key-0123456789abcdef")
	testNewKey = []byte("new-cluster-key-0123456789abcdef")
)

// publishFrame is a request that creates a queue: a node that runs it has
// one queue more.
func publishFrame(t *testing.T) []byte {
	b, err := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: &imqpb.NodeRequest{
		Id: 1, User: "mallory", Session: "s1", Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{Queue: "/room/stolen", Mount: "chat", Payload: []byte(`"x"`)}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recorder keeps what is written through a connection.
type recorder struct {
	net.Conn
	sent bytes.Buffer
}

func (r *recorder) Write(b []byte) (int, error) {
	r.sent.Write(b)
	return r.Conn.Write(b)
}

// TestLinkRefusesPeersWithoutTheKey: a keyed node takes no request from a
// client that cannot prove the key: not after a garbage hello, a hello
// without a MAC, one with a MAC under another key, nor a hello replayed
// from a connection that did prove it. Each is answered (at most) with a
// refusal and closed, and the requests sent behind the hello never run.
func TestLinkRefusesPeersWithoutTheKey(t *testing.T) {
	s := startLinkNode(t, func(c *Config) { c.ClusterKeys = [][]byte{testOldKey} })

	// A real handshake, recorded: its bytes are what an eavesdropper has.
	nc, err := net.Dial("tcp", s.LinkAddr())
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{Conn: nc}
	good, err := imqlink.Client(rec, imqlink.Config{Role: imqlink.RoleGateway, ID: "gw-1", PeerRoles: []imqpb.LinkRole{imqlink.RoleNode}, Keys: [][]byte{testOldKey}})
	if err != nil {
		t.Fatalf("keyed handshake: %v", err)
	}
	recorded := bytes.Clone(rec.sent.Bytes())
	good.Close(nil)

	hello := func(h *imqpb.Hello) []byte {
		b, _ := imqlink.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: h}})
		return b
	}
	nonce := bytes.Repeat([]byte{7}, 32)
	for _, c := range []struct {
		name   string
		stream []byte // sent at once, before reading anything
		reason imqlink.Reason
	}{
		{"garbage", imqlink.AppendFrame(nil, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")), imqlink.ReasonMalformed},
		{"a request instead of a hello", nil, imqlink.ReasonMalformed},
		{"no MAC", hello(&imqpb.Hello{Id: "gw-x", Role: imqlink.RoleGateway, MinProtocol: 2, MaxProtocol: 2, Nonce: nonce}), imqlink.ReasonMode},
		{"wrong MAC", hello(&imqpb.Hello{Id: "gw-x", Role: imqlink.RoleGateway, MinProtocol: 2, MaxProtocol: 2, Nonce: nonce, Mac: bytes.Repeat([]byte{1}, 32)}), imqlink.ReasonAuth},
		{"replayed", recorded, imqlink.ReasonAuth},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := counterValue(t, s.m.linkHandshakeFailures.WithLabelValues(string(c.reason)))
			conn, err := net.Dial("tcp", s.LinkAddr())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// The hello, and a request pipelined behind it.
			if _, err := conn.Write(append(bytes.Clone(c.stream), publishFrame(t)...)); err != nil {
				t.Fatal(err)
			}
			fr := imqlink.NewFrameReader(conn, imqlink.MaxFrame)
			conn.SetReadDeadline(time.Now().Add(waitFor))
			var frames []*imqpb.LinkDown
			for {
				b, err := fr.Next()
				if err != nil {
					if err != io.EOF && !isReset(err) {
						t.Fatalf("read: %v; want the node to close the link", err)
					}
					break
				}
				var m imqpb.LinkDown
				if err := proto.Unmarshal(b, &m); err != nil {
					t.Fatal(err)
				}
				frames = append(frames, &m)
			}
			for i, m := range frames {
				if i == 0 && m.GetChallenge() != nil || i == 1 && m.GetHelloAck().GetRefused() != "" {
					continue
				}
				t.Fatalf("frame %d to an unauthenticated peer: %v", i, m)
			}
			if n := s.queueCount.Load(); n != 0 {
				t.Fatalf("the node holds %d queues: it ran a request of an unauthenticated peer", n)
			}
			testutil.WaitFor(t, waitFor, "the failure counted", func() bool {
				return counterValue(t, s.m.linkHandshakeFailures.WithLabelValues(string(c.reason))) == before+1
			})
		})
	}
	// And the key does open it.
	l := dialLinkWith(t, s.LinkAddr(), imqlink.Config{ID: "gw-1", Keys: [][]byte{testOldKey}})
	r := l.do(&imqpb.NodeRequest{User: "alice", Session: "s1", Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{Queue: "/room/1", Mount: "chat", Payload: []byte(`"x"`)}}})
	if r.GetCode() != imqpb.Code_OK {
		t.Fatalf("publish over a keyed link: %v", r)
	}
}

// isReset: the node closed the socket with our request unread, which TCP
// reports as a reset.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// TestLinkKeyRotation: a node holding [new, old] takes gateways proving
// either; one holding only the new key refuses the old.
func TestLinkKeyRotation(t *testing.T) {
	for _, c := range []struct {
		name      string
		node, gw  [][]byte
		wantError bool
	}{
		{"old key", [][]byte{testNewKey, testOldKey}, [][]byte{testOldKey}, false},
		{"new key", [][]byte{testNewKey, testOldKey}, [][]byte{testNewKey}, false},
		{"old key dropped", [][]byte{testNewKey}, [][]byte{testOldKey}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := startLinkNode(t, func(cfg *Config) { cfg.ClusterKeys = c.node })
			nc, err := net.Dial("tcp", s.LinkAddr())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			conn, err := imqlink.Client(nc, imqlink.Config{Role: imqlink.RoleGateway, ID: "gw-1", PeerRoles: []imqpb.LinkRole{imqlink.RoleNode}, Keys: c.gw})
			if (err != nil) != c.wantError {
				t.Fatalf("handshake error %v, want error %v", err, c.wantError)
			}
			if err != nil && imqlink.ReasonOf(err) != imqlink.ReasonRefused {
				t.Fatalf("reason %q, want refused", imqlink.ReasonOf(err))
			}
			if conn != nil {
				conn.Close(nil)
			}
		})
	}
}

// TestHugeLengthPrefixesCostNoMemory: sockets that announce frames of 16
// MiB and send nothing more do not make the node allocate them (12 such
// sockets used to cost about 190 MiB), and sockets that stay silent are
// closed after the handshake timeout. The heap is sampled while they are
// open.
func TestHugeLengthPrefixesCostNoMemory(t *testing.T) {
	const handshakeTimeout = 300 * time.Millisecond
	s := startLinkNode(t, func(c *Config) {
		// All 24 come from one address: this test is about what each
		// costs, not the per-address cap (TestHalfOpenFloodIsBounded).
		c.LinkHandshakeTimeout, c.MaxLinkHandshakesPerAddr = handshakeTimeout, 32
	})
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	maxGrowth := uint64(0)
	sample := func() {
		runtime.ReadMemStats(&ms)
		if ms.HeapInuse > base {
			maxGrowth = max(maxGrowth, ms.HeapInuse-base)
		}
	}

	var conns []net.Conn
	for i := range 24 {
		c, err := net.Dial("tcp", s.LinkAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// 12 announce 16 MiB, 12 a frame within the handshake's limit.
		n := uint32(0x00FFFFFF)
		if i%2 == 1 {
			n = imqlink.MaxHandshakeFrame
		}
		if _, err := c.Write(binary.BigEndian.AppendUint32(nil, n)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	start := time.Now()
	closedAt := make([]time.Duration, len(conns))
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(waitFor))
		buf := make([]byte, 4096)
		for {
			sample()
			if _, err := c.Read(buf); err != nil { // the challenge, then the close
				break
			}
		}
		closedAt[i] = time.Since(start)
	}
	sample()
	if maxGrowth > 4<<20 {
		t.Fatalf("the node's heap grew by %d bytes for 24 sockets that sent a header each", maxGrowth)
	}
	for i := 1; i < len(conns); i += 2 {
		if closedAt[i] < handshakeTimeout*3/4 || closedAt[i] > 3*time.Second {
			t.Fatalf("a socket silent after its header was closed after %s, want about the %s handshake timeout", closedAt[i], handshakeTimeout)
		}
	}
	failures := func(r imqlink.Reason) float64 {
		return counterValue(t, s.m.linkHandshakeFailures.WithLabelValues(string(r)))
	}
	testutil.WaitFor(t, waitFor, "12 malformed and 12 timed-out handshakes counted", func() bool {
		return failures(imqlink.ReasonMalformed) == 12 && failures(imqlink.ReasonTimeout) == 12
	})
}

// TestHalfOpenFloodIsBounded: thousands of sockets from many addresses
// that hold no key and send a handshake frame's header and most of its
// body, then nothing, neither keep a gateway holding the key from linking
// nor make the node hold memory in proportion to their number: it keeps
// at most MaxLinkHandshakes of them, each without a read buffer.
func TestHalfOpenFloodIsBounded(t *testing.T) {
	const addrs, perAddr = 64, 40 // 2,560 sockets, 40 from each address
	s := startLinkNode(t, func(c *Config) { c.ClusterKeys = [][]byte{testOldKey} })
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	var flood []net.Conn
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	junk := append([]byte{0, 0, 0x10, 0x00}, make([]byte, 4000)...) // 4,000 of an announced 4,096 bytes
	for i := range addrs {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(i+1))}}
		for range perAddr {
			c, err := d.Dial("tcp", s.LinkAddr())
			if err != nil {
				t.Fatalf("flood socket %d: %v", len(flood), err)
			}
			flood = append(flood, c)
			c.Write(junk) // the node may have closed it already
		}
	}
	// The node accepts in order: once the gateway's link is up, every
	// flood socket has been through the gate.
	gw := dialLinkWith(t, s.LinkAddr(), imqlink.Config{ID: "gw-1", Keys: [][]byte{testOldKey}})
	gw.ok(publishReq("/room/after-the-flood", "chat"))

	// Let the slots' goroutines read what their sockets sent.
	time.Sleep(200 * time.Millisecond)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d half-open sockets: heap in use grew %.1f MiB (%.1f KiB per socket); %d handshakes in flight",
		len(flood), float64(grew)/(1<<20), float64(grew)/1024/float64(len(flood)), s.gate.InFlight())
	if n := s.gate.InFlight(); n > s.cfg.MaxLinkHandshakes {
		t.Fatalf("%d handshakes in flight, the bound is %d", n, s.cfg.MaxLinkHandshakes)
	}
	for _, shed := range []imqlink.Shed{imqlink.ShedAddr, imqlink.ShedOldest} {
		if counterValue(t, s.m.linkHandshakesShed.WithLabelValues(string(shed))) == 0 {
			t.Errorf("no connection counted as shed by %q", shed)
		}
	}
	// Unbounded, each socket held a 32 KiB read buffer and its frame:
	// about 95 MiB here. Bounded: 256 frames of 4 KiB, and both ends'
	// socket structures.
	if limit := int64(16 << 20); grew > limit {
		t.Fatalf("heap in use grew %d bytes for %d half-open sockets, want at most %d", grew, len(flood), limit)
	}
}
