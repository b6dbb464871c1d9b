package gateway_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
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

	// accept takes a link, answers its hello, and returns it.
	accept := func() (net.Conn, *wire.FrameReader) {
		t.Helper()
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		fr := wire.NewFrameReader(c, wire.DefaultMaxLinkFrame)
		b, err := fr.Next()
		var up imqpb.LinkUp
		if err == nil {
			err = proto.Unmarshal(b, &up)
		}
		if err != nil || up.GetHello() == nil {
			t.Fatalf("first frame: %v %v", &up, err)
		}
		ack, _ := wire.MarshalFrame(&imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: &imqpb.HelloAck{NodeId: "silent", Protocol: gateway.LinkProtocol}}})
		c.Write(ack)
		return c, fr
	}
	c, fr := accept()
	defer c.Close()
	start := time.Now()
	pings := 0
	for {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := fr.Next()
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
	c2, _ := accept() // and it comes back
	c2.Close()
}
