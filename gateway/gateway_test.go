package gateway_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	"github.com/imq-dev/imq/internal/wire"
	"github.com/imq-dev/imq/launch"
	"github.com/imq-dev/imq/launch/launchtest"
	imqpb "github.com/imq-dev/imq/proto"
)

var testSecret = []byte("0123456789abcdef0123456789abcdef")

// startDev starts a queue node and a gateway on 127.0.0.1:0; mod may change
// the gateway's config first.
func startDev(t testing.TB, mod func(*gateway.Config)) *launch.Dev {
	t.Helper()
	return launchtest.StartDev(t, func(c *launch.DevConfig) {
		c.Gateway.JWTSecret = testSecret
		c.Gateway.AllowedOrigins = []string{"https://game.example.com"}
		if mod != nil {
			mod(&c.Gateway)
		}
	})
}

// rawClient speaks the protocol frame by frame, with no SDK in between.
type rawClient struct {
	t       testing.TB
	ws      *websocket.Conn
	json    bool
	id      uint64
	backlog []*imqpb.ServerMessage // read while waiting for a reply
}

func dialRaw(t testing.TB, d *launch.Dev, query string, json bool, header http.Header) (*rawClient, *http.Response, error) {
	t.Helper()
	return dialRawURL(t, d.URL(), query, json, header)
}

// dialRawURL dials the gateway WebSocket at url (ws://host:port/ws).
func dialRawURL(t testing.TB, url, query string, json bool, header http.Header) (*rawClient, *http.Response, error) {
	t.Helper()
	sub := gateway.SubprotocolBinary
	if json {
		sub = gateway.SubprotocolJSON
	}
	dialer := websocket.Dialer{Subprotocols: []string{sub}, HandshakeTimeout: 5 * time.Second}
	ws, resp, err := dialer.Dial(url+query, header)
	if err != nil {
		return nil, resp, err
	}
	t.Cleanup(func() { ws.Close() })
	return &rawClient{t: t, ws: ws, json: json}, resp, nil
}

func mustDial(t testing.TB, d *launch.Dev, user string, json bool) *rawClient {
	t.Helper()
	c, _, err := dialRaw(t, d, "?user="+user, json, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *rawClient) send(m *imqpb.ClientMessage) uint64 {
	c.t.Helper()
	if m.Id == 0 {
		c.id++
		m.Id = c.id
	}
	var err error
	if c.json {
		b, merr := wire.MarshalJSON(m)
		if merr != nil {
			c.t.Fatal(merr)
		}
		err = c.ws.WriteMessage(websocket.TextMessage, b)
	} else {
		b, _ := proto.Marshal(m)
		err = c.ws.WriteMessage(websocket.BinaryMessage, b)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	return m.Id
}

func (c *rawClient) sendRaw(kind int, b []byte) {
	c.t.Helper()
	if err := c.ws.WriteMessage(kind, b); err != nil {
		c.t.Fatal(err)
	}
}

// next returns the next server message.
func (c *rawClient) next() *imqpb.ServerMessage {
	c.t.Helper()
	if len(c.backlog) > 0 {
		m := c.backlog[0]
		c.backlog = c.backlog[1:]
		return m
	}
	m, err := c.read()
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

func (c *rawClient) read() (*imqpb.ServerMessage, error) {
	c.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	kind, b, err := c.ws.ReadMessage()
	if err != nil {
		return nil, err
	}
	var m imqpb.ServerMessage
	if c.json {
		if kind != websocket.TextMessage {
			c.t.Fatalf("got frame type %d on the JSON subprotocol", kind)
		}
		err = wire.UnmarshalJSON(b, &m)
	} else {
		if kind != websocket.BinaryMessage {
			c.t.Fatalf("got frame type %d on the binary subprotocol", kind)
		}
		err = proto.Unmarshal(b, &m)
	}
	if err != nil {
		c.t.Fatalf("decode %q: %v", b, err)
	}
	return &m, nil
}

// reply waits for the reply to id; other messages are kept for next.
func (c *rawClient) reply(id uint64) *imqpb.Reply {
	c.t.Helper()
	for {
		m, err := c.read()
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		if r := m.GetReply(); r != nil {
			if r.GetId() != id {
				c.t.Fatalf("reply to %d, want %d: %v", r.GetId(), id, r)
			}
			return r
		}
		if m.GetGoodbye() != nil {
			c.t.Fatalf("goodbye while waiting for reply %d: %v", id, m.GetGoodbye())
		}
		c.backlog = append(c.backlog, m)
	}
}

func (c *rawClient) call(m *imqpb.ClientMessage) *imqpb.Reply {
	c.t.Helper()
	return c.reply(c.send(m))
}

func (c *rawClient) join(queue string, mounts ...*imqpb.MountSpec) *imqpb.Reply {
	c.t.Helper()
	return c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: queue, Mounts: mounts}}})
}

