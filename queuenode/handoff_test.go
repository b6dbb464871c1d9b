package queuenode

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// handoffBits is the table size of these tests: 8 buckets.
const handoffBits = 3

// overWire sends snaps through their wire encoding, as a hand-off does.
func overWire(t *testing.T, snaps []*imqpb.QueueSnapshot) []*imqpb.QueueSnapshot {
	t.Helper()
	out := make([]*imqpb.QueueSnapshot, len(snaps))
	for i, s := range snaps {
		b, err := proto.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = &imqpb.QueueSnapshot{}
		if err := proto.Unmarshal(b, out[i]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// queueNames returns the names of the queues s holds, sorted.
func (s *Server) queueNames() []string {
	var out []string
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name := range sh.queues {
			out = append(out, name)
		}
		sh.mu.Unlock()
	}
	slices.Sort(out)
	return out
}

func snapshotNames(snaps []*imqpb.QueueSnapshot) []string {
	var out []string
	for _, s := range snaps {
		out = append(out, s.GetName())
	}
	slices.Sort(out)
	return out
}

// checkCount fails t unless s counts as many queues as it holds.
func checkCount(t *testing.T, s *Server, what string) {
	t.Helper()
	if n, held := s.queueCount.Load(), len(s.queueNames()); n != int64(held) {
		t.Fatalf("%s: the node counts %d queues and holds %d", what, n, held)
	}
}

// TestHandoffExportImport: a bucket's queues leave one node whole and
// arrive on another: the same epochs, offsets, history, state and
// subscribers, the subscribers bound to the adopting node's newest link
// with their gateway (those of a gateway with no link there returned),
// and both nodes' budgets exactly what their queues hold.
func TestHandoffExportImport(t *testing.T) {
	cfg := DefaultConfig()
	cfg.IdleTTL = time.Hour
	a, b := startNode(t, cfg), startNode(t, cfg)
	a1, a2 := dialLink(t, a.LinkAddr(), "gw-1"), dialLink(t, a.LinkAddr(), "gw-2")
	oldB1 := dialLink(t, b.LinkAddr(), "gw-1") // gw-1 reconnected: newB1 is its link
	newB1 := dialLink(t, b.LinkAddr(), "gw-1")

	const moving = 5
	in := queuesWhere(t, 3, func(q string) bool { return bucket.Of(q, handoffBits) == moving })
	out := queuesWhere(t, 2, func(q string) bool { return bucket.Of(q, handoffBits) != moving })
	for i, q := range append(slices.Clone(in), out...) {
		a1.ok(joinReq(q, "p1", "chat"))
		a2.ok(&imqpb.NodeRequest{User: "u-p2", Session: "p2", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
			Queue: q, Mounts: []*imqpb.MountSpec{msgSpec("chat"), stateSpec("score")},
		}}})
		for range i + 2 {
			a1.ok(publishReq(q, "chat"))
		}
		a1.ok(setStateReq(q, "score", "alice"))
	}
	a1.sync()
	a2.sync()
	before := make(map[string][]proto.Message)
	read := func(l *testLink, q string) []proto.Message {
		info := l.ok(queueInfoReq(q)).GetQueueInfo()
		info.Node, info.Subscribers, info.SubscribersTotal = "", nil, 0
		return []proto.Message{
			info,
			l.ok(historyReq(q, "chat", 0, 0)).GetHistory(),
			l.ok(historyReq(q, "chat", 2, 0)).GetHistory(),
			l.ok(getStateReq(q, "score")).GetState(),
		}
	}
	for _, q := range in {
		before[q] = read(a1, q)
	}

	snaps, err := a.exportBucket(handoffBits, moving)
	if err != nil {
		t.Fatal(err)
	}
	if got := snapshotNames(snaps); !slices.Equal(got, slices.Sorted(slices.Values(in))) {
		t.Fatalf("exported %v, want bucket %d's %v", got, moving, in)
	}
	if got := a.queueNames(); !slices.Equal(got, slices.Sorted(slices.Values(out))) {
		t.Fatalf("after the export node a holds %v, want %v", got, out)
	}
	checkAccounting(t, a, "a after the export")
	checkCount(t, a, "a after the export")

	unbound, err := b.importQueues(overWire(t, snaps))
	if err != nil {
		t.Fatal(err)
	}
	if got := b.queueNames(); !slices.Equal(got, slices.Sorted(slices.Values(in))) {
		t.Fatalf("after the import node b holds %v, want %v", got, in)
	}
	checkAccounting(t, b, "b after the import")
	checkCount(t, b, "b after the import")
	for _, q := range in {
		if want := []Subscriber{{User: "u-p2", Session: "p2", Gateway: "gw-2"}}; !slices.Equal(unbound[q], want) {
			t.Fatalf("unbound subscribers of %s: %v, want %v", q, unbound[q], want)
		}
		after := read(newB1, q)
		for i := range after {
			if !proto.Equal(before[q][i], after[i]) {
				t.Fatalf("%s read %d on a before the hand-off:\n%v\non b after it:\n%v", q, i, before[q][i], after[i])
			}
		}
		info := newB1.ok(queueInfoReq(q)).GetQueueInfo()
		if len(info.GetSubscribers()) != 1 || info.GetSubscribers()[0].GetGateway() != "gw-1" || info.GetSubscribers()[0].GetSession() != "p1" {
			t.Fatalf("subscribers of %s on b: %v", q, info.GetSubscribers())
		}
	}
	if b.lastEpoch < snaps[0].GetEpoch() {
		t.Fatalf("b's last epoch %d is behind an imported %d: a later incarnation could reuse it", b.lastEpoch, snaps[0].GetEpoch())
	}

	// The next publish continues the offsets and reaches gw-1's subscriber
	// through its newest link, not the old one.
	q := in[0]
	head := before[q][0].(*imqpb.QueueInfoResult).GetHead()
	if off := newB1.ok(publishReq(q, "chat")).GetPublished().GetOffset(); off != head+1 {
		t.Fatalf("publish on b after the hand-off got offset %d, want %d", off, head+1)
	}
	var delivered []uint64
	for _, m := range newB1.sync() {
		if d := m.GetDeliver(); d != nil {
			var sm imqpb.ServerMessage
			if err := proto.Unmarshal(d.GetFrame(), &sm); err != nil {
				t.Fatal(err)
			}
			delivered = append(delivered, sm.GetEvent().GetOffset())
		}
	}
	if !slices.Equal(delivered, []uint64{head + 1}) {
		t.Fatalf("gw-1's newest link got events %v, want [%d]", delivered, head+1)
	}
	for _, m := range oldB1.sync() {
		if m.GetDeliver() != nil {
			t.Fatalf("gw-1's old link got %v", m)
		}
	}
	checkAccounting(t, b, "b after a publish")

	// Back again: b exports what it adopted, a imports it.
	snaps, err = b.exportBucket(handoffBits, moving)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.importQueues(overWire(t, snaps)); err != nil {
		t.Fatal(err)
	}
	if len(b.queueNames()) != 0 || len(a.queueNames()) != len(in)+len(out) {
		t.Fatalf("after the way back: a holds %v, b %v", a.queueNames(), b.queueNames())
	}
	checkAccounting(t, a, "a after the way back")
	checkAccounting(t, b, "b after the way back")
	checkCount(t, a, "a after the way back")
	checkCount(t, b, "b after the way back")
}

