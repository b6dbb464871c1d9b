package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	subprotocol     = "imq.v1"
	subprotocolJSON = "imq.v1.json"

	// maxFrame bounds one server frame; a Joined with a large snapshot
	// or history is the biggest.
	maxFrame = 16 << 20
	// outQueue is how many frames may wait for the writer.
	outQueue = 64
	// closeWait bounds writing the close frame on Close.
	closeWait = time.Second
	// maxPooledFrame keeps one huge publish from pinning its buffer.
	maxPooledFrame = 64 << 10
	// maxKeptReadBuffer is the largest read buffer kept between frames.
	maxKeptReadBuffer = 1 << 20
)

// framePool recycles encoded frames between senders and the writer, so a
// request costs no buffer allocation.
var framePool = sync.Pool{New: func() any { return new([]byte) }}

func putFrame(f *[]byte) {
	if cap(*f) <= maxPooledFrame {
		*f = (*f)[:0]
		framePool.Put(f)
	}
}

// conn is one WebSocket connection. It runs two goroutines, started by
// start: readLoop, the only reader, which also delivers to subscriptions;
// and writeLoop, which owns every data frame written and sends the client's
// pings. Both end when the connection closes (close, from anywhere), and
// wait returns after both have.
type conn struct {
	c       *Client
	ws      *websocket.Conn
	json    bool
	out     chan *[]byte  // encoded frames for writeLoop
	done    chan struct{} // closed by close
	once    sync.Once
	err     error // why the connection closed; written before done is closed
	timeout time.Duration
	wg      sync.WaitGroup

	mu      sync.Mutex
	pending map[uint64]call // Guarded by mu.

	detached bool // Guarded by Client.mu: closed, never to be current again.
}

// call is a request waiting for its answer.
type call struct {
	// ch receives the answer; nil for a rejoin, whose answer only the
	// reader handles.
	ch chan *imqpb.ServerMessage
	// sub is set for a join: the reader applies the Joined to it before it
	// reads the next frame, since the queue's updates follow right after.
	sub *Subscription
	// reason is why a rejoin happens, for the gap updates it may bring.
	reason imqpb.Reason
}

func newConn(c *Client, ws *websocket.Conn) *conn {
	cn := &conn{
		c:       c,
		ws:      ws,
		json:    c.opts.json,
		out:     make(chan *[]byte, outQueue),
		done:    make(chan struct{}),
		timeout: c.opts.pingTimeout,
		pending: map[uint64]call{},
	}
	ws.SetReadLimit(maxFrame)
	// Replacing the default handler to note liveness means answering the
	// pong here too; WriteControl may run beside writeLoop's writes.
	ws.SetPingHandler(func(data string) error {
		_ = ws.SetReadDeadline(time.Now().Add(cn.timeout))
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(cn.timeout))
		if errors.Is(err, websocket.ErrCloseSent) || isTimeout(err) {
			return nil // as the default handler: the read loop will see why
		}
		return err
	})
	return cn
}

func (cn *conn) start() {
	cn.wg.Add(2)
	go cn.readLoop()
	go cn.writeLoop()
}

func (cn *conn) wait() { cn.wg.Wait() }

// close ends the connection for cause err; the first cause is kept. Closing
// the socket unblocks readLoop; done unblocks writeLoop, the senders and
// waiters, and a reader waiting for the application.
func (cn *conn) close(err error) {
	cn.once.Do(func() {
		cn.err = err
		cn.c.detach(cn) // before done: a sender that sees done can wait for the next connection
		close(cn.done)
		if errors.Is(err, ErrClosed) {
			msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
			_ = cn.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(closeWait))
		}
		_ = cn.ws.Close()
	})
}

// lost returns the error for a request cut off by the end of the connection.
func (cn *conn) lost() error {
	if errors.Is(cn.err, ErrClosed) {
		return ErrClosed
	}
	return fmt.Errorf("%w: %w", ErrConnectionLost, cn.err)
}

func (cn *conn) encode(m *imqpb.ClientMessage) (*[]byte, error) {
	f := framePool.Get().(*[]byte)
	var err error
	if cn.json {
		*f, err = wire.MarshalJSON(m)
	} else {
		*f, err = proto.MarshalOptions{}.MarshalAppend((*f)[:0], m)
	}
	if err != nil {
		putFrame(f)
		return nil, &Error{Code: imqpb.Code_BAD_REQUEST, Message: err.Error()}
	}
	return f, nil
}

// send queues m for writing. A call with a channel or a subscription is
// registered first, so its answer finds it. It returns errStale if the
// connection had closed already: nothing was sent.
func (cn *conn) send(ctx context.Context, m *imqpb.ClientMessage, cl call) error {
	select {
	case <-cn.done:
		return errStale
	default:
	}
	f, err := cn.encode(m)
	if err != nil {
		return err
	}
	if cl.ch != nil || cl.sub != nil {
		cn.mu.Lock()
		cn.pending[m.GetId()] = cl
		cn.mu.Unlock()
	}
	select {
	case cn.out <- f:
		return nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-cn.done:
		err = cn.lost()
	}
	cn.take(m.GetId())
	putFrame(f)
	return err
}

