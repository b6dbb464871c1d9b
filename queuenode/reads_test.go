package queuenode

import (
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	imqpb "github.com/imq-dev/imq/proto"
)

// send writes req with a fresh id without waiting for its reply; await
// reads that reply.
func (l *testLink) send(req *imqpb.NodeRequest) uint64 {
	l.t.Helper()
	l.nextID++
	req.Id = l.nextID
	l.write(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: req}})
	return req.Id
}

// await returns the reply to request id, from the frames already read or
// the next ones.
func (l *testLink) await(id uint64) *imqpb.NodeReply {
	l.t.Helper()
	for i, m := range l.seen {
		if r := m.GetReply(); r != nil && r.GetId() == id {
			l.seen = slices.Delete(l.seen, i, i+1)
			return r
		}
	}
	for {
		m := l.read()
		if r := m.GetReply(); r != nil && r.GetId() == id {
			return r
		}
		l.seen = append(l.seen, m)
	}
}

// delivered decodes the events and state changes among frames, in order.
func delivered(t *testing.T, frames []*imqpb.LinkDown) []*imqpb.ServerMessage {
	t.Helper()
	var out []*imqpb.ServerMessage
	for _, f := range frames {
		if d := f.GetDeliver(); d != nil {
			var m imqpb.ServerMessage
			if err := proto.Unmarshal(d.GetFrame(), &m); err != nil {
				t.Fatal(err)
			}
			out = append(out, &m)
		}
	}
	return out
}

func backendPublish(queue, mount, payload string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: mount, Payload: []byte(payload),
	}}}
}

func backendSetState(queue, mount, key, value string, del bool) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_SetState{SetState: &imqpb.SetState{
		Queue: queue, Mount: mount, Key: key, Value: []byte(value), Delete: del,
	}}}
}

func getStateReq(queue, mount string, keys ...string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_GetState{GetState: &imqpb.GetState{Queue: queue, Mount: mount, Keys: keys}}}
}

func historyReq(queue, mount string, since uint64, limit uint32) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_History{History: &imqpb.History{
		Queue: queue, Mount: mount, SinceOffset: since, Limit: limit,
	}}}
}

func queueInfoReq(queue string) *imqpb.NodeRequest {
	return &imqpb.NodeRequest{Backend: true, Op: &imqpb.NodeRequest_QueueInfo{QueueInfo: &imqpb.QueueInfo{Queue: queue}}}
}

func TestReadsNeverCreate(t *testing.T) {
	s := startNode(t, DefaultConfig())
	l := dialLink(t, s.LinkAddr(), "gw-1")
	for _, req := range []*imqpb.NodeRequest{getStateReq("/x", "score"), historyReq("/x", "chat", 0, 0), queueInfoReq("/x")} {
		r := l.do(req)
		if r.GetCode() != imqpb.Code_NOT_FOUND || r.GetMessage() != "queue /x does not exist on this node" {
			t.Fatalf("%v on a missing queue: %v %q, want NOT_FOUND", req.GetOp(), r.GetCode(), r.GetMessage())
		}
	}
	if r := l.do(queueInfoReq("bad")); r.GetCode() != imqpb.Code_INVALID_QUEUE_NAME {
		t.Fatalf("queue info of a bad name: %v", r.GetCode())
	}
	l.ok(backendPublish("/x", "chat", `1`))
	l.ok(backendSetState("/x", "score", "k", `1`, false))
	for _, c := range []struct {
		req  *imqpb.NodeRequest
		want imqpb.Code
	}{
		{getStateReq("/x", "nothing"), imqpb.Code_NOT_FOUND},
		{historyReq("/x", "nothing", 0, 0), imqpb.Code_NOT_FOUND},
		{getStateReq("/x", "chat"), imqpb.Code_WRONG_MOUNT_TYPE},
		{historyReq("/x", "score", 0, 0), imqpb.Code_WRONG_MOUNT_TYPE},
	} {
		if r := l.do(c.req); r.GetCode() != c.want {
			t.Fatalf("%v: %v %q, want %v", c.req.GetOp(), r.GetCode(), r.GetMessage(), c.want)
		}
	}
	if got := s.queueCount.Load(); got != 1 {
		t.Fatalf("%d queues, want 1: reads created some", got)
	}
	info := l.ok(queueInfoReq("/x")).GetQueueInfo()
	if len(info.GetMounts()) != 2 {
		t.Fatalf("reads created mounts: %v", info.GetMounts())
	}
}