// TestHandoffImportAllOrNothing: an import that does not fit the node's
// memory budget or its MaxQueues, or that holds a bad snapshot or a name
// twice, installs nothing and charges nothing; one that fits replaces a
// stale copy of a queue, whose subscribers are told it closed.
func TestHandoffImportAllOrNothing(t *testing.T) {
	cfg := DefaultConfig()
	cfg.IdleTTL = time.Hour
	cfg.MaxNodeBytes = 1 << 20
	big := cfg
	big.MaxNodeBytes = 8 << 20
	a, b := startNode(t, big), startNode(t, cfg)
	la, lb := dialLink(t, a.LinkAddr(), "gw-1"), dialLink(t, b.LinkAddr(), "gw-1")

	// Bucket 0 of a one-bucket table: every queue. 24 queues of 60 KiB
	// history are more than b's 1 MiB.
	var names []string
	for i := range 24 {
		q := fmt.Sprintf("/room/%d", i)
		names = append(names, q)
		la.ok(userPublishBytes("alice", q, 60<<10))
	}
	la.ok(joinReq(names[0], "p1", "chat"))
	snaps, err := a.exportBucket(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != len(names) || len(a.queueNames()) != 0 || a.bytesForTest() != 0 {
		t.Fatalf("a exported %d queues, holds %v and %d bytes", len(snaps), a.queueNames(), a.bytesForTest())
	}
	snaps = overWire(t, snaps)

	// A stale copy of the first queue on b, with a subscriber.
	lb.ok(joinReq(names[0], "p9", "chat"))
	lb.ok(publishReq(names[0], "chat"))
	lb.sync()
	held := b.bytesForTest()
	refused := func(what string, snaps []*imqpb.QueueSnapshot, code imqpb.Code) {
		t.Helper()
		_, err := b.importQueues(snaps)
		if imqerr.CodeOf(err) != code {
			t.Fatalf("%s: import error %v, want %v", what, err, code)
		}
		if got := b.queueNames(); !slices.Equal(got, names[:1]) || b.bytesForTest() != held {
			t.Fatalf("%s: b holds %v and %d bytes after a refused import, want %v and %d", what, got, b.bytesForTest(), names[:1], held)
		}
		checkAccounting(t, b, what)
		checkCount(t, b, what)
	}
	refused("over the budget", snaps, imqpb.Code_LIMIT_EXCEEDED)
	bad := proto.Clone(snaps[3]).(*imqpb.QueueSnapshot)
	bad.Epoch = 0
	refused("a bad snapshot", append(slices.Clone(snaps[:2]), bad), imqpb.Code_BAD_REQUEST)
	refused("a name twice", []*imqpb.QueueSnapshot{snaps[1], snaps[2], snaps[1]}, imqpb.Code_BAD_REQUEST)
	b.cfg.MaxQueues = 2
	refused("over MaxQueues", snaps[:2], imqpb.Code_LIMIT_EXCEEDED)
	b.cfg.MaxQueues = cfg.MaxQueues

	// What fits goes in, and replaces the stale copy.
	unbound, err := b.importQueues(snaps[:4])
	if err != nil {
		t.Fatal(err)
	}
	if len(unbound) != 0 {
		t.Fatalf("unbound %v", unbound)
	}
	if got := b.queueNames(); !slices.Equal(got, snapshotNames(snaps[:4])) {
		t.Fatalf("b holds %v", got)
	}
	checkAccounting(t, b, "after the import")
	checkCount(t, b, "after the import")
	if got := closedQueues(t, lb.sync()); !slices.Equal(got, names[:1]) {
		t.Fatalf("queues closed on gw-1's link: %v, want the stale copy %v", got, names[:1])
	}
	info := lb.ok(queueInfoReq(names[0])).GetQueueInfo()
	if info.GetEpoch() != snaps[0].GetEpoch() || info.GetHead() != 1 || len(info.GetSubscribers()) != 1 || info.GetSubscribers()[0].GetSession() != "p1" {
		t.Fatalf("%s on b is not the imported one: %v", names[0], info)
	}
}

// TestExportBucketArgs: a bucket outside the table is an error, not a
// panic.
func TestExportBucketArgs(t *testing.T) {
	s := startNode(t, DefaultConfig())
	for _, c := range [][2]int{{-1, 0}, {64, 0}, {3, 8}, {3, -1}, {0, 1}} {
		if _, err := s.exportBucket(c[0], c[1]); err == nil {
			t.Fatalf("exportBucket(%d, %d) succeeded", c[0], c[1])
		}
	}
}

// TestHandoffImportLinkClosedMeanwhile: a subscriber bound to a link that
// closes before its queue is installed is left out and returned, not
// kept on a link key that nothing will ever clean up.
func TestHandoffImportLinkClosedMeanwhile(t *testing.T) {
	cfg := DefaultConfig()
	cfg.IdleTTL = time.Hour
	a, b := startNode(t, cfg), startNode(t, cfg)
	la := dialLink(t, a.LinkAddr(), "gw-1")
	la.ok(joinReq("/room/1", "p1", "chat"))
	la.ok(publishReq("/room/1", "chat"))
	snaps, err := a.exportBucket(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	lb := dialLink(t, b.LinkAddr(), "gw-1")
	// The handshake ends before the node lists the link.
	testutil.WaitFor(t, waitFor, "b to list gw-1's link", func() bool { return b.linkCount() == 1 })
	im, err := b.prepareImport(overWire(t, snaps))
	if err != nil {
		t.Fatal(err)
	}
	if im.unbound != nil {
		t.Fatalf("unbound before the link closed: %v", im.unbound)
	}
	lb.c.Close()
	testutil.WaitFor(t, waitFor, "b to drop gw-1's link", func() bool { return b.linkCount() == 0 })
	unbound := b.install(im)
	if want := []Subscriber{{User: "u-p1", Session: "p1", Gateway: "gw-1"}}; !slices.Equal(unbound["/room/1"], want) {
		t.Fatalf("unbound %v, want %v", unbound, want)
	}
	sh := b.shardFor("/room/1")
	sh.mu.Lock()
	q := sh.queues["/room/1"]
	subs, gws := q.Subscribers(), q.Gateways()
	sh.mu.Unlock()
	if subs != 0 || len(gws) != 0 {
		t.Fatalf("the installed queue keeps %d subscribers, gateways %v", subs, gws)
	}
	checkAccounting(t, b, "after the install")
	checkCount(t, b, "after the install")
}
