package gateway_test

import (
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// The gateway's half of a live hand-off (docs/handoff.md, "The gateways"),
// against fake queue nodes A (qa) and B (qb) that the tests drive frame by
// frame: A's mark moves the bucket's subscriptions to B's link, B hears
// BucketAdopted before it sends anything, and the client sees every event
// once, in order.

// deliver sends an event of queue with offset on f's links.
func (f *fakeNode) deliver(queue string, offset uint64) {
	frame, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: queue, Mount: "chat", Offset: offset}}})
	f.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{Queue: queue, Mount: "chat", Frame: frame}}})
}

// mark sends A's BucketMoving for queue's bucket in table tb.
func (f *fakeNode) mark(tb *bucket.Table, queue, to string, version uint64) {
	f.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketMoving{BucketMoving: &imqpb.BucketMoving{
		Bucket: uint32(tb.Bucket(queue)), Bits: uint32(tb.Bits()), ToNode: to, TableVersion: version,
	}}})
}

// adoptedMsg waits for the gateway's BucketAdopted.
func (f *fakeNode) adoptedMsg(t *testing.T) *imqpb.BucketAdopted {
	t.Helper()
	select {
	case m := <-f.adopted:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("the fake node got no BucketAdopted")
		return nil
	}
}

// otherBucket returns a queue that tb gives to node, in another bucket than
// queue's.
func otherBucket(t *testing.T, tb *bucket.Table, node, queue string) string {
	t.Helper()
	for i := range 100 {
		q := queueOn(t, tb, node, "other"+string(rune('a'+i%26))+string(rune('a'+i/26)))
		if tb.Bucket(q) != tb.Bucket(queue) {
			return q
		}
	}
	t.Fatal("no queue in another bucket")
	return ""
}

// events reads n events and returns their offsets by queue.
func events(t *testing.T, c *rawClient, n int) map[string][]uint64 {
	t.Helper()
	out := map[string][]uint64{}
	for range n {
		ev := nextEvent(t, c)
		out[ev.GetQueue()] = append(out[ev.GetQueue()], ev.GetOffset())
	}
	return out
}

// noMore pings and fails if an event or an Unsubscribed arrives before the
// pong.
func (c *rawClient) noMore() {
	c.t.Helper()
	id := c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}})
	for {
		m := c.next()
		if m.GetEvent() != nil || m.GetUnsubscribed() != nil {
			c.t.Fatalf("unexpected %v", m)
		}
		if p := m.GetPong(); p != nil && p.GetId() == id {
			return
		}
	}
}

func expectOffsets(t *testing.T, got map[string][]uint64, queue string, want ...uint64) {
	t.Helper()
	if !slices.Equal(got[queue], want) {
		t.Fatalf("%s got offsets %v, want %v (all: %v)", queue, got[queue], want, got)
	}
}

// twoNodes starts fake nodes A and B (joins through A answered by handleA)
// and a gateway routing by a table of both.
func twoNodes(t *testing.T, handleA func(*imqpb.NodeRequest) *imqpb.NodeReply) (*gateway.Server, *fakeNode, *fakeNode, *bucket.Table) {
	t.Helper()
	gw := startClusterGateway(t, nil)
	a, b := startFakeNode(t, handleA), startFakeNodeID(t, "qb", fakeOK)
	tb := mustJoin(t, bucket.Single(bucket.Node{ID: "qa", LinkAddr: a.addr()}), bucket.Node{ID: "qb", LinkAddr: b.addr()})
	install(t, gw, tb)
	return gw, a, b, tb
}

// TestHandoffRebind: A's events up to its mark, then B's after the gateway
// said BucketAdopted, reach the subscriber once each and in order; A's
// events of the bucket after the mark do not, while its other buckets are
// untouched; the subscription's leave goes to B.
func TestHandoffRebind(t *testing.T) {
	gw, a, b, tb := twoNodes(t, fakeOK)
	q := queueOn(t, tb, "qa", "moving")
	other := otherBucket(t, tb, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)

	for i := range uint64(3) {
		a.deliver(q, i+1)
	}
	a.mark(tb, q, "qb", tb.Version())
	a.deliver(q, 999)   // after the mark: A no longer serves the bucket
	a.deliver(other, 1) // and behind it on the link, an event of a bucket that stays
	ad := b.adoptedMsg(t)
	if ad.GetBucket() != uint32(tb.Bucket(q)) || ad.GetBits() != uint32(tb.Bits()) || ad.GetFromNode() != "qa" {
		t.Fatalf("BucketAdopted %v, want bucket %d bits %d from qa", ad, tb.Bucket(q), tb.Bits())
	}
	for i := range uint64(3) {
		b.deliver(q, i+4)
	}
	got := events(t, c, 7)
	expectOffsets(t, got, q, 1, 2, 3, 4, 5, 6)
	expectOffsets(t, got, other, 1)
	c.noMore()

	// B's events reach only the rebound subscription, A's other bucket
	// stays A's.
	b.deliver(other, 2)
	a.deliver(other, 3)
	expectOffsets(t, events(t, c, 1), other, 3)

	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: q}}}), imqpb.Code_OK)
	if r := b.request(t); r.GetLeave().GetQueue() != q {
		t.Fatalf("B got %v, want the leave of %s", r, q)
	}
	for name, want := range map[string]string{
		`imq_gateway_rebinds_total{result="ok"}`:    "1",
		`imq_gateway_rebinds_total{result="error"}`: "0",
		`imq_gateway_subscriptions_rebound_total`:   "1",
	} {
		if v := metricValue(t, gw.InternalAddr(), name); v != want {
			t.Errorf("%s = %q, want %s", name, v, want)
		}
	}
}

