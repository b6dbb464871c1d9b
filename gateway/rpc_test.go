package gateway_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
	imqpb "github.com/imq-dev/imq/proto"
)

// The admin RPC end to end: a real gateway and queue node (launch.StartDev,
// standalone), called over HTTP as a PHP backend would.

const (
	testAPIKey = "rpc-test-key-0123456789"
	// roomKey may publish and read state, on /room/ queues only.
	roomKey = "rpc-room-key-0123456789"
)

func testAPIKeys(t testing.TB) []gateway.APIKey {
	t.Helper()
	keys, err := gateway.ParseAPIKeys(testAPIKey + "\n" + roomKey + " methods=publish,get_state,batch prefixes=/room/")
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// startRPC starts a node and a gateway with the test API keys; mod may
// change the whole configuration first.
func startRPC(t testing.TB, mod func(*launch.DevConfig)) *launch.Dev {
	t.Helper()
	keys := testAPIKeys(t)
	return launchtest.StartDev(t, func(c *launch.DevConfig) {
		c.Gateway.JWTSecret = testSecret
		c.Gateway.APIKeys = keys
		c.QueueNode.NodeID = "rpc-node"
		if mod != nil {
			mod(c)
		}
	})
}

// rpcAnswer is one HTTP answer of the RPC.
type rpcAnswer struct {
	status int
	header http.Header
	body   []byte
}

// errCode returns the error code of an error answer ("" if it has none).
func (a rpcAnswer) errCode() string {
	var e struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	json.Unmarshal(a.body, &e)
	return e.Error.Code
}

func (a rpcAnswer) String() string { return fmt.Sprintf("%d %s", a.status, bytes.TrimSpace(a.body)) }

// rpcDo sends one HTTP request to the gateway's RPC.
func rpcDo(t testing.TB, addr, httpMethod, method, key, body string, header http.Header) rpcAnswer {
	t.Helper()
	req, err := http.NewRequest(httpMethod, "http://"+addr+gateway.RPCPath+method, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s %s: Content-Type %q", httpMethod, method, ct)
	}
	return rpcAnswer{status: resp.StatusCode, header: resp.Header, body: b}
}

// rpc calls method with the full-access key.
func rpc(t testing.TB, d *launch.Dev, method, body string) rpcAnswer {
	t.Helper()
	return rpcDo(t, d.Gateway.Addr(), http.MethodPost, method, testAPIKey, body, nil)
}

// rpcOK calls method and decodes its 200 result into v.
func rpcOK(t testing.TB, d *launch.Dev, method, body string, v any) {
	t.Helper()
	a := rpc(t, d, method, body)
	if a.status != http.StatusOK {
		t.Fatalf("%s %s: %s", method, body, a)
	}
	reflect.ValueOf(v).Elem().SetZero() // nothing left from an earlier decode
	dec := json.NewDecoder(bytes.NewReader(a.body))
	dec.DisallowUnknownFields() // the result has exactly the documented fields
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: decode %s: %v", method, a.body, err)
	}
}

// rpcFail calls method and checks it fails with status and code, with a
// message, and says whether it may be retried as the code says.
func rpcFail(t testing.TB, d *launch.Dev, method, body string, status int, code string) rpcAnswer {
	t.Helper()
	a := rpc(t, d, method, body)
	expectRPCError(t, a, status, code)
	return a
}

func expectRPCError(t testing.TB, a rpcAnswer, status int, code string) {
	t.Helper()
	var e struct {
		Error *struct {
			Code      string `json:"code"`
			Message   string `json:"message"`
			Retryable *bool  `json:"retryable"`
		} `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(a.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil || e.Error == nil {
		t.Fatalf("not an error answer: %s (%v)", a, err)
	}
	if a.status != status || e.Error.Code != code || e.Error.Message == "" || e.Error.Retryable == nil {
		t.Fatalf("got %s, want %d %s with a message and retryable", a, status, code)
	}
	retryable := code == "UNAVAILABLE" || code == "TIMEOUT" || code == "LIMIT_EXCEEDED"
	if *e.Error.Retryable != retryable {
		t.Fatalf("%s: retryable %v", a, *e.Error.Retryable)
	}
}

// Results, as the contract describes them (rpcOK rejects any other field).
type (
	publishRes struct {
		Offset  uint64 `json:"offset"`
		Created bool   `json:"created"`
	}
	setStateRes struct {
		Version uint64 `json:"version"`
		Created bool   `json:"created"`
	}
	deleteStateRes struct {
		Version uint64 `json:"version"`
	}
	stateVal struct {
		Value       json.RawMessage `json:"value"`
		ValueBase64 *string         `json:"value_base64"`
		Version     uint64          `json:"version"`
	}
	getStateRes struct {
		Epoch uint64              `json:"epoch"`
		Head  uint64              `json:"head"`
		State map[string]stateVal `json:"state"`
	}
	historyEv struct {
		Offset     uint64          `json:"offset"`
		Sender     *string         `json:"sender"`
		TimeMs     int64           `json:"time_ms"`
		Data       json.RawMessage `json:"data"`
		DataBase64 *string         `json:"data_base64"`
	}
	historyRes struct {
		Epoch  uint64      `json:"epoch"`
		Head   uint64      `json:"head"`
		Events []historyEv `json:"events"`
		Missed bool        `json:"missed"`
		More   bool        `json:"more"`
	}
	mountRes struct {
		Name         string `json:"name"`
		Kind         string `json:"kind"`
		Retained     uint32 `json:"retained"`
		OldestOffset uint64 `json:"oldest_offset"`
		Keys         uint32 `json:"keys"`
		Bytes        uint64 `json:"bytes"`
	}
	subscriberRes struct {
		User    string   `json:"user"`
		Session string   `json:"session"`
		Gateway string   `json:"gateway"`
		Mounts  []string `json:"mounts"`
	}
	queueInfoRes struct {
		Queue            string          `json:"queue"`
		Epoch            uint64          `json:"epoch"`
		Head             uint64          `json:"head"`
		Node             string          `json:"node"`
		CreatedMs        int64           `json:"created_ms"`
		Mounts           []mountRes      `json:"mounts"`
		Subscribers      []subscriberRes `json:"subscribers"`
		SubscribersTotal int             `json:"subscribers_total"`
	}
	kickRes struct {
		Sessions int      `json:"sessions"`
		Gateways int      `json:"gateways"`
		Failed   []string `json:"failed"`
	}
	errorRes struct {
		Code      string `json:"code"`
		Message   string `json:"message"`
		Retryable bool   `json:"retryable"`
	}
	broadcastRes struct {
		Results []struct {
			Queue   string    `json:"queue"`
			Offset  *uint64   `json:"offset"`
			Created *bool     `json:"created"`
			Error   *errorRes `json:"error"`
		} `json:"results"`
	}
	batchRes struct {
		Results []struct {
			Result json.RawMessage `json:"result"`
			Error  *errorRes       `json:"error"`
		} `json:"results"`
	}
)

// connected sends connect (dev mode: no token) and returns the session.
func (c *rawClient) connected() string {
	c.t.Helper()
	r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{}}})
	expectCode(c.t, r, imqpb.Code_OK)
	return r.GetConnected().GetSession()
}

// event reads until the next event.
func (c *rawClient) event() *imqpb.Event {
	c.t.Helper()
	for {
		if ev := c.next().GetEvent(); ev != nil {
			return ev
		}
	}
}

// stateChange reads until the next state change.
func (c *rawClient) stateChange() *imqpb.StateChange {
	c.t.Helper()
	for {
		if st := c.next().GetState(); st != nil {
			return st
		}
	}
}

func scoresMount() *imqpb.MountSpec {
	return &imqpb.MountSpec{Name: "scores", Kind: imqpb.MountKind_STATE}
}

func TestRPCPublish(t *testing.T) {
	d := startRPC(t, nil)
	for _, js := range []bool{false, true} {
		t.Run(map[bool]string{false: "binary", true: "json"}[js], func(t *testing.T) {
			queue := fmt.Sprintf("/room/rpc-pub-%v", js)
			c := mustDial(t, d, "alice", js)
			expectCode(t, c.join(queue, chat()), imqpb.Code_OK)

			var r publishRes
			rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data": {"text": "hi <b>&</b>", "n": [1, 2]}}`, &r)
			if r.Created {
				t.Fatal("created a queue that a client had joined")
			}
			ev := c.event()
			if ev.GetSender() != "" || ev.GetOffset() != r.Offset || ev.GetMount() != "chat" ||
				string(ev.GetPayload()) != `{"text":"hi <b>&</b>","n":[1,2]}` {
				t.Fatalf("event %v, want offset %d from the backend (sender \"\") with the compact JSON", ev, r.Offset)
			}
			rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data_base64":"AAEC/w=="}`, &r)
			if ev := c.event(); !bytes.Equal(ev.GetPayload(), []byte{0, 1, 2, 255}) || ev.GetSender() != "" || ev.GetOffset() != r.Offset {
				t.Fatalf("event %v", ev)
			}
			rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data":"just a string"}`, &r)
			if ev := c.event(); string(ev.GetPayload()) != `"just a string"` {
				t.Fatalf("event %v", ev)
			}
		})
	}
	t.Run("created", func(t *testing.T) {
		var r publishRes
		rpcOK(t, d, "publish", `{"queue":"/room/rpc-fresh","mount":"chat","data":1}`, &r)
		if !r.Created || r.Offset != 1 {
			t.Fatalf("first publish to a new queue: %+v, want offset 1, created", r)
		}
		rpcOK(t, d, "publish", `{"queue":"/room/rpc-fresh","mount":"chat","data":2}`, &r)
		if r.Created || r.Offset != 2 {
			t.Fatalf("second publish: %+v, want offset 2, not created", r)
		}
	})
}