func (c *rawClient) publish(queue, mount string, payload []byte) *imqpb.Reply {
	c.t.Helper()
	return c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: queue, Mount: mount, Payload: payload}}})
}

func chat() *imqpb.MountSpec { return &imqpb.MountSpec{Name: "chat", Kind: imqpb.MountKind_MESSAGE} }

func expectCode(t testing.TB, r *imqpb.Reply, code imqpb.Code) {
	t.Helper()
	if r.GetCode() != code {
		t.Fatalf("reply code %s (%q), want %s", r.GetCode(), r.GetMessage(), code)
	}
	if code != imqpb.Code_OK && r.GetMessage() == "" {
		t.Fatalf("error reply %s without a message", code)
	}
}

// expectGoodbye reads until the goodbye and then the close.
func (c *rawClient) expectGoodbye(reason imqpb.Reason) *imqpb.Goodbye {
	c.t.Helper()
	for {
		m, err := c.read()
		if err != nil {
			c.t.Fatalf("connection ended without goodbye %s: %v", reason, err)
		}
		if g := m.GetGoodbye(); g != nil {
			if g.GetReason() != reason {
				c.t.Fatalf("goodbye %s (%q), want %s", g.GetReason(), g.GetMessage(), reason)
			}
			if _, err := c.read(); err == nil {
				c.t.Fatal("frame after goodbye")
			}
			return g
		}
	}
}

func token(t testing.TB, secret []byte, sub string, exp time.Time) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{Subject: sub, ExpiresAt: jwt.NewNumericDate(exp)}).SignedString(secret)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestChatOrderAndState(t *testing.T) {
	d := startDev(t, nil)
	for _, js := range []bool{false, true} {
		name := map[bool]string{false: "binary", true: "json"}[js]
		t.Run(name, func(t *testing.T) {
			queue := "/room/order-" + name
			a := mustDial(t, d, "alice", js)
			b := mustDial(t, d, "bob", !js) // the other subprotocol in the same room
			expectCode(t, a.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{}}}), imqpb.Code_OK)
			scores := &imqpb.MountSpec{Name: "scores", Kind: imqpb.MountKind_STATE}
			ja := a.join(queue, chat(), scores)
			expectCode(t, ja, imqpb.Code_OK)
			jb := b.join(queue, chat(), scores)
			expectCode(t, jb, imqpb.Code_OK)
			if ja.GetJoined().GetEpoch() == 0 || ja.GetJoined().GetEpoch() != jb.GetJoined().GetEpoch() {
				t.Fatalf("epochs %d and %d", ja.GetJoined().GetEpoch(), jb.GetJoined().GetEpoch())
			}
			r := a.publish(queue, "chat", []byte(`{"text":"hi"}`))
			expectCode(t, r, imqpb.Code_OK)
			off := r.GetPublished().GetOffset()
			expectCode(t, b.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: queue, Mount: "scores", Key: "bob", Value: []byte("12")}}}), imqpb.Code_OK)
			for _, c := range []*rawClient{a, b} {
				var ev *imqpb.Event
				var st *imqpb.StateChange
				for ev == nil || st == nil {
					m := c.next()
					if m.GetEvent() != nil {
						ev = m.GetEvent()
					}
					if m.GetState() != nil {
						if ev == nil {
							t.Fatal("state change before the earlier event")
						}
						st = m.GetState()
					}
				}
				if ev.GetOffset() != off || ev.GetSender() != "alice" || string(ev.GetPayload()) != `{"text":"hi"}` {
					t.Fatalf("event %v", ev)
				}
				if st.GetVersion() != off+1 || st.GetKey() != "bob" || string(st.GetValue()) != "12" || st.GetSender() != "bob" {
					t.Fatalf("state change %v", st)
				}
			}
			// A late joiner gets the snapshot.
			c := mustDial(t, d, "carol", js)
			jc := c.join(queue, scores)
			expectCode(t, jc, imqpb.Code_OK)
			snap := jc.GetJoined().GetMounts()[0].GetState()
			if len(snap) != 1 || snap[0].GetKey() != "bob" || string(snap[0].GetValue()) != "12" {
				t.Fatalf("snapshot %v", snap)
			}
		})
	}
}