// TestHandoffServedBy: a join that A forwarded to B (its reply says
// served_by qb) is bound to B's link: B's events reach it, A's do not.
func TestHandoffServedBy(t *testing.T) {
	var q string
	gw, a, b, tb := twoNodes(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		r := fakeOK(req)
		if req.GetJoin().GetQueue() == q {
			r.ServedBy = "qb"
		}
		return r
	})
	q = queueOn(t, tb, "qa", "forwarded")
	other := otherBucket(t, tb, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)

	a.deliver(q, 1)
	a.deliver(other, 1) // behind A's event of q on its link
	b.deliver(q, 2)
	got := events(t, c, 2)
	expectOffsets(t, got, q, 2)
	expectOffsets(t, got, other, 1)
	c.noMore()
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: q}}}), imqpb.Code_OK)
	if r := b.request(t); r.GetLeave().GetQueue() != q {
		t.Fatalf("B got %v, want the leave of %s", r, q)
	}
}

// TestHandoffWaitsForTable: a mark naming a node the gateway's table does
// not have yet waits for the table that does; events from A after the mark
// are ignored meanwhile, and B's after the BucketAdopted arrive.
func TestHandoffWaitsForTable(t *testing.T) {
	gw := startClusterGateway(t, nil)
	a, b := startFakeNode(t, fakeOK), startFakeNodeID(t, "qb", fakeOK)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: a.addr()})
	t2 := mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: b.addr()})
	install(t, gw, t1)
	q := queueOn(t, t2, "qa", "late")
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)

	a.deliver(q, 1)
	a.mark(t2, q, "qb", t2.Version())
	a.deliver(q, 999)
	if ev := nextEvent(t, c); ev.GetOffset() != 1 {
		t.Fatalf("event %v, want offset 1", ev)
	}
	time.Sleep(100 * time.Millisecond) // the rebind waits, and A's 999 goes nowhere
	install(t, gw, t2)
	b.adoptedMsg(t)
	b.deliver(q, 2)
	expectOffsets(t, events(t, c, 1), q, 2)
	c.noMore()
}

// TestHandoffServedByWaitsForTable: a join served by a node the gateway has
// no link to yet is bound to it once a table names it.
func TestHandoffServedByWaitsForTable(t *testing.T) {
	gw := startClusterGateway(t, nil)
	var t2 *bucket.Table
	a := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		r := fakeOK(req)
		if req.GetJoin() != nil {
			r.ServedBy, r.TableVersion = "qb", t2.Version()
		}
		return r
	})
	b := startFakeNodeID(t, "qb", fakeOK)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: a.addr()})
	t2 = mustJoin(t, t1, bucket.Node{ID: "qb", LinkAddr: b.addr()})
	install(t, gw, t1)
	c := dialGateway(t, gw, "alice")
	q := queueOn(t, t2, "qa", "late-join")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	a.deliver(q, 1) // not the node that holds the subscriber
	install(t, gw, t2)
	testutil.WaitFor(t, 5*time.Second, "the subscription bound to qb", func() bool {
		return metricValue(t, gw.InternalAddr(), "imq_gateway_subscriptions_rebound_total") == "1"
	})
	b.deliver(q, 2)
	expectOffsets(t, events(t, c, 1), q, 2)
	c.noMore()
}

// TestHandoffFailsHonestly: when the new owner's link cannot be had in the
// bound (no table names it), the moving bucket's subscriptions end with
// MOVED and rejoin; the others stay.
func TestHandoffFailsHonestly(t *testing.T) {
	gw := startClusterGateway(t, nil)
	gw.SetRebindWait(200 * time.Millisecond)
	a := startFakeNode(t, fakeOK)
	t1 := bucket.Single(bucket.Node{ID: "qa", LinkAddr: a.addr()})
	install(t, gw, t1)
	q := queueOn(t, t1, "qa", "stranded")
	other := otherBucket(t, t1, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)

	a.mark(t1, q, "qb", t1.Version()+1)
	expectUnsubscribed(t, c.unsubscribed(), q, imqpb.Reason_REASON_MOVED)
	a.deliver(other, 1)
	expectOffsets(t, events(t, c, 1), other, 1)
	c.noMore()
	if v := metricValue(t, gw.InternalAddr(), `imq_gateway_rebinds_total{result="error"}`); v != "1" {
		t.Fatalf("failed rebinds %q, want 1", v)
	}
}