func TestRPCState(t *testing.T) {
	d := startRPC(t, nil)
	const queue = "/room/rpc-state"
	c := mustDial(t, d, "alice", false)
	j := c.join(queue, scoresMount())
	expectCode(t, j, imqpb.Code_OK)
	epoch := j.GetJoined().GetEpoch()

	var set setStateRes
	rpcOK(t, d, "set_state", `{"queue":"`+queue+`","mount":"scores","key":"alice","value":{"points": 42}}`, &set)
	if set.Created || set.Version == 0 {
		t.Fatalf("set_state: %+v", set)
	}
	if st := c.stateChange(); st.GetKey() != "alice" || st.GetSender() != "" || string(st.GetValue()) != `{"points":42}` || st.GetVersion() != set.Version {
		t.Fatalf("state change %v, want alice at version %d from the backend", st, set.Version)
	}
	var blob setStateRes
	rpcOK(t, d, "set_state", `{"queue":"`+queue+`","mount":"scores","key":"blob","value_base64":"AAE="}`, &blob)
	if blob.Version <= set.Version {
		t.Fatalf("versions %d then %d", set.Version, blob.Version)
	}
	if st := c.stateChange(); st.GetKey() != "blob" || !bytes.Equal(st.GetValue(), []byte{0, 1}) {
		t.Fatalf("state change %v", st)
	}

	var got getStateRes
	rpcOK(t, d, "get_state", `{"queue":"`+queue+`","mount":"scores"}`, &got)
	if got.Epoch != epoch || got.Head != blob.Version || len(got.State) != 2 {
		t.Fatalf("get_state: %+v, want epoch %d head %d and 2 keys", got, epoch, blob.Version)
	}
	if a := got.State["alice"]; string(a.Value) != `{"points":42}` || a.ValueBase64 != nil || a.Version != set.Version {
		t.Fatalf("alice: value %s base64 %v version %d", a.Value, a.ValueBase64, a.Version)
	}
	if b := got.State["blob"]; b.Value != nil || b.ValueBase64 == nil || *b.ValueBase64 != "AAE=" || b.Version != blob.Version {
		t.Fatalf("blob: %+v", b)
	}
	rpcOK(t, d, "get_state", `{"queue":"`+queue+`","mount":"scores","keys":["alice","nobody"]}`, &got)
	if len(got.State) != 1 || got.State["alice"].Version != set.Version {
		t.Fatalf("get_state of alice and nobody: %+v", got)
	}

	var del deleteStateRes
	rpcOK(t, d, "delete_state", `{"queue":"`+queue+`","mount":"scores","key":"alice"}`, &del)
	if del.Version <= blob.Version {
		t.Fatalf("delete_state version %d", del.Version)
	}
	if st := c.stateChange(); st.GetKey() != "alice" || !st.GetDeleted() || st.GetSender() != "" {
		t.Fatalf("state change %v, want alice deleted", st)
	}
	rpcOK(t, d, "get_state", `{"queue":"`+queue+`","mount":"scores"}`, &got)
	if _, ok := got.State["alice"]; ok || len(got.State) != 1 || got.Head != del.Version {
		t.Fatalf("after delete: %+v", got)
	}

	rpcOK(t, d, "set_state", `{"queue":"/room/rpc-state-fresh","mount":"scores","key":"k","value":null}`, &set)
	if !set.Created {
		t.Fatal("set_state on a new queue: not created")
	}
	rpcOK(t, d, "get_state", `{"queue":"/room/rpc-state-fresh","mount":"scores"}`, &got)
	if v := got.State["k"]; string(v.Value) != "null" {
		t.Fatalf("a null value: %+v", v)
	}
	// A state mount is not a message mount.
	rpcFail(t, d, "publish", `{"queue":"`+queue+`","mount":"scores","data":1}`, http.StatusConflict, "WRONG_MOUNT_TYPE")
}