func TestBackendWritesAndReads(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NodeID = "node-7"
	s := startNode(t, cfg)
	l := dialLink(t, s.LinkAddr(), "gw-1")
	before := time.Now()

	if r := l.ok(backendPublish("/room/1", "chat", `{"n":1}`)); !r.GetCreated() || r.GetPublished().GetOffset() != 1 {
		t.Fatalf("first publish: %v, want created at offset 1", r)
	}
	if r := l.ok(backendPublish("/room/1", "chat", `{"n":2}`)); r.GetCreated() {
		t.Fatalf("second publish: %v, want not created", r)
	}
	if r := l.ok(backendSetState("/room/2", "score", "alice", `10`, false)); !r.GetCreated() || r.GetStateSet().GetVersion() != 1 {
		t.Fatalf("set state on a new queue: %v, want created, version 1", r)
	}
	l.ok(backendSetState("/room/1", "score", "alice", `10`, false))
	l.ok(backendSetState("/room/1", "score", "bob", `"b"`, false))
	if r := l.ok(backendSetState("/room/1", "score", "bob", ``, true)); r.GetCreated() || r.GetStateSet().GetVersion() != 5 {
		t.Fatalf("delete: %v, want version 5, not created", r)
	}
	if r := l.do(backendSetState("/room/3", "score", "bob", ``, true)); r.GetCode() != imqpb.Code_NOT_FOUND {
		t.Fatalf("delete on a missing queue: %v, want NOT_FOUND (nothing created)", r)
	}

	// A client joins; the backend's events reach it with sender "".
	joined := l.ok(joinReq("/room/1", "s1", "chat")).GetJoined()
	l.ok(backendPublish("/room/1", "chat", `{"n":3}`))
	l.ok(backendSetState("/room/1", "chat2", "k", `1`, false)) // a mount s1 did not join
	msgs := delivered(t, l.sync())
	if len(msgs) != 1 || msgs[0].GetEvent().GetSender() != "" || string(msgs[0].GetEvent().GetPayload()) != `{"n":3}` {
		t.Fatalf("subscriber got %v, want one event from sender \"\"", msgs)
	}

	snap := l.ok(getStateReq("/room/1", "score")).GetState()
	if snap.GetEpoch() != joined.GetEpoch() || snap.GetHead() != 7 || len(snap.GetEntries()) != 1 ||
		snap.GetEntries()[0].GetKey() != "alice" || string(snap.GetEntries()[0].GetValue()) != "10" {
		t.Fatalf("get_state: %v", snap)
	}
	page := l.ok(historyReq("/room/1", "chat", 1, 0)).GetHistory()
	if got := offsetsOf(page.GetEvents()); !slices.Equal(got, []uint64{2, 6}) || page.GetMissed() || page.GetMore() || page.GetHead() != 7 {
		t.Fatalf("history: %v %v", got, page)
	}
	if page := l.ok(historyReq("/room/1", "chat", 0, 1)).GetHistory(); len(page.GetEvents()) != 1 || !page.GetMore() {
		t.Fatalf("history limit 1: %v", page)
	}

	l2 := dialLink(t, s.LinkAddr(), "gw-2")
	l2.ok(&imqpb.NodeRequest{User: "bob", Session: "s2", Op: &imqpb.NodeRequest_Join{Join: &imqpb.Join{
		Queue: "/room/1", Mounts: []*imqpb.MountSpec{stateSpec("score"), msgSpec("chat")},
	}}})
	info := l.ok(queueInfoReq("/room/1")).GetQueueInfo()
	want := &imqpb.QueueInfoResult{
		Queue: "/room/1", Epoch: joined.GetEpoch(), Head: 7, Node: "node-7", CreatedMs: info.GetCreatedMs(),
		Mounts: []*imqpb.MountInfo{
			{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Retained: 3, OldestOffset: 1},
			{Name: "chat2", Kind: imqpb.MountKind_STATE, Keys: 1, Bytes: 2},
			{Name: "score", Kind: imqpb.MountKind_STATE, Keys: 1, Bytes: uint64(len("alice10"))},
		},
		Subscribers: []*imqpb.SubscriberInfo{
			{User: "u-s1", Session: "s1", Gateway: "gw-1", Mounts: []string{"chat"}},
			{User: "bob", Session: "s2", Gateway: "gw-2", Mounts: []string{"score", "chat"}},
		},
		SubscribersTotal: 2,
	}
	if !proto.Equal(info, want) {
		t.Fatalf("queue info:\n%v\nwant\n%v", info, want)
	}
	if c := time.UnixMilli(info.GetCreatedMs()); c.Before(before.Add(-time.Second)) || c.After(time.Now()) {
		t.Fatalf("created_ms %v, want about %v", c, before)
	}
}

