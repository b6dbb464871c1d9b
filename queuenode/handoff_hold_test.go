package queuenode

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// The new owner's holds (docs/handoff.md, Release): node b adopts one
// bucket from a peer the tests play as node "a", and fake gateways confirm
// (or do not) as the tests say.

// adoptTable returns a table in which one bucket moves from a to node b
// (at bAddr), that bucket, and a queue in it.
func adoptTable(t *testing.T, bAddr string) (*bucket.Table, bkey, string) {
	t.Helper()
	v1 := bucket.Single(bucket.Node{ID: "a", LinkAddr: testutil.ClosedAddr(t)})
	layout, _, err := v1.Join(bucket.Node{ID: "b", LinkAddr: bAddr})
	if err != nil {
		t.Fatal(err)
	}
	marked, _ := v1.Advance(layout, layout.Nodes(), 1, nil)
	mv := marked.Moving()[0].Bucket
	q := queuesWhere(t, 1, func(q string) bool { return marked.Bucket(q) == mv })[0]
	return marked, bkey{bits: marked.Bits(), b: mv}, q
}

// roomSnap is a snapshot of queue with a chat mount and subs.
func roomSnap(queue string, subs ...*imqpb.SubscriberSnapshot) *imqpb.QueueSnapshot {
	now := time.Now().UnixNano()
	return &imqpb.QueueSnapshot{Name: queue, Epoch: 7, CreatedUnixNano: now, LastActiveUnixNano: now,
		Mounts: []*imqpb.MountSnapshot{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}}, Subscribers: subs}
}

// sendBucket streams snaps of bucket k to the node at addr as node "a",
// naming gateways as those it marked, and returns the peer's link; the
// caller reads the ack (awaitAck).
func sendBucket(t *testing.T, addr string, table *bucket.Table, k bkey, gateways []string, snaps ...*imqpb.QueueSnapshot) *testLink {
	t.Helper()
	peer := dialLinkWith(t, addr, imqlink.Config{Role: imqlink.RoleNode, ID: "a"})
	peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffQueues{HandoffQueues: &imqpb.HandoffQueues{
		Bucket: uint32(k.b), Bits: uint32(k.bits), TableVersion: table.Version(), Queues: snaps}}})
	peer.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_HandoffEnd{HandoffEnd: &imqpb.HandoffEnd{
		Bucket: uint32(k.b), Bits: uint32(k.bits), TableVersion: table.Version(), Queues: uint32(len(snaps)), Gateways: gateways}}})
	return peer
}

func awaitAck(t *testing.T, peer *testLink) {
	t.Helper()
	for {
		if ack := peer.read().GetHandoffAck(); ack != nil {
			if ack.GetCode() != imqpb.Code_OK {
				t.Fatalf("hand-off acked %v %q", ack.GetCode(), ack.GetMessage())
			}
			return
		}
	}
}

func confirm(l *testLink, k bkey) {
	l.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_BucketAdopted{BucketAdopted: &imqpb.BucketAdopted{
		Bucket: uint32(k.b), Bits: uint32(k.bits), FromNode: "a"}}})
}

// kinds names the frames of interest in frames, in order: "closed:<queue>",
// "held", "dropped", "reply:<code>", "event:<offset>".
func kinds(t *testing.T, frames []*imqpb.LinkDown, queue string) []string {
	t.Helper()
	var out []string
	for _, m := range frames {
		switch {
		case m.GetQueueClosed() != nil:
			out = append(out, "closed:"+m.GetQueueClosed().GetQueue())
		case m.GetBucketHeld() != nil:
			out = append(out, "held")
		case m.GetBucketDropped() != nil:
			out = append(out, "dropped")
		case m.GetReply() != nil:
			out = append(out, "reply:"+m.GetReply().GetCode().String())
		case m.GetDeliver() != nil:
			if offs, _ := offsets(t, []*imqpb.LinkDown{m}, queue); len(offs) == 1 {
				out = append(out, "event:"+string(rune('0'+offs[0])))
			}
		}
	}
	return out
}

