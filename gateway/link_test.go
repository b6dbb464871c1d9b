package gateway_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	imqpb "github.com/imq-dev/imq/proto"
	"github.com/imq-dev/imq/queuenode"
)

// TestSilentNodeLinkIsDropped: a queue node that completes the handshake and
// then answers nothing (a vanished host) is declared dead after LinkTimeout,
// and the gateway dials again.
func TestSilentNodeLinkIsDropped(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.Dev, cfg.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, ln.Addr().String()
	cfg.LinkPingInterval, cfg.LinkTimeout = 50*time.Millisecond, 300*time.Millisecond
	startGateway(t, cfg)

	// accept takes a link and runs the node's end of its handshake.
	accept := func() *link.Conn {
		t.Helper()
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		conn, err := link.Server(c, link.Config{Role: link.RoleNode, ID: "silent", PeerRoles: []imqpb.LinkRole{link.RoleGateway}, Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}
	conn := accept()
	defer conn.Close(nil)
	start := time.Now()
	pings := 0
	for {
		b, err := conn.Next()
		if err != nil {
			break // the gateway closed the link
		}
		var up imqpb.LinkUp
		if proto.Unmarshal(b, &up) == nil && up.GetPing() != nil {
			pings++
		}
	}
	elapsed := time.Since(start)
	if pings == 0 {
		t.Fatal("the gateway never pinged")
	}
	if elapsed < 250*time.Millisecond || elapsed > 3*time.Second {
		t.Fatalf("link dropped after %s, want about the 300ms link timeout", elapsed)
	}
	accept().Close(nil) // and it comes back
}

func startGateway(t *testing.T, cfg gateway.Config) *gateway.Server {
	t.Helper()
	gw, err := gateway.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go gw.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		gw.Shutdown(ctx)
	})
	return gw
}

var (
	oldKey = []byte("old-cluster-key-0123456789abcdef")
	newKey = []byte("new-cluster-key-0123456789abcdef")
)

// TestLinkClusterKeys: a gateway links to a queue node only when it proves
// a key the node holds; the node accepts any key in its list, so a key
// rotates without a link going down.
func TestLinkClusterKeys(t *testing.T) {
	for _, c := range []struct {
		name          string
		node, gateway [][]byte
		up            bool
		nodeReason    link.Reason // the node's count of failed handshakes
		gatewayReason link.Reason
	}{
		{"same key", [][]byte{oldKey}, [][]byte{oldKey}, true, "", ""},
		{"rotating: the gateway still proves the old key", [][]byte{newKey, oldKey}, [][]byte{oldKey}, true, "", ""},
		{"rotating: the gateway proves the new key", [][]byte{newKey, oldKey}, [][]byte{newKey, oldKey}, true, "", ""},
		{"the node dropped the gateway's key", [][]byte{newKey}, [][]byte{oldKey}, false, link.ReasonAuth, link.ReasonRefused},
		{"a gateway without a key", [][]byte{oldKey}, [][]byte{}, false, link.ReasonMode, link.ReasonMode},
		{"a node without a key", [][]byte{}, [][]byte{oldKey}, false, link.ReasonMode, link.ReasonMode},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := launch.LocalDevConfig()
			cfg.Gateway.JWTSecret = testSecret
			cfg.QueueNode.ClusterKeys, cfg.Gateway.ClusterKeys = c.node, c.gateway
			d, err := launch.StartDev(cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				d.Shutdown(ctx)
			})
			if !c.up {
				addr := d.Gateway.InternalAddr() // the node's metrics too: one registry
				testutil.WaitFor(t, 5*time.Second, "both sides to count the handshake failure", func() bool {
					return handshakeFailures(t, addr, "imq_gateway_link_handshake_failures_total", c.gatewayReason) > 0 &&
						handshakeFailures(t, addr, "imq_queuenode_link_handshake_failures_total", c.nodeReason) > 0
				})
				if resp, err := http.Get("http://" + d.Gateway.Addr() + "/healthz"); err != nil || resp.StatusCode == http.StatusOK {
					t.Fatalf("gateway healthy without a link: %v %v", resp, err)
				}
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := d.WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			cl := mustDial(t, d, "alice", false)
			expectCode(t, cl.join("/room/keyed", chat()), imqpb.Code_OK)
			expectCode(t, cl.publish("/room/keyed", "chat", []byte(`"hi"`)), imqpb.Code_OK)
		})
	}
}