func TestRPCHistory(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) {
		c.QueueNode.Limits.HistoryLen = 5
	})
	const queue = "/room/rpc-history"
	c := mustDial(t, d, "alice", false)
	expectCode(t, c.join(queue, chat()), imqpb.Code_OK)
	expectCode(t, c.publish(queue, "chat", []byte(`"from alice"`)), imqpb.Code_OK)
	for i, data := range []string{`"data":{"i":1}`, `"data_base64":"/w=="`, `"data":[3]`} {
		var r publishRes
		rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat",`+data+`}`, &r)
		if r.Offset != uint64(i+2) {
			t.Fatalf("offset %d", r.Offset)
		}
	}
	var h historyRes
	rpcOK(t, d, "history", `{"queue":"`+queue+`","mount":"chat"}`, &h)
	if h.Head != 4 || h.Epoch == 0 || len(h.Events) != 4 || h.Missed || h.More {
		t.Fatalf("history: %+v", h)
	}
	if e := h.Events[0]; e.Offset != 1 || e.Sender == nil || *e.Sender != "alice" || string(e.Data) != `"from alice"` || e.TimeMs < time.Now().Add(-time.Minute).UnixMilli() {
		t.Fatalf("first event %+v", e)
	}
	if e := h.Events[1]; *e.Sender != "" || string(e.Data) != `{"i":1}` || e.DataBase64 != nil {
		t.Fatalf("second event %+v", e)
	}
	if e := h.Events[2]; e.Data != nil || e.DataBase64 == nil || *e.DataBase64 != "/w==" {
		t.Fatalf("third event %+v", e)
	}
	rpcOK(t, d, "history", `{"queue":"`+queue+`","mount":"chat","since_offset":1,"limit":2}`, &h)
	if len(h.Events) != 2 || h.Events[0].Offset != 2 || h.Events[1].Offset != 3 || !h.More || h.Missed {
		t.Fatalf("page after 1: %+v", h)
	}
	// Evict: the history keeps 5 events.
	for range 4 {
		rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data":0}`, new(publishRes))
	}
	rpcOK(t, d, "history", `{"queue":"`+queue+`","mount":"chat","since_offset":1}`, &h)
	if !h.Missed || len(h.Events) != 5 || h.Events[0].Offset != 4 || h.Head != 8 {
		t.Fatalf("after eviction: %+v", h)
	}
	rpcFail(t, d, "history", `{"queue":"`+queue+`","mount":"chat","limit":0}`, http.StatusBadRequest, "BAD_REQUEST")
	rpcFail(t, d, "history", `{"queue":"`+queue+`","mount":"chat","limit":1001}`, http.StatusBadRequest, "BAD_REQUEST")
	rpcFail(t, d, "history", `{"queue":"`+queue+`","mount":"chat","since_offset":-1}`, http.StatusBadRequest, "BAD_REQUEST")
}

func TestRPCQueueInfo(t *testing.T) {
	d := startRPC(t, nil)
	const queue = "/room/rpc-info"
	before := time.Now().UnixMilli()
	c := mustDial(t, d, "alice", false)
	session := c.connected()
	j := c.join(queue, chat(), scoresMount())
	expectCode(t, j, imqpb.Code_OK)
	rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data":1}`, new(publishRes))
	rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data":2}`, new(publishRes))
	rpcOK(t, d, "set_state", `{"queue":"`+queue+`","mount":"scores","key":"alice","value":10}`, new(setStateRes))

	var qi queueInfoRes
	rpcOK(t, d, "queue_info", `{"queue":"`+queue+`"}`, &qi)
	if qi.Queue != queue || qi.Epoch != j.GetJoined().GetEpoch() || qi.Head != 3 || qi.Node != "rpc-node" ||
		qi.CreatedMs < before || qi.CreatedMs > time.Now().UnixMilli() {
		t.Fatalf("queue_info: %+v", qi)
	}
	wantMounts := []mountRes{
		{Name: "chat", Kind: "MESSAGE", Retained: 2, OldestOffset: 1},
		{Name: "scores", Kind: "STATE", Keys: 1, Bytes: uint64(len("alice") + len("10"))},
	}
	if !slices.Equal(qi.Mounts, wantMounts) {
		t.Fatalf("mounts %+v, want %+v", qi.Mounts, wantMounts)
	}
	if len(qi.Subscribers) != 1 || qi.SubscribersTotal != 1 {
		t.Fatalf("subscribers %+v of %d", qi.Subscribers, qi.SubscribersTotal)
	}
	s := qi.Subscribers[0]
	if s.User != "alice" || s.Session != session || s.Gateway != d.Gateway.ID() || !slices.Equal(s.Mounts, []string{"chat", "scores"}) {
		t.Fatalf("subscriber %+v, want alice, session %s, gateway %s, chat and scores", s, session, d.Gateway.ID())
	}
}

// TestRPCNotFound: the reads never create anything.
func TestRPCNotFound(t *testing.T) {
	d := startRPC(t, nil)
	for range 2 {
		rpcFail(t, d, "get_state", `{"queue":"/room/none","mount":"scores"}`, http.StatusNotFound, "NOT_FOUND")
		rpcFail(t, d, "history", `{"queue":"/room/none","mount":"chat"}`, http.StatusNotFound, "NOT_FOUND")
		rpcFail(t, d, "queue_info", `{"queue":"/room/none"}`, http.StatusNotFound, "NOT_FOUND")
	}
	rpcOK(t, d, "publish", `{"queue":"/room/some","mount":"chat","data":1}`, new(publishRes))
	rpcFail(t, d, "get_state", `{"queue":"/room/some","mount":"scores"}`, http.StatusNotFound, "NOT_FOUND")
	rpcFail(t, d, "history", `{"queue":"/room/some","mount":"other"}`, http.StatusNotFound, "NOT_FOUND")
	var qi queueInfoRes
	rpcOK(t, d, "queue_info", `{"queue":"/room/some"}`, &qi)
	if len(qi.Mounts) != 1 || qi.Mounts[0].Name != "chat" {
		t.Fatalf("reads created mounts: %+v", qi.Mounts)
	}
	if qi.Subscribers == nil {
		t.Fatal("subscribers is null, want []")
	}
}

