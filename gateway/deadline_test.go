package gateway_test

import (
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