// roundTrip sends m and waits for its answer, which ends the wait even if
// ctx ends or the connection closes at the same time.
func (cn *conn) roundTrip(ctx context.Context, m *imqpb.ClientMessage, cl call) (*imqpb.ServerMessage, error) {
	if err := cn.send(ctx, m, cl); err != nil {
		return nil, err
	}
	select {
	case msg := <-cl.ch:
		return msg, nil
	case <-ctx.Done():
	case <-cn.done:
	}
	if _, waiting := cn.take(m.GetId()); !waiting {
		return <-cl.ch, nil // the reader took the call: its answer is on the way
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTimeout, err)
	}
	return nil, cn.lost()
}

func (cn *conn) take(id uint64) (call, bool) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	cl, ok := cn.pending[id]
	delete(cn.pending, id)
	return cl, ok
}

// writeLoop writes queued frames and pings every ping interval, so that the
// server's answer proves it alive. It ends when the connection closes, or
// closes it on a write error.
func (cn *conn) writeLoop() {
	defer cn.wg.Done()
	ping := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}}
	ticker := time.NewTicker(cn.c.opts.pingInterval)
	defer ticker.Stop()
	typ := websocket.BinaryMessage
	if cn.json {
		typ = websocket.TextMessage
	}
	for {
		var f *[]byte
		select {
		case f = <-cn.out:
		case <-ticker.C:
			// Unregistered: the pong finds no call and is dropped; any
			// frame at all resets the read deadline.
			ping.Id = cn.c.nextID.Add(1)
			var err error
			if f, err = cn.encode(ping); err != nil {
				cn.close(err)
				return
			}
		case <-cn.done:
			return
		}
		_ = cn.ws.SetWriteDeadline(time.Now().Add(cn.timeout))
		err := cn.ws.WriteMessage(typ, *f)
		putFrame(f)
		if err != nil {
			cn.close(fmt.Errorf("imq: write: %w", err))
			return
		}
	}
}

// readLoop reads and dispatches frames until the connection closes. A
// server that sends nothing (no frame, no ping) for the ping timeout is
// taken for dead.
func (cn *conn) readLoop() {
	defer cn.wg.Done()
	want := websocket.BinaryMessage
	if cn.json {
		want = websocket.TextMessage
	}
	var buf bytes.Buffer
	for {
		_ = cn.ws.SetReadDeadline(time.Now().Add(cn.timeout))
		typ, r, err := cn.ws.NextReader()
		if err == nil {
			buf.Reset()
			_, err = buf.ReadFrom(r)
		}
		if err != nil {
			if isTimeout(err) {
				err = fmt.Errorf("imq: server silent for %v: %w", cn.timeout, err)
			}
			cn.close(err)
			return
		}
		if typ != want {
			cn.c.log.Debug("imq client: ignored frame of the wrong type", "type", typ)
			continue
		}
		msg := new(imqpb.ServerMessage)
		if cn.json {
			err = wire.UnmarshalJSON(buf.Bytes(), msg)
		} else {
			err = proto.Unmarshal(buf.Bytes(), msg) // copies bytes fields: buf is reused
		}
		if buf.Cap() > maxKeptReadBuffer {
			buf = bytes.Buffer{}
		}
		if err != nil {
			// Skipping it could lose an event without a gap: reconnect,
			// and the rejoin's resume replays whatever it was.
			cn.c.log.Warn("imq client: undecodable frame; reconnecting", "err", err)
			cn.close(fmt.Errorf("undecodable frame: %w", err))
			return
		}
		cn.dispatch(msg)
	}
}

// dispatch handles one server message on the reader goroutine. Deliveries
// may wait for the application; they give up when the connection closes.
func (cn *conn) dispatch(msg *imqpb.ServerMessage) {
	c := cn.c
	switch m := msg.GetMsg().(type) {
	case *imqpb.ServerMessage_Event:
		if s := c.sub(m.Event.GetQueue()); s != nil {
			s.onEvent(m.Event, cn.done)
		}
	case *imqpb.ServerMessage_State:
		if s := c.sub(m.State.GetQueue()); s != nil {
			s.onState(m.State, cn.done)
		}
	case *imqpb.ServerMessage_Reply:
		cn.onReply(msg, m.Reply)
	case *imqpb.ServerMessage_Pong:
		if cl, ok := cn.take(m.Pong.GetId()); ok && cl.ch != nil {
			cl.ch <- msg
		}
	case *imqpb.ServerMessage_Unsubscribed:
		c.onUnsubscribed(cn, m.Unsubscribed)
	case *imqpb.ServerMessage_Goodbye:
		g := m.Goodbye
		cn.close(&GoodbyeError{Reason: g.GetReason(), Message: g.GetMessage(), Reconnect: g.GetReconnect()})
	default:
		c.log.Debug("imq client: ignored unknown server message")
	}
}

func (cn *conn) onReply(msg *imqpb.ServerMessage, r *imqpb.Reply) {
	if r.GetId() == 0 && r.GetCode() != imqpb.Code_OK {
		// Requests never use id 0: the server could not decode a frame.
		cn.c.log.Warn("imq client: server rejected a frame", "code", r.GetCode(), "message", r.GetMessage())
		return
	}
	cl, ok := cn.take(r.GetId())
	switch {
	case !ok:
		cn.c.log.Debug("imq client: reply to no waiting request", "id", r.GetId())
	case cl.sub != nil:
		cn.c.onJoinReply(cn, cl, msg)
	default:
		cl.ch <- msg
	}
}

func isTimeout(err error) bool {
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}