func TestRPCKick(t *testing.T) {
	d := startRPC(t, nil)
	bob1 := mustDial(t, d, "bob", false)
	bob2 := mustDial(t, d, "bob", true)
	carol := mustDial(t, d, "carol", false)
	expectCode(t, bob1.join("/room/kick", chat()), imqpb.Code_OK)
	expectCode(t, carol.join("/room/kick", chat()), imqpb.Code_OK)

	var r kickRes
	rpcOK(t, d, "kick", `{"user":"bob","reason":"Banned for cheating"}`, &r)
	if r.Sessions != 2 || r.Gateways != 1 || r.Failed == nil || len(r.Failed) != 0 {
		t.Fatalf("kick: %+v, want 2 sessions on 1 gateway, failed []", r)
	}
	for _, c := range []*rawClient{bob1, bob2} {
		g := c.expectGoodbye(imqpb.Reason_REASON_KICKED)
		if g.GetReconnect() || g.GetMessage() != "Banned for cheating" {
			t.Fatalf("goodbye %v", g)
		}
	}
	carol.quiet()
	rpcOK(t, d, "kick", `{"user":"bob"}`, &r)
	if r.Sessions != 0 {
		t.Fatalf("second kick closed %d sessions", r.Sessions)
	}
	// The node forgot bob's subscription.
	testutil.WaitFor(t, 5*time.Second, "the node to forget bob's subscription", func() bool {
		var qi queueInfoRes
		rpcOK(t, d, "queue_info", `{"queue":"/room/kick"}`, &qi)
		return len(qi.Subscribers) == 1 && qi.Subscribers[0].User == "carol"
	})

	// A long reason reaches the client whole (the close frame carries less).
	long := strings.Repeat("é", 300)
	dave := mustDial(t, d, "dave", false)
	dave.connected()
	rpcOK(t, d, "kick", `{"user":"dave","reason":"`+long+`"}`, &r)
	if g := dave.expectGoodbye(imqpb.Reason_REASON_KICKED); g.GetMessage() != long || r.Sessions != 1 {
		t.Fatalf("goodbye %q, %d sessions", g.GetMessage(), r.Sessions)
	}
	rpcFail(t, d, "kick", `{"user":"a/b"}`, http.StatusBadRequest, "BAD_REQUEST")
	rpcFail(t, d, "kick", `{"user":"bob","reason":"`+strings.Repeat("x", 1025)+`"}`, http.StatusBadRequest, "BAD_REQUEST")
}

func TestRPCBroadcast(t *testing.T) {
	d := startRPC(t, nil)
	c := mustDial(t, d, "alice", false)
	expectCode(t, c.join("/room/bc-2", chat()), imqpb.Code_OK)
	rpcOK(t, d, "set_state", `{"queue":"/room/bc-3","mount":"chat","key":"k","value":1}`, new(setStateRes)) // chat is a state mount there

	var r broadcastRes
	rpcOK(t, d, "broadcast", `{"queues":["/room/bc-1","/room/bc-2","/room/bc-3"],"mount":"chat","data":{"notice":"maintenance"}}`, &r)
	if len(r.Results) != 3 {
		t.Fatalf("results %+v", r.Results)
	}
	for i, q := range []string{"/room/bc-1", "/room/bc-2", "/room/bc-3"} {
		res := r.Results[i]
		if res.Queue != q {
			t.Fatalf("result %d is for %s, want %s", i, res.Queue, q)
		}
		if i < 2 && (res.Error != nil || res.Offset == nil || res.Created == nil || *res.Created != (i == 0)) {
			t.Fatalf("%s: %+v", q, res)
		}
		if i == 2 && (res.Error == nil || res.Error.Code != "WRONG_MOUNT_TYPE" || res.Offset != nil || res.Created != nil) {
			t.Fatalf("%s: %+v, want WRONG_MOUNT_TYPE", q, res)
		}
	}
	if ev := c.event(); string(ev.GetPayload()) != `{"notice":"maintenance"}` || ev.GetSender() != "" || ev.GetOffset() != *r.Results[1].Offset {
		t.Fatalf("event %v", ev)
	}

	// Many queues, concurrently, results in order.
	var queues []string
	for i := range 300 {
		queues = append(queues, fmt.Sprintf("/room/many-%d", i))
	}
	qs, _ := json.Marshal(queues)
	rpcOK(t, d, "broadcast", `{"queues":`+string(qs)+`,"mount":"chat","data_base64":"AA=="}`, &r)
	for i, res := range r.Results {
		if res.Queue != queues[i] || res.Error != nil || *res.Offset != 1 || !*res.Created {
			t.Fatalf("result %d: %+v", i, res)
		}
	}
	// Bad input anywhere refuses the whole broadcast.
	rpcFail(t, d, "broadcast", `{"queues":["/room/bc-4","room-bad"],"mount":"chat","data":1}`, http.StatusBadRequest, "INVALID_QUEUE_NAME")
	rpcFail(t, d, "broadcast", `{"queues":["/room/bc-4","/room/bc-4"],"mount":"chat","data":1}`, http.StatusBadRequest, "BAD_REQUEST")
	rpcFail(t, d, "broadcast", `{"queues":[],"mount":"chat","data":1}`, http.StatusBadRequest, "BAD_REQUEST")
	qs, _ = json.Marshal(append(queues, queues...)[:1001])
	rpcFail(t, d, "broadcast", `{"queues":`+string(qs)+`,"mount":"chat","data":1}`, http.StatusBadRequest, "BAD_REQUEST")
	rpcFail(t, d, "queue_info", `{"queue":"/room/bc-4"}`, http.StatusNotFound, "NOT_FOUND")
}

func TestRPCBatch(t *testing.T) {
	d := startRPC(t, nil)
	var r batchRes
	rpcOK(t, d, "batch", `{"calls":[
		{"method":"set_state","params":{"queue":"/room/batch","mount":"scores","key":"a","value":1}},
		{"method":"get_state","params":{"queue":"/room/batch","mount":"scores"}},
		{"method":"nope","params":{}},
		{"method":"publish","params":{"queue":"/room/batch","mount":"scores","data":1}},
		{"method":"publish","params":{"queue":"/room/batch","mount":"chat","data":1,"extra":2}},
		{"method":"delete_state","params":{"queue":"/room/batch","mount":"scores","key":"a"}},
		{"method":"get_state","params":{"queue":"/room/batch","mount":"scores"}}
	]}`, &r)
	if len(r.Results) != 7 {
		t.Fatalf("results %+v", r.Results)
	}
	for i, want := range []string{"", "", "UNKNOWN_MESSAGE", "WRONG_MOUNT_TYPE", "BAD_REQUEST", "", ""} {
		res := r.Results[i]
		switch {
		case want == "" && (res.Error != nil || res.Result == nil):
			t.Fatalf("call %d: %+v", i, res)
		case want != "" && (res.Error == nil || res.Error.Code != want || res.Result != nil):
			t.Fatalf("call %d: error %+v result %s, want %s", i, res.Error, res.Result, want)
		}
	}
	var st getStateRes
	if err := json.Unmarshal(r.Results[1].Result, &st); err != nil || string(st.State["a"].Value) != "1" {
		t.Fatalf("get_state in batch saw %s", r.Results[1].Result)
	}
	var after getStateRes
	if err := json.Unmarshal(r.Results[6].Result, &after); err != nil || len(after.State) != 0 {
		t.Fatalf("get_state after delete_state in batch saw %s", r.Results[6].Result)
	}

	// A malformed batch runs nothing.
	for _, body := range []string{
		`{"calls":[]}`,
		`{"calls":[{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},{"method":"batch","params":{"calls":[]}}]}`,
		`{"calls":[{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},{"method":"publish"}]}`,
		`{"calls":[{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},{"params":{}}]}`,
		`{"calls":[{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},{"method":"publish","params":{},"x":1}]}`,
		`{"calls":[{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},7]}`,
		`{"calls":[` + strings.TrimSuffix(strings.Repeat(`{"method":"publish","params":{"queue":"/room/batch2","mount":"chat","data":1}},`, 101), ",") + `]}`,
	} {
		rpcFail(t, d, "batch", body, http.StatusBadRequest, "BAD_REQUEST")
	}
	rpcFail(t, d, "queue_info", `{"queue":"/room/batch2"}`, http.StatusNotFound, "NOT_FOUND")
}