// TestAdoptConfirmedDuringInstall: a gateway that had no link to b when b
// took the bucket's snapshot in, links and confirms while b is installing
// the queues. Its subscriber was left out; the confirmation is answered
// once the install is done, with the QueueClosed for that subscriber's
// queue and then bucket_held, rather than release a hold whose list of
// closed queues was still empty (the subscriber silently gone).
func TestAdoptConfirmedDuringInstall(t *testing.T) {
	b := startClusterNode(t, "b")
	table, k, q := adoptTable(t, b.LinkAddr())
	b.setTable(table)
	// Holding q's shard stops the install at q, after the snapshot was
	// restored without a link to gw-late.
	sh := b.shardFor(q)
	sh.mu.Lock()
	var unlock sync.Once
	t.Cleanup(func() { unlock.Do(sh.mu.Unlock) })
	peer := sendBucket(t, b.LinkAddr(), table, k, []string{"gw-late"},
		roomSnap(q, &imqpb.SubscriberSnapshot{Gateway: "gw-late", User: "u-s1", Session: "s1", Mounts: []string{"chat"}}))
	testutil.WaitFor(t, waitFor, "b to restore the snapshot", func() bool { return b.bytesForTest() > 0 })
	gw := dialLink(t, b.LinkAddr(), "gw-late")
	confirm(gw, k)
	gw.sync() // b's reader has taken the confirmation
	unlock.Do(sh.mu.Unlock)
	awaitAck(t, peer)
	testutil.WaitFor(t, waitFor, "b to answer the confirmation", func() bool {
		gw.seen = append(gw.seen, gw.sync()...)
		return slices.Contains(kinds(t, gw.seen, q), "held")
	})
	if got, want := kinds(t, gw.seen, q), []string{"closed:" + q, "held"}; !slices.Equal(got, want) {
		t.Fatalf("gw-late got %v, want %v", got, want)
	}
}

// TestHoldRunsRequestsAfterConfirm: a join from a gateway that has not
// confirmed the bucket is held; the confirmation releases the events held
// for it, then bucket_held, then runs the join. So the gateway's
// subscriptions the hand-off rebound are live before anything it asked
// after them.
func TestHoldRunsRequestsAfterConfirm(t *testing.T) {
	b := startClusterNode(t, "b")
	table, k, q := adoptTable(t, b.LinkAddr())
	b.setTable(table)
	gw1 := dialLink(t, b.LinkAddr(), "gw-1")
	gw2 := dialLink(t, b.LinkAddr(), "gw-2")
	awaitAck(t, sendBucket(t, b.LinkAddr(), table, k, []string{"gw-1"},
		roomSnap(q, &imqpb.SubscriberSnapshot{Gateway: "gw-1", User: "u-s0", Session: "s0", Mounts: []string{"chat"}})))
	pub := publishReq(q, "chat")
	pub.TableVersion = table.Version()
	gw2.ok(pub) // offset 1, held for gw-1
	join := joinReq(q, "s1", "chat")
	join.Id, join.TableVersion = 99, table.Version()
	gw1.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: join}})
	if got := kinds(t, gw1.sync(), q); len(got) != 0 {
		t.Fatalf("before confirming gw-1 got %v, want nothing", got)
	}
	confirm(gw1, k)
	var got []string
	testutil.WaitFor(t, waitFor, "the held join to run", func() bool {
		got = append(got, kinds(t, gw1.sync(), q)...)
		return slices.Contains(got, "reply:OK")
	})
	if want := []string{"event:1", "held", "reply:OK"}; !slices.Equal(got, want) {
		t.Fatalf("after confirming gw-1 got %v, want %v", got, want)
	}
	gw2.ok(pub) // offset 2: not held any more (one frame for the gateway's subscribers)
	if got, want := kinds(t, gw1.sync(), q), []string{"event:2"}; !slices.Equal(got, want) {
		t.Fatalf("after the release gw-1 got %v, want %v", got, want)
	}
}

