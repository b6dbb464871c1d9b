package client

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// goodbyeServer is a gateway that accepts every connect and then says
// goodbye at once with bye, counting the connections it accepted.
func goodbyeServer(t *testing.T, bye *imqpb.Goodbye) (url string, conns *atomic.Int32) {
	t.Helper()
	conns = new(atomic.Int32)
	up := websocket.Upgrader{Subprotocols: []string{subprotocol}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_, b, err := ws.ReadMessage()
		var m imqpb.ClientMessage
		if err != nil || proto.Unmarshal(b, &m) != nil || m.GetConnect() == nil {
			return
		}
		conns.Add(1)
		for _, out := range []*imqpb.ServerMessage{
			{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{Id: m.GetId(), Result: &imqpb.Reply_Connected{Connected: &imqpb.Connected{User: "u", Session: "s"}}}}},
			{Msg: &imqpb.ServerMessage_Goodbye{Goodbye: bye}},
		} {
			b, _ := proto.Marshal(out)
			if ws.WriteMessage(websocket.BinaryMessage, b) != nil {
				return
			}
		}
		ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
		ws.ReadMessage() // until the client closes
	}))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", conns
}

// TestGoodbyeTerminalReasonCloses: a goodbye with a terminal reason (KICKED)
// closes the client for good, even from a server that sets the reconnect
// flag: the reasons table decides, not the flag.
func TestGoodbyeTerminalReasonCloses(t *testing.T) {
	url, conns := goodbyeServer(t, &imqpb.Goodbye{Reason: imqpb.Reason_REASON_KICKED, Message: "bye", Reconnect: true})
	c, err := Dial(testutil.Context(t, 5*time.Second), url, WithUser("u"), WithBackoff(time.Millisecond, 10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testutil.WaitFor(t, 5*time.Second, "the client to close", func() bool { return c.Err() != nil })
	var g *GoodbyeError
	if !errors.As(c.Err(), &g) || g.Reason != imqpb.Reason_REASON_KICKED {
		t.Fatalf("client error %v, want the KICKED goodbye", c.Err())
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("the server saw %d connections, want 1 (no reconnect after KICKED)", n)
	}
}

// TestGoodbyeRetryableReasonReconnects: a goodbye with a retryable reason
// (SHUTDOWN) brings the client back, even from a server that leaves the
// reconnect flag unset, and a per-case reason (AUTH_FAILED) follows the
// flag.
func TestGoodbyeRetryableReasonReconnects(t *testing.T) {
	for _, tc := range []struct {
		bye       *imqpb.Goodbye
		reconnect bool
	}{
		{&imqpb.Goodbye{Reason: imqpb.Reason_REASON_SHUTDOWN}, true},
		{&imqpb.Goodbye{Reason: imqpb.Reason_REASON_AUTH_FAILED, Reconnect: true}, true},
		{&imqpb.Goodbye{Reason: imqpb.Reason_REASON_AUTH_FAILED}, false},
	} {
		url, conns := goodbyeServer(t, tc.bye)
		c, err := Dial(testutil.Context(t, 5*time.Second), url, WithUser("u"), WithBackoff(time.Millisecond, 10*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if tc.reconnect {
			testutil.WaitFor(t, 5*time.Second, tc.bye.Reason.String()+": a second connection", func() bool { return conns.Load() >= 2 })
			if err := c.Err(); err != nil {
				t.Errorf("%v: the client closed (%v) instead of reconnecting", tc.bye, err)
			}
		} else {
			testutil.WaitFor(t, 5*time.Second, tc.bye.Reason.String()+": the client to close", func() bool { return c.Err() != nil })
		}
		c.Close()
	}
}

// TestReconnectDecision: fatal and atOnce read the reasons table.
func TestReconnectDecision(t *testing.T) {
	for _, tc := range []struct {
		g             *GoodbyeError
		fatal, atOnce bool
	}{
		{&GoodbyeError{Reason: imqpb.Reason_REASON_KICKED, Reconnect: true}, true, false},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_PROTOCOL_ERROR}, true, false},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_SLOW_CONSUMER}, false, false},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_SHUTDOWN}, false, true},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_AUTH_FAILED}, true, false},
		{&GoodbyeError{Reason: imqpb.Reason_REASON_AUTH_FAILED, Reconnect: true}, false, false},
		{&GoodbyeError{Reason: imqpb.Reason(999), Reconnect: true}, false, false}, // a newer server's reason: its flag
	} {
		err := errors.Join(ErrConnectionLost, tc.g)
		if got := fatal(err); got != tc.fatal {
			t.Errorf("fatal(%v) = %v, want %v", tc.g, got, tc.fatal)
		}
		if got := atOnce(err); got != tc.atOnce {
			t.Errorf("atOnce(%v) = %v, want %v", tc.g, got, tc.atOnce)
		}
	}
	if atOnce(ErrConnectionLost) {
		t.Error("atOnce of a plain lost connection")
	}
}