// TestRPCKeys: what each key may do.
func TestRPCKeys(t *testing.T) {
	d := startRPC(t, nil)
	addr := d.Gateway.Addr()
	call := func(key, method, body string) rpcAnswer {
		return rpcDo(t, addr, http.MethodPost, method, key, body, nil)
	}
	if a := call(roomKey, "publish", `{"queue":"/room/k","mount":"chat","data":1}`); a.status != http.StatusOK {
		t.Fatalf("room key, publish to /room/: %s", a)
	}
	expectRPCError(t, call(roomKey, "publish", `{"queue":"/lobby/k","mount":"chat","data":1}`), http.StatusForbidden, "FORBIDDEN")
	expectRPCError(t, call(roomKey, "set_state", `{"queue":"/room/k","mount":"s","key":"k","value":1}`), http.StatusForbidden, "FORBIDDEN")
	expectRPCError(t, call(roomKey, "kick", `{"user":"bob"}`), http.StatusForbidden, "FORBIDDEN")
	a := call(roomKey, "batch", `{"calls":[{"method":"get_state","params":{"queue":"/room/k","mount":"s"}},{"method":"queue_info","params":{"queue":"/room/k"}},{"method":"publish","params":{"queue":"/user/x","mount":"chat","data":1}}]}`)
	var r batchRes
	if err := json.Unmarshal(a.body, &r); err != nil || a.status != http.StatusOK || len(r.Results) != 3 {
		t.Fatalf("room key batch: %s", a)
	}
	for i, want := range []string{"NOT_FOUND", "FORBIDDEN", "FORBIDDEN"} {
		if r.Results[i].Error == nil || r.Results[i].Error.Code != want {
			t.Fatalf("room key batch call %d: %+v, want %s", i, r.Results[i], want)
		}
	}
	expectRPCError(t, call("", "publish", `{}`), http.StatusUnauthorized, "UNAUTHORIZED")
	expectRPCError(t, call("wrong-key-0123456789", "publish", `{}`), http.StatusUnauthorized, "UNAUTHORIZED")
	a = rpcDo(t, addr, http.MethodPost, "publish", "", `{}`, http.Header{"Authorization": {"Basic " + testAPIKey}})
	expectRPCError(t, a, http.StatusUnauthorized, "UNAUTHORIZED")
	if a.header.Get("WWW-Authenticate") == "" {
		t.Fatal("401 without WWW-Authenticate")
	}
	a = rpcDo(t, addr, http.MethodPost, "publish", "", `{"queue":"/room/k","mount":"chat","data":1}`, http.Header{"Authorization": {"bearer  " + testAPIKey + " "}})
	if a.status != http.StatusOK {
		t.Fatalf("lower-case scheme and spaces: %s", a)
	}
}

func TestRPCNoKeys(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) { c.Gateway.APIKeys = nil })
	a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/x","mount":"chat","data":1}`, nil)
	expectRPCError(t, a, http.StatusUnauthorized, "UNAUTHORIZED")
	if !strings.Contains(string(a.body), "no API keys are configured") {
		t.Fatalf("message does not say why: %s", a)
	}
}