// handshakeFailures reads a count of failed link handshakes from the
// internal listener at addr.
func handshakeFailures(t *testing.T, addr, name string, reason link.Reason) float64 {
	t.Helper()
	var f float64
	fmt.Sscan(metricValue(t, addr, fmt.Sprintf("%s{reason=%q}", name, reason)), &f)
	return f
}

// TestGatewayRefusesFakeNode: a process that answers at a queue node's
// address without the cluster key (it accepts any hello and answers with a
// MAC it cannot compute) gets no request from a keyed gateway: the gateway
// verifies the node's proof before it sends anything.
func TestGatewayRefusesFakeNode(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.Dev, cfg.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, ln.Addr().String()
	cfg.ClusterKeys = [][]byte{oldKey}
	gw := startGateway(t, cfg)

	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	write := func(m *imqpb.LinkDown) {
		b, _ := link.MarshalFrame(m)
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	write(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Challenge{Challenge: &imqpb.Challenge{Nonce: nonce, MinProtocol: link.Protocol, MaxProtocol: link.Protocol, Keyed: true}}})
	fr := link.NewFrameReader(c, link.MaxFrame)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := fr.Next()
	var up imqpb.LinkUp
	if err == nil {
		err = proto.Unmarshal(b, &up)
	}
	if err != nil || up.GetHello() == nil {
		t.Fatalf("first frame: %v %v", &up, err)
	}
	write(&imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: &imqpb.HelloAck{
		NodeId: "fake", Role: link.RoleNode, Protocol: link.Protocol, Mac: make([]byte, 32),
	}}})
	// The gateway closes the link; a client's join meanwhile finds no node.
	d := &launch.Dev{Gateway: gw}
	cl := mustDial(t, d, "alice", false)
	expectCode(t, cl.join("/room/1", chat()), imqpb.Code_UNAVAILABLE)
	if b, err := fr.Next(); err == nil {
		t.Fatalf("the gateway sent a frame of %d bytes to a node that did not prove the key", len(b))
	}
	testutil.WaitFor(t, 5*time.Second, "the gateway to count the auth failure", func() bool {
		return handshakeFailures(t, gw.InternalAddr(), "imq_gateway_link_handshake_failures_total", link.ReasonAuth) > 0
	})
}

// TestGatewayRefusesNodeWithAnotherID: a queue node that holds the cluster
// key but is not the node the table names at its address (a redirected or
// misconfigured address) gets no link: the gateway checks the id the
// node proved in the handshake, and routes nothing there.
func TestGatewayRefusesNodeWithAnotherID(t *testing.T) {
	cfg := queuenode.DefaultConfig()
	cfg.NodeID, cfg.LinkAddr, cfg.ClusterKeys = "qz", "127.0.0.1:0", [][]byte{oldKey}
	n, err := queuenode.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go n.Run(context.Background())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Shutdown(ctx)
	})
	gw := startClusterGateway(t, func(c *gateway.Config) { c.ClusterKeys = [][]byte{oldKey} })
	gw.InstallTable(bucket.Single(bucket.Node{ID: "qa", LinkAddr: n.LinkAddr()}))
	testutil.WaitFor(t, 5*time.Second, "the gateway to refuse the node's id", func() bool {
		return handshakeFailures(t, gw.InternalAddr(), "imq_gateway_link_handshake_failures_total", link.ReasonPeer) > 0
	})
	if gw.Links()["qa"] {
		t.Fatal("the gateway linked to node qz as qa")
	}
}