func TestJSONPayloadTravelsAsJSON(t *testing.T) {
	d := startDev(t, nil)
	c := mustDial(t, d, "alice", true)
	// Hand-written JSON, as a browser would send it.
	c.sendRaw(websocket.TextMessage, []byte(`{"id":"1","join":{"queue":"/room/js","mounts":[{"name":"chat","kind":"MESSAGE"}]}}`))
	expectCode(t, c.reply(1), imqpb.Code_OK)
	c.sendRaw(websocket.TextMessage, []byte(`{"id":"2","publish":{"queue":"/room/js","mount":"chat","payload":{"text":"gg","n":[1,2]}}}`))
	var sawEvent bool
	for !sawEvent {
		c.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, b, err := c.ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), `"event"`) {
			sawEvent = true
			if !strings.Contains(string(b), `"payload":{"n":[1,2],"text":"gg"}`) && !strings.Contains(string(b), `"payload":{"text":"gg","n":[1,2]}`) {
				t.Fatalf("payload not carried as JSON: %s", b)
			}
		}
	}
}

func TestBadInput(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.MaxPayload = 1024
		c.MaxFrameBytes = 4096
		c.SendQueueBytes = 1 << 20
	})
	t.Run("malformed frame", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		c.sendRaw(websocket.BinaryMessage, []byte{0xff, 0xff, 0xff})
		expectCode(t, c.reply(0), imqpb.Code_BAD_REQUEST)
		expectCode(t, c.join("/room/ok", chat()), imqpb.Code_OK) // still usable
	})
	t.Run("malformed json", func(t *testing.T) {
		c := mustDial(t, d, "u1", true)
		c.sendRaw(websocket.TextMessage, []byte(`{"id":1,"join":`))
		expectCode(t, c.reply(0), imqpb.Code_BAD_REQUEST)
		c.sendRaw(websocket.BinaryMessage, []byte(`{}`))
		expectCode(t, c.reply(0), imqpb.Code_BAD_REQUEST)
		expectCode(t, c.join("/room/ok", chat()), imqpb.Code_OK)
	})
	t.Run("unknown message", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		// Field 99, a message type from the future.
		c.sendRaw(websocket.BinaryMessage, []byte{0x08, 0x05, 0x9a, 0x06, 0x00})
		expectCode(t, c.reply(5), imqpb.Code_UNKNOWN_MESSAGE)
		expectCode(t, c.join("/room/ok", chat()), imqpb.Code_OK)
	})
	t.Run("oversized payload", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		expectCode(t, c.publish("/room/big", "chat", make([]byte, 2000)), imqpb.Code_PAYLOAD_TOO_LARGE)
		expectCode(t, c.publish("/room/big", "chat", make([]byte, 1000)), imqpb.Code_OK)
	})
	t.Run("oversized frame", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		b, _ := proto.Marshal(&imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: "/room/big", Mount: "chat", Payload: make([]byte, 8000)}}})
		c.sendRaw(websocket.BinaryMessage, b)
		g := c.expectGoodbye(imqpb.Reason_REASON_PROTOCOL_ERROR)
		if g.GetReconnect() {
			t.Fatal("protocol error goodbye asks to reconnect")
		}
	})
	t.Run("invalid queue name", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		for _, q := range []string{"", "room", "/room/", "/room//1", "/room/a b", "/" + strings.Repeat("x", 300)} {
			expectCode(t, c.join(q, chat()), imqpb.Code_INVALID_QUEUE_NAME)
			expectCode(t, c.publish(q, "chat", nil), imqpb.Code_INVALID_QUEUE_NAME)
		}
	})
	t.Run("wrong mount type", func(t *testing.T) {
		c := mustDial(t, d, "u1", false)
		expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/room/mt", Mount: "scores", Key: "k", Value: []byte("1")}}}), imqpb.Code_OK)
		expectCode(t, c.publish("/room/mt", "scores", []byte("x")), imqpb.Code_WRONG_MOUNT_TYPE)
		expectCode(t, c.join("/room/mt", &imqpb.MountSpec{Name: "scores", Kind: imqpb.MountKind_MESSAGE}), imqpb.Code_WRONG_MOUNT_TYPE)
		expectCode(t, c.join("/room/mt", &imqpb.MountSpec{Name: "scores"}), imqpb.Code_INVALID_MOUNT)
	})
	t.Run("request before connect", func(t *testing.T) {
		c, _, err := dialRaw(t, d, "", false, nil)
		if err != nil {
			t.Fatal(err)
		}
		expectCode(t, c.join("/room/1", chat()), imqpb.Code_NOT_CONNECTED)
		r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: token(t, testSecret, "dave", time.Now().Add(time.Hour))}}})
		expectCode(t, r, imqpb.Code_OK)
		if r.GetConnected().GetUser() != "dave" {
			t.Fatalf("connected as %q", r.GetConnected().GetUser())
		}
		expectCode(t, c.join("/room/1", chat()), imqpb.Code_OK)
		expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{}}}), imqpb.Code_ALREADY_CONNECTED)
	})
	t.Run("bad token", func(t *testing.T) {
		for name, tok := range map[string]string{
			"garbage":      "not-a-jwt",
			"wrong secret": token(t, []byte("another-secret-of-32-bytes......"), "eve", time.Now().Add(time.Hour)),
			"expired":      token(t, testSecret, "eve", time.Now().Add(-time.Hour)),
			"bad subject":  token(t, testSecret, "a/b", time.Now().Add(time.Hour)),
		} {
			t.Run(name, func(t *testing.T) {
				c, _, err := dialRaw(t, d, "", false, nil)
				if err != nil {
					t.Fatal(err)
				}
				r := c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: tok}}})
				expectCode(t, r, imqpb.Code_UNAUTHORIZED)
				c.expectGoodbye(imqpb.Reason_REASON_AUTH_FAILED)
			})
		}
	})
	t.Run("bad origin", func(t *testing.T) {
		_, resp, err := dialRaw(t, d, "?user=u1", false, http.Header{"Origin": {"https://evil.example.com"}})
		if err == nil {
			t.Fatal("connection with a foreign Origin was accepted")
		}
		if resp == nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("response %v, want 403", resp)
		}
		var body struct {
			Error struct{ Code, Message string }
		}
		json.NewDecoder(resp.Body).Decode(&body)
		if body.Error.Code != "FORBIDDEN" {
			t.Fatalf("error body %+v", body)
		}
		if _, _, err := dialRaw(t, d, "?user=u1", false, http.Header{"Origin": {"https://game.example.com"}}); err != nil {
			t.Fatalf("allowed origin refused: %v", err)
		}
	})
	t.Run("no subprotocol", func(t *testing.T) {
		_, resp, err := websocket.DefaultDialer.Dial(d.URL()+"?user=u1", nil)
		if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("dial without subprotocol: err %v, resp %v", err, resp)
		}
	})
	// The server survived all of it.
	c := mustDial(t, d, "final", false)
	expectCode(t, c.join("/room/ok", chat()), imqpb.Code_OK)
}