// TestRPCBadInput: every malformed call is refused with the documented
// status and code, and none changes anything.
func TestRPCBadInput(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) { c.Gateway.RPCMaxBody = 4096 })
	const queue = "/room/bad"
	rpcOK(t, d, "set_state", `{"queue":"`+queue+`","mount":"scores","key":"k","value":1}`, new(setStateRes))
	rpcOK(t, d, "publish", `{"queue":"`+queue+`","mount":"chat","data":1}`, new(publishRes))
	var before queueInfoRes
	rpcOK(t, d, "queue_info", `{"queue":"`+queue+`"}`, &before)
	var stateBefore getStateRes
	rpcOK(t, d, "get_state", `{"queue":"`+queue+`","mount":"scores"}`, &stateBefore)

	big := `{"queue":"` + queue + `","mount":"chat","data":"` + strings.Repeat("x", 5000) + `"}`
	cases := []struct {
		name, httpMethod, method, key, body string
		status                              int
		code, mention                       string
	}{
		{"malformed JSON", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat","data":1`, 400, "BAD_REQUEST", "malformed"},
		{"not JSON", "POST", "publish", testAPIKey, `queue=/room/bad`, 400, "BAD_REQUEST", "malformed"},
		{"empty body", "POST", "publish", testAPIKey, ``, 400, "BAD_REQUEST", "object"},
		{"array", "POST", "publish", testAPIKey, `[1]`, 400, "BAD_REQUEST", "object"},
		{"trailing data", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat","data":1} {}`, 400, "BAD_REQUEST", "after"},
		{"wrong type", "POST", "publish", testAPIKey, `{"queue":5,"mount":"chat","data":1}`, 400, "BAD_REQUEST", `"queue"`},
		{"wrong type mount", "POST", "set_state", testAPIKey, `{"queue":"/room/bad","mount":["scores"],"key":"k","value":2}`, 400, "BAD_REQUEST", `"mount"`},
		{"null queue", "POST", "publish", testAPIKey, `{"queue":null,"mount":"chat","data":1}`, 400, "BAD_REQUEST", `"queue"`},
		{"unknown field", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat","dat":1}`, 400, "BAD_REQUEST", `"dat"`},
		{"duplicate field", "POST", "publish", testAPIKey, `{"queue":"/room/bad","queue":"/room/bad","mount":"chat","data":1}`, 400, "BAD_REQUEST", `"queue"`},
		{"missing field", "POST", "set_state", testAPIKey, `{"queue":"/room/bad","mount":"scores","value":2}`, 400, "BAD_REQUEST", `"key"`},
		{"missing data", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat"}`, 400, "BAD_REQUEST", `"data"`},
		{"data and data_base64", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat","data":1,"data_base64":"AA=="}`, 400, "BAD_REQUEST", `"data_base64"`},
		{"bad base64", "POST", "set_state", testAPIKey, `{"queue":"/room/bad","mount":"scores","key":"k","value_base64":"!!"}`, 400, "BAD_REQUEST", `"value_base64"`},
		{"negative offset", "POST", "history", testAPIKey, `{"queue":"/room/bad","mount":"chat","since_offset":-5}`, 400, "BAD_REQUEST", `"since_offset"`},
		{"bad key list", "POST", "get_state", testAPIKey, `{"queue":"/room/bad","mount":"scores","keys":"k"}`, 400, "BAD_REQUEST", `"keys"`},
		{"unknown method", "POST", "publsh", testAPIKey, `{}`, 404, "UNKNOWN_MESSAGE", "publsh"},
		{"no method", "POST", "", testAPIKey, `{}`, 404, "UNKNOWN_MESSAGE", "methods"},
		{"nested path", "POST", "publish/x", testAPIKey, `{}`, 404, "UNKNOWN_MESSAGE", "methods"},
		{"missing key", "POST", "publish", "", `{"queue":"/room/bad","mount":"chat","data":2}`, 401, "UNAUTHORIZED", "key"},
		{"wrong key", "POST", "publish", "not-a-key-0123456789", `{"queue":"/room/bad","mount":"chat","data":2}`, 401, "UNAUTHORIZED", "key"},
		{"method not allowed", "POST", "set_state", roomKey, `{"queue":"/room/bad","mount":"scores","key":"k","value":2}`, 403, "FORBIDDEN", "set_state"},
		{"queue outside prefixes", "POST", "publish", roomKey, `{"queue":"/lobby/bad","mount":"chat","data":2}`, 403, "FORBIDDEN", "/lobby/bad"},
		{"oversized body", "POST", "publish", testAPIKey, big, 413, "PAYLOAD_TOO_LARGE", "4096"},
		{"invalid queue name", "POST", "publish", testAPIKey, `{"queue":"room/bad","mount":"chat","data":2}`, 400, "INVALID_QUEUE_NAME", "room/bad"},
		{"invalid queue name segment", "POST", "get_state", testAPIKey, `{"queue":"/room/../bad","mount":"scores"}`, 400, "INVALID_QUEUE_NAME", ".."},
		{"invalid mount", "POST", "publish", testAPIKey, `{"queue":"/room/bad","mount":"c h a t","data":2}`, 400, "INVALID_MOUNT", "c h a t"},
		{"invalid state key", "POST", "set_state", testAPIKey, `{"queue":"/room/bad","mount":"scores","key":"","value":2}`, 400, "BAD_REQUEST", "key"},
		{"GET", "GET", "publish", testAPIKey, ``, 405, "BAD_REQUEST", "POST"},
		{"PUT", "PUT", "publish", testAPIKey, `{"queue":"/room/bad","mount":"chat","data":2}`, 405, "BAD_REQUEST", "POST"},
		{"batch too large", "POST", "batch", testAPIKey, `{"calls":[` + strings.TrimSuffix(strings.Repeat(`{"method":"x","params":{}},`, 101), ",") + `]}`, 400, "BAD_REQUEST", "100"},
		{"batch not a list", "POST", "batch", testAPIKey, `{"calls":{"method":"publish"}}`, 400, "BAD_REQUEST", `"calls": expected an array, got an object`},
		{"keys not strings", "POST", "get_state", testAPIKey, `{"queue":"/room/bad","mount":"scores","keys":[1]}`, 400, "BAD_REQUEST", `"keys": expected an array of strings`},
		{"limit not an integer", "POST", "history", testAPIKey, `{"queue":"/room/bad","mount":"chat","limit":1.5}`, 400, "BAD_REQUEST", `"limit": expected an integer, got the number 1.5`},
		{"local not a boolean", "POST", "kick", testAPIKey, `{"user":"bob","local":"yes"}`, 400, "BAD_REQUEST", `"local": expected true or false, got a string`},
		{"data not UTF-8", "POST", "publish", testAPIKey, "{\"queue\":\"/room/bad\",\"mount\":\"chat\",\"data\":\"caf\xe9\"}", 400, "BAD_REQUEST", "UTF-8"},
		{"state key not UTF-8", "POST", "set_state", testAPIKey, "{\"queue\":\"/room/bad\",\"mount\":\"scores\",\"key\":\"k\xff\",\"value\":3}", 400, "BAD_REQUEST", "UTF-8"},
		{"nested batch", "POST", "batch", testAPIKey, `{"calls":[{"method":"batch","params":{"calls":[]}}]}`, 400, "BAD_REQUEST", "batch"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := rpcDo(t, d.Gateway.Addr(), c.httpMethod, c.method, c.key, c.body, nil)
			expectRPCError(t, a, c.status, c.code)
			if !strings.Contains(string(a.body), strings.ReplaceAll(c.mention, `"`, `\"`)) {
				t.Fatalf("message does not mention %s: %s", c.mention, a)
			}
			if c.status == 405 && a.header.Get("Allow") != "POST" {
				t.Fatalf("405 with Allow %q", a.header.Get("Allow"))
			}
		})
	}
	var after queueInfoRes
	rpcOK(t, d, "queue_info", `{"queue":"`+queue+`"}`, &after)
	if after.Head != before.Head || !slices.Equal(after.Mounts, before.Mounts) || after.Epoch != before.Epoch {
		t.Fatalf("bad input changed the queue: %+v, was %+v", after, before)
	}
	var stateAfter getStateRes
	rpcOK(t, d, "get_state", `{"queue":"`+queue+`","mount":"scores"}`, &stateAfter)
	if string(stateAfter.State["k"].Value) != "1" || len(stateAfter.State) != 1 {
		t.Fatalf("bad input changed the state: %+v", stateAfter)
	}
	rpcFail(t, d, "queue_info", `{"queue":"/lobby/bad"}`, http.StatusNotFound, "NOT_FOUND")
}

// TestRPCPayloadLimit: data over the gateway's payload limit is refused
// before it reaches the node.
func TestRPCPayloadLimit(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Gateway.MaxPayload = 1000
		c.Gateway.MaxFrameBytes = 4096
	})
	rpcFail(t, d, "publish", `{"queue":"/room/big","mount":"chat","data":"`+strings.Repeat("x", 1000)+`"}`, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE")
	rpcFail(t, d, "set_state", `{"queue":"/room/big","mount":"s","key":"k","value_base64":"`+strings.Repeat("AAAA", 334)+`"}`, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE")
	rpcOK(t, d, "publish", `{"queue":"/room/big","mount":"chat","data":"`+strings.Repeat("x", 998)+`"}`, new(publishRes))
}

func TestRPCRequestID(t *testing.T) {
	d := startRPC(t, nil)
	addr := d.Gateway.Addr()
	a := rpcDo(t, addr, http.MethodPost, "queue_info", testAPIKey, `{"queue":"/room/none"}`, http.Header{"X-Request-Id": {"php-req-42"}})
	if got := a.header.Get("X-Request-Id"); got != "php-req-42" {
		t.Fatalf("request id %q, want the caller's echoed", got)
	}
	seen := map[string]bool{}
	for _, h := range []http.Header{nil, {"X-Request-Id": {strings.Repeat("x", 129)}}, {"X-Request-Id": {"bad-é-id"}}} {
		a := rpcDo(t, addr, http.MethodPost, "nope", "", `{}`, h)
		id := a.header.Get("X-Request-Id")
		if len(id) < 16 || seen[id] || strings.Contains(id, "x") {
			t.Fatalf("generated request id %q", id)
		}
		seen[id] = true
	}
}

// TestRPCLog: one log line per call with its method, status, code, duration
// and request id, and never the key.
func TestRPCLog(t *testing.T) {
	var logs testutil.SyncBuffer
	d := startRPC(t, func(c *launch.DevConfig) {
		c.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	rpcDo(t, d.Gateway.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/log","mount":"chat","data":1}`, http.Header{"X-Request-Id": {"log-1"}})
	rpcDo(t, d.Gateway.Addr(), http.MethodPost, "publish", roomKey, `{"queue":"/lobby/log","mount":"chat","data":1}`, http.Header{"X-Request-Id": {"log-2"}})
	rpcDo(t, d.Gateway.Addr(), http.MethodPost, "publish", "bad-key-0123456789abc", `{}`, http.Header{"X-Request-Id": {"log-3"}})
	// An unknown method is logged cut short: anyone picks the path.
	long := strings.Repeat("m", 2000)
	rpcDo(t, d.Gateway.Addr(), http.MethodPost, long, "", `{}`, http.Header{"X-Request-Id": {"log-4"}})
	want := map[string]struct {
		status float64
		code   string
		key    float64
		method string
	}{
		"log-1": {200, "OK", 1, "publish"}, "log-2": {403, "FORBIDDEN", 2, "publish"}, "log-3": {401, "UNAUTHORIZED", 0, "publish"},
		"log-4": {401, "UNAUTHORIZED", 0, long[:64] + "..."},
	}
	testutil.WaitFor(t, 5*time.Second, "four rpc call log lines", func() bool { return strings.Count(logs.String(), `"msg":"rpc call"`) >= 4 })
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, testAPIKey) || strings.Contains(line, roomKey) || strings.Contains(line, "bad-key-0123456789abc") {
			t.Fatalf("a key was logged: %s", line)
		}
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "rpc call" {
			continue
		}
		w, ok := want[rec["request_id"].(string)]
		if !ok {
			t.Fatalf("unexpected rpc log line %s", line)
		}
		delete(want, rec["request_id"].(string))
		key, _ := rec["api_key"].(float64)
		if rec["method"] != w.method || rec["status"] != w.status || rec["code"] != w.code || key != w.key || rec["duration"] == nil {
			t.Fatalf("log line %s, want %+v", line, w)
		}
	}
	if len(want) > 0 {
		t.Fatalf("no log line for %v", want)
	}
}

// TestRPCMetrics: calls are counted by method and code on /metrics.
func TestRPCMetrics(t *testing.T) {
	d := startRPC(t, nil)
	rpcOK(t, d, "publish", `{"queue":"/room/m","mount":"chat","data":1}`, new(publishRes))
	rpcFail(t, d, "queue_info", `{"queue":"/room/none"}`, http.StatusNotFound, "NOT_FOUND")
	rpcFail(t, d, "whatever", `{}`, http.StatusNotFound, "UNKNOWN_MESSAGE")
	resp, err := http.Get("http://" + d.Gateway.InternalAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`imq_gateway_rpc_requests_total{code="OK",method="publish"} 1`,
		`imq_gateway_rpc_requests_total{code="NOT_FOUND",method="queue_info"} 1`,
		`imq_gateway_rpc_requests_total{code="UNKNOWN_MESSAGE",method="unknown"} 1`,
		`imq_gateway_rpc_seconds_count{method="publish"} 1`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestRPCInflightLimit: past RPCMaxInflight calls in progress, a call is
// answered 429 at once and changes nothing.
func TestRPCInflightLimit(t *testing.T) {
	d := startRPC(t, func(c *launch.DevConfig) { c.Gateway.RPCMaxInflight = 1 })
	// A call whose body is still arriving holds the one slot.
	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodPost, "http://"+d.Gateway.Addr()+gateway.RPCPath+"publish", pr)
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	done := make(chan rpcAnswer, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- rpcAnswer{}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- rpcAnswer{status: resp.StatusCode, body: b}
	}()
	pw.Write([]byte(`{"queue":"/room/slow",`))
	testutil.WaitFor(t, 5*time.Second, "a publish to be refused LIMIT_EXCEEDED", func() bool {
		return rpc(t, d, "publish", `{"queue":"/room/limited","mount":"chat","data":1}`).errCode() == "LIMIT_EXCEEDED"
	})
	rpcFail(t, d, "publish", `{"queue":"/room/limited","mount":"chat","data":1}`, http.StatusTooManyRequests, "LIMIT_EXCEEDED")
	pw.Write([]byte(`"mount":"chat","data":1}`))
	pw.Close()
	if a := <-done; a.status != http.StatusOK {
		t.Fatalf("the slow call: %s", a)
	}
	rpcFail(t, d, "queue_info", `{"queue":"/room/limited"}`, http.StatusNotFound, "NOT_FOUND")
}

// TestRPCTimeout: a body that does not arrive in time, and a node that
// does not answer, end in 504 TIMEOUT within the RPC timeout.
func TestRPCTimeout(t *testing.T) {
	fake := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply { return nil }) // never answers
	gw := startRPCGateway(t, fake.addr(), func(c *gateway.Config) { c.RPCTimeout = 300 * time.Millisecond })
	start := time.Now()
	a := rpcDo(t, gw.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/t","mount":"chat","data":1}`, nil)
	expectRPCError(t, a, http.StatusGatewayTimeout, "TIMEOUT")
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("timed out after %s", d)
	}

	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequest(http.MethodPost, "http://"+gw.Addr()+gateway.RPCPath+"publish", pr)
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	go pw.Write([]byte(`{"queue":`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	expectRPCError(t, rpcAnswer{status: resp.StatusCode, body: b}, http.StatusGatewayTimeout, "TIMEOUT")
}

// startRPCGateway starts a standalone gateway with the test API keys in
// front of the queue node at nodeAddr (a fake one, say).
func startRPCGateway(t *testing.T, nodeAddr string, mod func(*gateway.Config)) *gateway.Server {
	t.Helper()
	cfg := gateway.DefaultConfig()
	cfg.Addr, cfg.InternalAddr, cfg.Dev, cfg.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, nodeAddr
	cfg.APIKeys = testAPIKeys(t)
	if mod != nil {
		mod(&cfg)
	}
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
	testutil.WaitFor(t, 5*time.Second, "the link to the queue node up", func() bool { return gw.Links()["queuenode"] })
	return gw
}

// TestRPCNodeRequests: what the node receives for each method: backend
// requests, without a user, by the table's version.
func TestRPCNodeRequests(t *testing.T) {
	fake := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		switch {
		case req.GetPublish() != nil:
			return &imqpb.NodeReply{Created: true, Result: &imqpb.NodeReply_Published{Published: &imqpb.Published{Offset: 7}}}
		case req.GetHistory() != nil:
			return &imqpb.NodeReply{Result: &imqpb.NodeReply_History{History: &imqpb.HistoryPage{Epoch: 1, Head: 7}}}
		}
		return &imqpb.NodeReply{Code: imqpb.Code_NOT_FOUND, Message: "no such queue"}
	})
	gw := startRPCGateway(t, fake.addr(), nil)
	a := rpcDo(t, gw.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/n","mount":"chat","data":{"a": 1}}`, nil)
	if a.status != http.StatusOK || string(bytes.TrimSpace(a.body)) != `{"offset":7,"created":true}` {
		t.Fatalf("publish: %s", a)
	}
	req := fake.request(t)
	if !req.GetBackend() || req.GetUser() != "" || req.GetSession() != "" || req.GetPublish().GetQueue() != "/room/n" ||
		string(req.GetPublish().GetPayload()) != `{"a":1}` {
		t.Fatalf("node request %v", req)
	}
	a = rpcDo(t, gw.Addr(), http.MethodPost, "history", testAPIKey, `{"queue":"/room/n","mount":"chat"}`, nil)
	if a.status != http.StatusOK || !strings.Contains(string(a.body), `"events":[]`) {
		t.Fatalf("history: %s", a)
	}
	if req := fake.request(t); req.GetHistory().GetLimit() != 100 || !req.GetBackend() {
		t.Fatalf("history request %v, want limit 100", req)
	}
	expectRPCError(t, rpcDo(t, gw.Addr(), http.MethodPost, "get_state", testAPIKey, `{"queue":"/room/n","mount":"s","keys":["a","b"]}`, nil), http.StatusNotFound, "NOT_FOUND")
	if req := fake.request(t); !slices.Equal(req.GetGetState().GetKeys(), []string{"a", "b"}) {
		t.Fatalf("get_state request %v", req)
	}
	expectRPCError(t, rpcDo(t, gw.Addr(), http.MethodPost, "delete_state", testAPIKey, `{"queue":"/room/n","mount":"s","key":"a"}`, nil), http.StatusNotFound, "NOT_FOUND")
	if req := fake.request(t); !req.GetSetState().GetDelete() || req.GetSetState().GetKey() != "a" {
		t.Fatalf("delete_state request %v", req)
	}
}

// TestRPCNodeDown: a node that cannot be reached is 503 UNAVAILABLE,
// retryable.
func TestRPCNodeDown(t *testing.T) {
	fake := startFakeNode(t, fakeOK)
	gw := startRPCGateway(t, fake.addr(), nil)
	fake.ln.Close()
	fake.mu.Lock()
	for _, c := range fake.conns {
		c.Close()
	}
	fake.mu.Unlock()
	testutil.WaitFor(t, 5*time.Second, "the link to the queue node down", func() bool { return !gw.Links()["queuenode"] })
	expectRPCError(t, rpcDo(t, gw.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/n","mount":"chat","data":1}`, nil), http.StatusServiceUnavailable, "UNAVAILABLE")
}

// TestRPCBroadcastStopsAtDeadline: once a broadcast's time is up, the
// queues it has not reached yet are answered TIMEOUT without being sent
// (nothing runs on the node behind an answer of "outcome unknown").
func TestRPCBroadcastStopsAtDeadline(t *testing.T) {
	var mu sync.Mutex
	received := 0 // publishes before the marker; guarded by mu
	fake := startFakeNode(t, func(req *imqpb.NodeRequest) *imqpb.NodeReply {
		if req.GetPublish().GetQueue() == "/room/marker" {
			return fakeOK(req)
		}
		mu.Lock()
		received++
		mu.Unlock()
		return nil // never answers
	})
	gw := startRPCGateway(t, fake.addr(), func(c *gateway.Config) { c.RPCTimeout = 300 * time.Millisecond })
	queues := make([]string, 300)
	for i := range queues {
		queues[i] = fmt.Sprintf("%q", fmt.Sprint("/room/b", i))
	}
	a := rpcDo(t, gw.Addr(), http.MethodPost, "broadcast", testAPIKey, `{"queues":[`+strings.Join(queues, ",")+`],"mount":"chat","data":1}`, nil)
	if a.status != http.StatusOK {
		t.Fatalf("broadcast: %s", a)
	}
	var res struct {
		Results []struct {
			Error *struct{ Code string } `json:"error"`
		} `json:"results"`
	}
	if err := json.Unmarshal(a.body, &res); err != nil || len(res.Results) != len(queues) {
		t.Fatalf("broadcast answer %s (%v)", a, err)
	}
	for i, r := range res.Results {
		if r.Error == nil || r.Error.Code != "TIMEOUT" {
			t.Fatalf("result %d: %+v, want TIMEOUT", i, r.Error)
		}
	}
	// The link keeps order: once the marker is answered, every publish the
	// broadcast sent has arrived.
	if a := rpcDo(t, gw.Addr(), http.MethodPost, "publish", testAPIKey, `{"queue":"/room/marker","mount":"chat","data":1}`, nil); a.status != http.StatusOK {
		t.Fatalf("marker publish: %s", a)
	}
	mu.Lock()
	n := received
	mu.Unlock()
	if n > 64 {
		t.Fatalf("the node received %d publishes, want at most the 64 sent before the deadline", n)
	}
}

// TestRPCRefusedSlowBody: a call refused before its body is read (no key,
// here) is answered at once even if its body trickles in forever: a caller
// without a key cannot hold the gateway's connections.
func TestRPCRefusedSlowBody(t *testing.T) {
	d := startRPC(t, nil)
	c, err := net.Dial("tcp", d.Gateway.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A chunked body: its length is unknown, so net/http would read it to
	// its end before answering.
	io.WriteString(c, "POST "+gateway.RPCPath+"publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer while the body trickles: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status %d, want 401", resp.StatusCode)
	}
}
