package queuenode

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestSilentGatewayLinkIsDropped: a gateway that says hello and then sends
// nothing, not even pings, has its link closed after LinkTimeout.
func TestSilentGatewayLinkIsDropped(t *testing.T) {
	cfg := DefaultConfig()
	cfg.LinkAddr, cfg.LinkTimeout = "127.0.0.1:0", 300*time.Millisecond
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go s.Run(context.Background())
	t.Cleanup(func() { s.Shutdown(context.Background()) })

	c, err := net.Dial("tcp", s.LinkAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hello, _ := wire.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: &imqpb.Hello{GatewayId: "gw-silent", Protocol: LinkProtocol}}})
	c.Write(hello)
	fr := wire.NewFrameReader(c, wire.DefaultMaxLinkFrame)
	b, err := fr.Next()
	var down imqpb.LinkDown
	if err == nil {
		err = proto.Unmarshal(b, &down)
	}
	if err != nil || down.GetHelloAck() == nil {
		t.Fatalf("no hello ack: %v %v", &down, err)
	}
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := fr.Next(); err == nil {
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