func TestClientRequestsNameTheirUser(t *testing.T) {
	s := startNode(t, DefaultConfig())
	l := dialLink(t, s.LinkAddr(), "gw-1")
	noUser := publishReq("/room/1", "chat")
	noUser.User = ""
	noSession := joinReq("/room/1", "", "chat")
	backendJoin := joinReq("/room/1", "s1", "chat")
	backendJoin.Backend = true
	for _, req := range []*imqpb.NodeRequest{noUser, noSession, backendJoin} {
		if r := l.do(req); r.GetCode() != imqpb.Code_BAD_REQUEST {
			t.Fatalf("%v: %v %q, want BAD_REQUEST", req, r.GetCode(), r.GetMessage())
		}
	}
	if s.queueCount.Load() != 0 {
		t.Fatal("a refused request created a queue")
	}
}

func TestReadsCheckOwnership(t *testing.T) {
	s := startClusterNode(t, "a")
	l := dialLink(t, s.LinkAddr(), "gw-1")
	if r := l.do(queueInfoReq("/room/1")); r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 0 {
		t.Fatalf("read before any table: %v v%d, want MOVED v0", r.GetCode(), r.GetTableVersion())
	}
	_, v2, _ := twoNodeTables(t)
	s.setTable(v2)
	theirs := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "b" })[0]
	mine := queuesWhere(t, 1, func(q string) bool { return owner(v2, q) == "a" })[0]
	for _, req := range []*imqpb.NodeRequest{getStateReq(theirs, "score"), historyReq(theirs, "chat", 0, 0), queueInfoReq(theirs)} {
		if r := l.do(req); r.GetCode() != imqpb.Code_MOVED || r.GetTableVersion() != 2 {
			t.Fatalf("%v on another node's queue: %v v%d, want MOVED v2", req.GetOp(), r.GetCode(), r.GetTableVersion())
		}
	}
	if r := l.do(queueInfoReq(mine)); r.GetCode() != imqpb.Code_NOT_FOUND {
		t.Fatalf("read of a missing queue it owns: %v, want NOT_FOUND", r.GetCode())
	}
}

func TestBackendDeleteOfMissingQueueCreatesNothing(t *testing.T) {
	s := startNode(t, DefaultConfig())
	l := dialLink(t, s.LinkAddr(), "gw-1")
	if r := l.do(backendSetState("/room/none", "scores", "k", "", true)); r.GetCode() != imqpb.Code_NOT_FOUND {
		t.Fatalf("got %v %q, want NOT_FOUND", r.GetCode(), r.GetMessage())
	}
	if n := s.queueCount.Load(); n != 0 {
		t.Fatalf("%d queues after deleting from a missing one", n)
	}
}
