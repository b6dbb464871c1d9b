package gateway_test

import (
	"net"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestRequestDeadlineSent: every request with a reply carries its deadline
// (RequestTimeout from when the client's request arrived), the same on
// every attempt after MOVED; a leave sent without a reply carries none.
func TestRequestDeadlineSent(t *testing.T) {
	const timeout = 3 * time.Second
	gw := startClusterGateway(t, func(c *gateway.Config) { c.RequestTimeout = timeout })
	gw.SetMovedWait(20 * time.Millisecond)
	fake := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		if req.GetPublish() != nil {
			return &imqpb.NodeReply{Code: imqpb.Code_MOVED, Message: "not mine", TableVersion: 1}
		}
		return fakeOK(req)
	})
	install(t, gw, bucket.Single(bucket.Node{ID: "qa", LinkAddr: fake.addr()}))
	c := dialGateway(t, gw, "alice")

	before := time.Now()
	expectCode(t, c.publish("/room/1", "chat", []byte("1")), imqpb.Code_UNAVAILABLE) // MOVED 5 times
	after := time.Now()
	var deadline int64
	for i := range 5 {
		req := fake.request(t)
		if i == 0 {
			deadline = req.GetDeadlineMs()
			if deadline < before.Add(timeout).UnixMilli() || deadline > after.Add(timeout).UnixMilli() {
				t.Fatalf("deadline_ms %d, want RequestTimeout after the request, in [%d, %d]", deadline, before.Add(timeout).UnixMilli(), after.Add(timeout).UnixMilli())
			}
		}
		if req.GetPublish() == nil || req.GetDeadlineMs() != deadline {
			t.Fatalf("attempt %d: %v, want the first attempt's deadline_ms %d", i+1, req, deadline)
		}
	}

	expectCode(t, c.join("/room/2", chat()), imqpb.Code_OK)
	if req := fake.request(t); req.GetJoin() == nil || req.GetDeadlineMs() == 0 {
		t.Fatalf("join %v without deadline_ms", req)
	}
	c.ws.Close() // the gateway leaves for the closed connection, without a reply
	if req := fake.request(t); req.GetLeave() == nil || req.GetId() != 0 || req.GetDeadlineMs() != 0 {
		t.Fatalf("leave of a closed connection %v: want no id and no deadline_ms", req)
	}
}

// TestNewFailsClean: a New that fails after binding its client listener
// (here the internal address is taken) releases it.
func TestNewFailsClean(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	free.Close()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.QueueNode = free.Addr().String(), taken.Addr().String(), "127.0.0.1:1"
	cfg.Dev = true
	_, err = gateway.New(cfg)
	if err == nil {
		t.Fatal("New listened on an address already taken")
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		t.Fatalf("the client address is still bound after New failed: %v", err)
	}
	ln.Close()
}