// TestHoldFailureTellsAtOnce: a gateway that never confirms (its rebind
// gave up, say) has its subscribers to the bucket removed when the hold
// times out, and is told QueueClosed at once, not on a confirmation that
// may never come; its join made meanwhile was held and runs after that
// QueueClosed, and is served (its events are not held). A late
// confirmation is answered bucket_dropped.
func TestHoldFailureTellsAtOnce(t *testing.T) {
	b := startClusterNode(t, "b", func(c *Config) { c.AdoptHoldTime = 200 * time.Millisecond })
	table, k, q := adoptTable(t, b.LinkAddr())
	b.setTable(table)
	gw := dialLink(t, b.LinkAddr(), "gw-1")
	awaitAck(t, sendBucket(t, b.LinkAddr(), table, k, []string{"gw-1"},
		roomSnap(q, &imqpb.SubscriberSnapshot{Gateway: "gw-1", User: "u-s0", Session: "s0", Mounts: []string{"chat"}})))
	join := joinReq(q, "s1", "chat")
	join.Id, join.TableVersion = 99, table.Version()
	gw.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: join}})
	var got []string
	testutil.WaitFor(t, waitFor, "the hold to fail", func() bool {
		got = append(got, kinds(t, gw.sync(), q)...)
		return slices.Contains(got, "reply:OK")
	})
	if want := []string{"closed:" + q, "reply:OK"}; !slices.Equal(got, want) {
		t.Fatalf("gw-1 got %v, want %v", got, want)
	}
	pub := publishReq(q, "chat")
	pub.TableVersion = table.Version()
	gw.ok(pub)
	if got, want := kinds(t, gw.sync(), q), []string{"event:1"}; !slices.Equal(got, want) {
		t.Fatalf("after the failed hold gw-1's fresh subscriber got %v, want %v", got, want)
	}
	confirm(gw, k)
	if got, want := kinds(t, gw.sync(), q), []string{"dropped"}; !slices.Equal(got, want) {
		t.Fatalf("a late confirmation got %v, want %v", got, want)
	}
}

// TestBucketHeldAfterEarlyConfirm: a gateway that confirmed before the
// bucket arrived is told bucket_held once b adopted it.
func TestBucketHeldAfterEarlyConfirm(t *testing.T) {
	b := startClusterNode(t, "b")
	table, k, q := adoptTable(t, b.LinkAddr())
	b.setTable(table)
	gw := dialLink(t, b.LinkAddr(), "gw-1")
	confirm(gw, k)
	if got := kinds(t, gw.sync(), q); len(got) != 0 {
		t.Fatalf("before the bucket came gw-1 got %v", got)
	}
	awaitAck(t, sendBucket(t, b.LinkAddr(), table, k, []string{"gw-1"}, roomSnap(q)))
	if got, want := kinds(t, gw.sync(), q), []string{"held"}; !slices.Equal(got, want) {
		t.Fatalf("gw-1 got %v, want %v", got, want)
	}
}

// TestAdoptedForgottenWhenAbandoned: b adopted a bucket, and then its
// table gives the bucket back to a, unmarked. While a's node link is open
// (a got the ack and forwards; its report may still flip the bucket) b
// keeps the bucket; once that link closes (a gave the hand-off up: its
// ack wait timed out), b forgets it and closes its queues, so no
// subscriber waits on a stale copy.
func TestAdoptedForgottenWhenAbandoned(t *testing.T) {
	b := startClusterNode(t, "b")
	table, k, q := adoptTable(t, b.LinkAddr())
	b.setTable(table)
	gw := dialLink(t, b.LinkAddr(), "gw-1")
	confirm(gw, k)
	peer := sendBucket(t, b.LinkAddr(), table, k, []string{"gw-1"},
		roomSnap(q, &imqpb.SubscriberSnapshot{Gateway: "gw-1", User: "u-s0", Session: "s0", Mounts: []string{"chat"}}))
	awaitAck(t, peer)
	aOnly := []bucket.Node{{ID: "a", LinkAddr: table.Nodes()[0].LinkAddr}}
	unmarked, _ := table.Advance(bucket.Single(aOnly[0]), aOnly, 1, nil)
	if unmarked.MovingCount() != 0 || owner(unmarked, q) != "a" {
		t.Fatalf("table %v: want a owning %s, nothing moving", unmarked, q)
	}
	b.setTable(unmarked)
	if !b.hasQueue(q) {
		t.Fatalf("b dropped %s while a's node link was open", q)
	}
	peer.c.Close()
	testutil.WaitFor(t, waitFor, "b to forget the abandoned bucket", func() bool { return !b.hasQueue(q) })
	if got := closedQueues(t, gw.sync()); !slices.Equal(got, []string{q}) {
		t.Fatalf("gw-1 was told QueueClosed for %v, want %s", got, q)
	}
}