func TestSilentClientsAreClosed(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.PingInterval = 100 * time.Millisecond
		c.ClientTimeout = 400 * time.Millisecond
		c.AuthTimeout = 300 * time.Millisecond
	})
	t.Run("ping timeout", func(t *testing.T) {
		c := mustDial(t, d, "quiet", false)
		c.ws.SetPingHandler(func(string) error { return nil }) // never answer pings
		g := c.expectGoodbye(imqpb.Reason_REASON_PING_TIMEOUT)
		if !g.GetReconnect() {
			t.Fatal("ping timeout goodbye does not ask to reconnect")
		}
	})
	t.Run("pongs keep it open", func(t *testing.T) {
		c := mustDial(t, d, "lively", false) // gorilla answers pings while reading
		c.ws.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := c.ws.ReadMessage(); err == nil {
			t.Fatal("the server sent a message to an idle client")
		} else if !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("connection closed although the client answered pings: %v", err)
		}
	})
	t.Run("auth timeout", func(t *testing.T) {
		c, _, err := dialRaw(t, d, "", false, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.expectGoodbye(imqpb.Reason_REASON_AUTH_TIMEOUT)
	})
}

// TestPipelinedJoinLeave: joins and leaves sent without waiting end in the
// state the last one asks for, at the node and in the gateway's fan-out.
func TestPipelinedJoinLeave(t *testing.T) {
	d := startDev(t, nil)
	c := mustDial(t, d, "pipeliner", false)
	pub := mustDial(t, d, "pub", false)
	join := func(q string) uint64 {
		return c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: q, Mounts: []*imqpb.MountSpec{chat()}}}})
	}
	leave := func(q string) uint64 {
		return c.send(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: q}}})
	}
	// /room/in ends joined, /room/out ends left.
	ids := []uint64{join("/room/in"), leave("/room/in"), join("/room/in"), join("/room/out"), leave("/room/out")}
	for _, id := range ids {
		expectCode(t, c.reply(id), imqpb.Code_OK)
	}
	expectCode(t, pub.publish("/room/out", "chat", []byte("not for you")), imqpb.Code_OK)
	off := pub.publish("/room/in", "chat", []byte("for you")).GetPublished().GetOffset()
	ev := nextEvent(t, c)
	if ev.GetQueue() != "/room/in" || ev.GetOffset() != off {
		t.Fatalf("got event %v, want /room/in offset %d", ev, off)
	}
	// The node agrees: leaving /room/out again says NOT_JOINED.
	expectCode(t, c.call(&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: "/room/out"}}}), imqpb.Code_NOT_JOINED)
}

func TestConnectionLimit(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) { c.MaxConnections = 2 })
	a := mustDial(t, d, "a", false)
	mustDial(t, d, "b", false)
	_, resp, err := dialRaw(t, d, "?user=c", false, nil)
	if err == nil {
		t.Fatal("a third connection was accepted with a limit of 2")
	}
	if resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("response %v, want 503", resp)
	}
	var body struct {
		Error struct{ Code, Message string }
	}
	json.NewDecoder(resp.Body).Decode(&body)
	if body.Error.Code != "LIMIT_EXCEEDED" {
		t.Fatalf("error body %+v", body)
	}
	// Capacity comes back when a connection closes.
	a.ws.Close()
	testutil.WaitFor(t, 5*time.Second, "capacity back after a close", func() bool {
		c, _, err := dialRaw(t, d, "?user=c", false, nil)
		if err != nil {
			return false
		}
		expectCode(t, c.join("/room/limit", chat()), imqpb.Code_OK)
		return true
	})
}