// TestHandoffFailedAfterMark: a hand-off that fails after its mark leaves
// the queue with A, which closes it on its own link; the subscription the
// mark had moved to B ends (MOVED, rejoin) rather than wait for events B
// will never send.
func TestHandoffFailedAfterMark(t *testing.T) {
	gw, a, b, tb := twoNodes(t, fakeOK)
	q := queueOn(t, tb, "qa", "moving")
	other := otherBucket(t, tb, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)
	a.mark(tb, q, "qb", tb.Version())
	b.adoptedMsg(t) // rebound to B
	a.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_QueueClosed{QueueClosed: &imqpb.QueueClosed{
		Queue: q, Reason: imqpb.Reason_REASON_MOVED, Message: "hand-off failed; rejoin",
	}}})
	expectUnsubscribed(t, c.unsubscribed(), q, imqpb.Reason_REASON_MOVED)
	a.deliver(other, 1) // the other bucket's subscription stands
	expectOffsets(t, events(t, c, 1), other, 1)
}

// kill closes f's listener and every connection: the node is gone.
func (f *fakeNode) kill() {
	f.ln.Close()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
}

// unsubscribedN reads until n Unsubscribed arrive and returns their
// reasons by queue; events are skipped.
func unsubscribedN(c *rawClient, n int) map[string]imqpb.Reason {
	got := map[string]imqpb.Reason{}
	for len(got) < n {
		if u := c.next().GetUnsubscribed(); u != nil {
			got[u.GetQueue()] = u.GetReason()
		}
	}
	return got
}

// TestHandoffOldOwnerLostBeforeHeld: A marks q's bucket moving to B, the
// gateway rebinds q's subscription to B and confirms; A dies before B said
// bucket_held (B may never get the bucket: rule 1 then gives it to B
// afresh). The rebound subscription ends NODE_LOST with A's link, as the
// one still bound to A does, rather than wait on B in silence.
func TestHandoffOldOwnerLostBeforeHeld(t *testing.T) {
	gw, a, b, tb := twoNodes(t, fakeOK)
	q := queueOn(t, tb, "qa", "moving")
	other := otherBucket(t, tb, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)
	a.mark(tb, q, "qb", tb.Version())
	b.adoptedMsg(t) // rebound to B
	a.kill()
	got := unsubscribedN(c, 2)
	if got[q] != imqpb.Reason_REASON_NODE_LOST || got[other] != imqpb.Reason_REASON_NODE_LOST {
		t.Fatalf("after A died: unsubscribed %v, want both %s and %s NODE_LOST", got, q, other)
	}
}

// TestHandoffHeldOutlivesOldOwner: once B said bucket_held, the
// subscription it confirmed lives on B alone: A dying ends only the
// subscription still bound to A, and B's events reach the rebound one.
func TestHandoffHeldOutlivesOldOwner(t *testing.T) {
	gw, a, b, tb := twoNodes(t, fakeOK)
	q := queueOn(t, tb, "qa", "moving")
	other := otherBucket(t, tb, "qa", q)
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	expectCode(t, c.join(other, chat()), imqpb.Code_OK)
	a.mark(tb, q, "qb", tb.Version())
	ba := b.adoptedMsg(t)
	b.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketHeld{BucketHeld: ba}})
	b.deliver(q, 1) // behind bucket_held on B's link: the gateway applied it
	expectOffsets(t, events(t, c, 1), q, 1)
	a.kill()
	expectUnsubscribed(t, c.unsubscribed(), other, imqpb.Reason_REASON_NODE_LOST)
	b.deliver(q, 2)
	expectOffsets(t, events(t, c, 1), q, 2)
	c.noMore()
}

// TestHandoffBucketDropped: B gave up holding the bucket for this gateway
// (bucket_dropped): the subscription rebound to B and never confirmed ends
// MOVED (rejoin).
func TestHandoffBucketDropped(t *testing.T) {
	gw, a, b, tb := twoNodes(t, fakeOK)
	q := queueOn(t, tb, "qa", "moving")
	c := dialGateway(t, gw, "alice")
	expectCode(t, c.join(q, chat()), imqpb.Code_OK)
	a.mark(tb, q, "qb", tb.Version())
	ba := b.adoptedMsg(t)
	b.push(&imqpb.LinkDown{Msg: &imqpb.LinkDown_BucketDropped{BucketDropped: ba}})
	expectUnsubscribed(t, c.unsubscribed(), q, imqpb.Reason_REASON_MOVED)
	c.noMore()
}
