package gateway

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/reasons"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

var errFrameTooLarge = errors.New("frame too large")

var readBufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// closeGrace is how long a connection waits for the client's close frame
// after sending its goodbye.
const closeGrace = 2 * time.Second

// outFrame is one queued WebSocket frame.
type outFrame struct {
	pm   *websocket.PreparedMessage // a fan-out frame shared by many connections, or
	msg  *imqpb.ServerMessage       // a message for this connection, encoded by the writer, or
	data []byte                     // a control frame or goodbye, already encoded
	kind int                        // websocket message type of data
	size int                        // bytes, for the queue's bound (binary size for msg)
}

// conn is one client connection.
type conn struct {
	s       *Server
	ws      *websocket.Conn
	bc      *bufConn
	cc      *countedConn // the listener's connection: its pending slot and source (nil in no test)
	id      uint64
	session string
	json    bool

	// Owned by the reader goroutine.
	user  string
	acked bool // a connect was answered

	inflight atomic.Int32

	subMu sync.Mutex
	subs  map[string]*queueOps // Guarded by subMu: queues joined or with a join or leave in flight.
	opSeq uint64               // Guarded by subMu: numbers joins and leaves.
	dead  bool                 // Guarded by subMu: the reader ended.
	// Guarded by subMu: the lanes (lane.go) of queues with operations in
	// flight or held, and one idle lane kept for reuse.
	lanes     map[string]*lane
	spareLane *lane

	bye atomic.Bool // a goodbye is queued: read nothing more

	mu         sync.Mutex
	queue      []outFrame    // Guarded by mu: frames waiting for the writer.
	spare      []outFrame    // Guarded by mu: the last batch's slice, for reuse.
	queued     int           // Guarded by mu: bytes in queue.
	writing    bool          // Guarded by mu: a writer goroutine is running.
	closing    bool          // Guarded by mu: a goodbye is queued or the socket failed.
	reason     string        // Guarded by mu: why the connection is closing, for metrics.
	nextPing   time.Time     // Guarded by mu: when pingLoop pings next.
	pongQueued bool          // Guarded by mu.
	flushed    chan struct{} // closed when the last writer has finished
	flushOnce  sync.Once
}

func newConn(s *Server, ws *websocket.Conn, json bool, devUser string) *conn {
	id := s.connSeq.Add(1)
	c := &conn{
		s:       s,
		ws:      ws,
		bc:      ws.NetConn().(*bufConn),
		id:      id,
		session: s.sessionPrefix + strconv.FormatUint(id, 10),
		json:    json,
		user:    devUser,
		subs:    make(map[string]*queueOps),
		flushed: make(chan struct{}),
	}
	return c
}

// serve runs the reader until the connection ends, then cleans up. It runs
// on a goroutine of its own, not net/http's: returning from the handler lets
// the HTTP server's per-connection buffers, request and stack go, which is
// most of an idle connection's memory.
func (c *conn) serve() {
	cfg := &c.s.cfg
	// The frame limit is enforced below rather than with SetReadLimit, which
	// would close the connection before the client could hear why.
	maxFrame := int64(cfg.MaxFrameBytes)
	c.ws.SetPingHandler(func(data string) error {
		c.extendRead()
		c.sendPong([]byte(data))
		return nil
	})
	c.ws.SetPongHandler(func(string) error { c.extendRead(); return nil })
	if c.user == "" {
		c.ws.SetReadDeadline(time.Now().Add(cfg.AuthTimeout))
	} else {
		c.extendRead()
	}
	// The first ping comes after a random half to whole interval, so that
	// connections made together (a reconnect storm, a load test) do not all
	// ping in the same instant, then or ever after.
	c.mu.Lock()
	c.nextPing = time.Now().Add(cfg.PingInterval/2 + rand.N(cfg.PingInterval/2+1))
	c.mu.Unlock()

	for {
		mt, r, err := c.ws.NextReader()
		var buf *bytes.Buffer
		if err == nil {
			// The buffer is taken only once a frame has arrived: an idle
			// connection holds none.
			buf = readBufPool.Get().(*bytes.Buffer)
			buf.Reset()
			_, err = buf.ReadFrom(io.LimitReader(r, maxFrame+1))
			if err == nil && int64(buf.Len()) > maxFrame {
				err = errFrameTooLarge
			}
		}
		if err == nil {
			c.extendRead()
			c.handleFrame(mt, buf.Bytes()) // decoding copies what it keeps
		}
		if buf != nil && buf.Cap() <= 64<<10 {
			readBufPool.Put(buf)
		}
		if err != nil {
			c.readFailed(err)
			break
		}
	}
	c.finish()
}

func (c *conn) extendRead() {
	if c.user != "" && !c.bye.Load() { // after a goodbye, the close grace stands
		c.ws.SetReadDeadline(time.Now().Add(c.s.cfg.ClientTimeout))
	}
}

// pingIfDue queues a ping when one is due; the server's pingLoop calls it.
func (c *conn) pingIfDue(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing || c.nextPing.IsZero() || now.Before(c.nextPing) {
		return
	}
	c.nextPing = now.Add(c.s.cfg.PingInterval)
	c.queue = append(c.queue, outFrame{kind: websocket.PingMessage})
	c.startWriterLocked()
}

// readFailed says goodbye when the read ended for a reason the client should
// hear about.
func (c *conn) readFailed(err error) {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		if c.user == "" {
			c.goAway(imqpb.Reason_REASON_AUTH_TIMEOUT, "no connect within "+c.s.cfg.AuthTimeout.String(), false)
		} else {
			c.goAway(imqpb.Reason_REASON_PING_TIMEOUT, "nothing received for "+c.s.cfg.ClientTimeout.String(), true)
		}
	case errors.Is(err, errFrameTooLarge):
		c.goAway(imqpb.Reason_REASON_PROTOCOL_ERROR, "frame larger than "+strconv.Itoa(c.s.cfg.MaxFrameBytes)+" bytes", false)
	default:
		c.setReason("client_closed")
		c.s.log.Debug("read ended", "session", c.session, "err", err)
	}
}

// finish runs after the reader ends: it drops the subscriptions, lets a
// queued goodbye reach the client, and closes the socket.
func (c *conn) finish() {
	c.leaveAll()

	c.mu.Lock()
	goodbye := c.closing && c.reason != "write_failed" // queued; let it go out
	if !goodbye {
		c.closing = true
		c.queue = nil
	}
	reason := c.reason
	c.mu.Unlock()
	if goodbye {
		select {
		case <-c.flushed:
		case <-time.After(c.s.cfg.WriteTimeout):
		}
	}
	c.ws.Close()
	if reason == "" {
		reason = "client_closed"
	}
	c.s.m.disconnects.WithLabelValues(reason).Inc()
}

func (c *conn) setReason(r string) {
	c.mu.Lock()
	if c.reason == "" {
		c.reason = r
	}
	c.mu.Unlock()
}

// handleFrame decodes and executes one client frame.
func (c *conn) handleFrame(mt int, data []byte) {
	if c.bye.Load() {
		return // said goodbye: the client gets nothing more
	}
	var msg imqpb.ClientMessage
	var err error
	switch {
	case c.json && mt != websocket.TextMessage:
		err = errors.New("imq.v1.json takes text frames")
	case !c.json && mt != websocket.BinaryMessage:
		err = errors.New("imq.v1 takes binary frames")
	case c.json:
		err = wire.UnmarshalJSON(data, &msg)
	default:
		err = proto.Unmarshal(data, &msg)
	}
	if err != nil {
		c.s.m.requests.WithLabelValues("malformed").Inc()
		c.replyErr(0, imqerr.New(imqpb.Code_BAD_REQUEST, "malformed frame: %v", err))
		return
	}
	id := msg.GetId()
	switch m := msg.GetMsg().(type) {
	case *imqpb.ClientMessage_Connect:
		c.s.m.requests.WithLabelValues("connect").Inc()
		c.connect(id, m.Connect)
		return
	case *imqpb.ClientMessage_Ping:
		c.s.m.requests.WithLabelValues("ping").Inc()
		c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Pong{Pong: &imqpb.Pong{Id: id, TimeMs: time.Now().UnixMilli()}}})
		return
	case nil:
		c.s.m.requests.WithLabelValues("unknown").Inc()
		c.replyErr(id, imqerr.New(imqpb.Code_UNKNOWN_MESSAGE, "the frame carries no message this server knows"))
		return
	}
	if c.user == "" {
		c.s.m.requests.WithLabelValues("unauthenticated").Inc()
		c.replyErr(id, imqerr.New(imqpb.Code_NOT_CONNECTED, "send connect first"))
		return
	}
	switch m := msg.GetMsg().(type) {
	case *imqpb.ClientMessage_Join:
		c.s.m.requests.WithLabelValues("join").Inc()
		c.join(id, m.Join)
	case *imqpb.ClientMessage_Leave:
		c.s.m.requests.WithLabelValues("leave").Inc()
		c.leave(id, m.Leave)
	case *imqpb.ClientMessage_Publish:
		c.s.m.requests.WithLabelValues("publish").Inc()
		c.publish(id, m.Publish)
	case *imqpb.ClientMessage_SetState:
		c.s.m.requests.WithLabelValues("set_state").Inc()
		c.setState(id, m.SetState)
	}
}

func (c *conn) connect(id uint64, m *imqpb.Connect) {
	switch {
	case c.acked:
		c.replyErr(id, imqerr.New(imqpb.Code_ALREADY_CONNECTED, "this connection is already connected as %q", c.user))
		return
	case c.user != "" && m.GetToken() != "":
		c.replyErr(id, imqerr.New(imqpb.Code_ALREADY_CONNECTED, "this connection authenticated as %q with ?user=; send connect without a token", c.user))
		return
	case c.user == "":
		// With an auth call-out this waits for the backend, bounded by
		// AuthCalloutTimeout: the connection has nothing else to do before
		// it is authenticated.
		//
		// A check starts while the source has some of its failed-auth
		// budget left and costs one only if the token is refused: valid
		// users behind one address are not refused for checks that are
		// merely slow. Checks started together may overshoot the budget,
		// by at most the source's pending connections (MaxPendingPerIP).
		src := c.cc.source()
		if ok, wait := c.s.authLimit.allowed(src, time.Now()); !ok {
			c.s.noteRefused(refusedAuthFailures, src)
			e := imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "%s", refusalMessage(refusedAuthFailures, wait))
			c.replyErr(id, e)
			c.goAway(imqpb.Reason_REASON_AUTH_FAILED, e.Message, true)
			return
		}
		user, err := c.s.authenticate(m.GetToken())
		if err != nil {
			if imqerr.From(err).Code == imqpb.Code_UNAUTHORIZED {
				c.s.authLimit.charge(src, time.Now())
				c.s.warnLimited("auth_failed", "connect refused", "source", src.String(), "error", imqerr.From(err).Message)
			}
			c.replyErr(id, err)
			// reconnect when the backend failed rather than refused
			c.goAway(imqpb.Reason_REASON_AUTH_FAILED, imqerr.From(err).Message, imqerr.From(err).Retryable())
			return
		}
		if !c.s.conns.tryAuth(c.s.maxConns) {
			c.s.noteRefused(refusedFull, src)
			msg := refusalMessage(refusedFull, 0)
			c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "%s", msg))
			c.goAway(imqpb.Reason_REASON_SERVER_FULL, msg, true)
			return
		}
		c.cc.unpend()
		c.user = user
		c.s.conns.addUser(c, user)
	}
	c.acked = true
	c.extendRead()
	cfg := &c.s.cfg
	c.reply(&imqpb.Reply{Id: id, Result: &imqpb.Reply_Connected{Connected: &imqpb.Connected{
		User: c.user, Session: c.session,
		PingIntervalMs: uint32(cfg.PingInterval.Milliseconds()), TimeoutMs: uint32(cfg.ClientTimeout.Milliseconds()),
	}}})
}

func (c *conn) publish(id uint64, m *imqpb.Publish) {
	c.update(id, m.GetQueue(), "payload", len(m.GetPayload()), &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Publish{Publish: m}},
		func(rep *imqpb.Reply, r *imqpb.NodeReply) {
			rep.Result = &imqpb.Reply_Published{Published: r.GetPublished()}
		})
}

func (c *conn) setState(id uint64, m *imqpb.SetState) {
	c.update(id, m.GetQueue(), "state value", len(m.GetValue()), &imqpb.NodeRequest{Op: &imqpb.NodeRequest_SetState{SetState: m}},
		func(rep *imqpb.Reply, r *imqpb.NodeReply) {
			rep.Result = &imqpb.Reply_StateSet{StateSet: r.GetStateSet()}
		})
}

// update forwards a publish or state change after the checks the gateway
// can make itself; result copies the node's answer into the reply.
func (c *conn) update(id uint64, queue, what string, size int, req *imqpb.NodeRequest, result func(*imqpb.Reply, *imqpb.NodeReply)) {
	if err := wire.ValidateQueueName(queue); err != nil {
		c.replyErr(id, err)
		return
	}
	if size > c.s.cfg.MaxPayload {
		c.replyErr(id, imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "%s is %d bytes; the limit is %d", what, size, c.s.cfg.MaxPayload))
		return
	}
	if !c.reserve(id) {
		return
	}
	c.forward(queue, req, nil, 0, nil, func(r *imqpb.NodeReply, _ *nodeLink) {
		c.replyNode(id, r, func(rep *imqpb.Reply) { result(rep, r) })
	})
}

// reserve takes one of the connection's MaxInflight request slots, or
// answers request id LIMIT_EXCEEDED and reports false. A request reserves
// before it changes anything (a join or leave before it takes its place in
// the queue's sequence), so a refused one has no effect at all: it cannot
// supersede an earlier join or leave that is still on its way.
func (c *conn) reserve(id uint64) bool {
	if c.inflight.Add(1) > int32(c.s.cfg.MaxInflight) {
		c.inflight.Add(-1)
		c.replyErr(id, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "more than %d requests in flight; wait for replies", c.s.cfg.MaxInflight))
		return false
	}
	return true
}

// unreserve gives back a slot taken by reserve for a request that was
// answered before it was forwarded.
func (c *conn) unreserve() { c.inflight.Add(-1) }

// forward sends req for queue to the node owning it, and again to the new
// owner when the node answers MOVED (see routed), in the order of the
// connection's operations on the queue (lane.go); op and seq name a join or
// leave in the connection's per-queue sequence (nil for other requests).
// via, if not nil, is the link to send to instead of the table's (a leave
// goes to the node its subscription was made through). The caller has
// reserved the request's slot (reserve); forward gives it back. onReply runs
// exactly once, with the final reply and the link it came on (nil when the
// gateway answered itself): on a link's reader with the node's reply (in
// link order), on a link's own goroutine for a timeout or a lost link, on a
// retry's goroutine, or here when the request could not be sent.
func (c *conn) forward(queue string, req *imqpb.NodeRequest, op *queueOps, seq uint64, via *nodeLink, onReply func(*imqpb.NodeReply, *nodeLink)) {
	req.User, req.Session = c.user, c.session
	rt := &routed{
		s: c.s, c: c, queue: queue, req: req, op: op, seq: seq, via: via,
		deadline: time.Now().Add(c.s.cfg.RequestTimeout),
		done: func(r *imqpb.NodeReply, l *nodeLink) {
			c.inflight.Add(-1)
			onReply(r, l)
		},
	}
	c.sendInLane(rt)
}

// leaveNode tells a node that this session left queue, without a reply:
// node l when it is known (the one the subscription or the join went
// through), else the queue's node by the table. A leave for a stopped link
// goes nowhere: its node is gone, or restarted without the queue.
func (c *conn) leaveNode(queue string, l *nodeLink) {
	v := c.s.table().Version()
	if l == nil {
		var err error
		if l, v, err = c.s.linkFor(queue); err != nil {
			return // no table: no node has it
		}
	}
	l.request(&imqpb.NodeRequest{
		User: c.user, Session: c.session, TableVersion: v, Op: &imqpb.NodeRequest_Leave{Leave: &imqpb.Leave{Queue: queue}},
	}, time.Time{}, nil)
}

// replyNode answers the client from a node reply; set fills in the result.
func (c *conn) replyNode(id uint64, r *imqpb.NodeReply, set func(*imqpb.Reply)) {
	if r.GetCode() != imqpb.Code_OK {
		c.replyErr(id, &imqerr.Error{Code: r.GetCode(), Message: r.GetMessage()})
		return
	}
	rep := &imqpb.Reply{Id: id}
	if set != nil {
		set(rep)
	}
	c.reply(rep)
}

func (c *conn) replyErr(id uint64, err error) {
	e := imqerr.From(err)
	c.s.m.errors.WithLabelValues(e.Code.String()).Inc()
	c.reply(&imqpb.Reply{Id: id, Code: e.Code, Message: e.Message, Retryable: e.Retryable()})
}

func (c *conn) reply(r *imqpb.Reply) {
	c.sendMsg(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: r}})
}

// encode returns m as this connection's frame type.
func (c *conn) encode(m *imqpb.ServerMessage) ([]byte, int, error) {
	if c.json {
		b, err := wire.MarshalJSON(m)
		return b, websocket.TextMessage, err
	}
	b, err := proto.Marshal(m)
	return b, websocket.BinaryMessage, err
}

// sendMsg queues m for this connection alone. The writer encodes it, so a
// large Joined (above all in JSON) never holds up the link reader that fans
// events out to every other connection.
func (c *conn) sendMsg(m *imqpb.ServerMessage) {
	c.send(outFrame{msg: m, size: proto.Size(m)})
}

// send queues f for the writer. It never blocks: a client whose queue
// overflows is a slow consumer, and its queue is dropped for a goodbye.
func (c *conn) send(f outFrame) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	// Fan-out frames must fit the byte bound. A reply is taken while the
	// queue is within it, so one Joined with a large replay (bounded by the
	// node) is never mistaken for a slow consumer; the queue stays bounded by
	// SendQueueBytes plus one reply.
	over := len(c.queue) >= c.s.cfg.SendQueueFrames ||
		f.pm != nil && c.queued+f.size > c.s.cfg.SendQueueBytes ||
		f.pm == nil && c.queued > c.s.cfg.SendQueueBytes
	if len(c.queue) > 0 && over {
		dropped := len(c.queue)
		clear(c.queue)
		c.queue = c.queue[:0]
		c.queued = 0
		c.goAwayLocked(imqpb.Reason_REASON_SLOW_CONSUMER, "send queue overflowed: read faster or join fewer queues", true)
		c.mu.Unlock()
		c.s.m.slowConsumers.Inc()
		c.s.m.sendDrops.Add(float64(dropped + 1))
		c.s.log.Debug("slow consumer disconnected", "session", c.session, "dropped_frames", dropped+1)
		return
	}
	c.queue = append(c.queue, f)
	c.queued += f.size
	c.startWriterLocked()
	c.mu.Unlock()
}

// sendPong queues a pong outside the queue's bounds, at most one at a time:
// a client that pings without reading gets one answer, not a growing queue.
func (c *conn) sendPong(data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closing && !c.pongQueued {
		c.pongQueued = true
		c.queue = append(c.queue, outFrame{data: data, kind: websocket.PongMessage})
		c.startWriterLocked()
	}
}

func (c *conn) startWriterLocked() {
	if !c.writing {
		c.writing = true
		go c.writeLoop() // ends when the queue is empty or the socket fails
	}
}

// goAway queues a goodbye and a close frame after what is already queued;
// the connection accepts nothing more. Whether the client should reconnect
// is the reason's (internal/reasons); reconnect decides only for a reason
// whose row leaves it to the sender (AUTH_FAILED).
func (c *conn) goAway(reason imqpb.Reason, msg string, reconnect bool) {
	c.mu.Lock()
	c.goAwayLocked(reason, msg, reconnect)
	c.mu.Unlock()
}

// kick closes the connection for a backend (admin RPC kick): goodbye reason
// KICKED, no reconnect, msg shown to the user. It reports whether this closed
// it (false: it was closing already).
func (c *conn) kick(msg string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.goAwayLocked(imqpb.Reason_REASON_KICKED, msg, false)
}

// goAwayLocked queues the goodbye unless one is queued already; it reports
// whether it queued this one.
func (c *conn) goAwayLocked(reason imqpb.Reason, msg string, reconnect bool) bool {
	if c.closing {
		return false
	}
	c.closing = true
	c.bye.Store(true)
	info := reasons.Of(reason)
	if c.reason == "" {
		c.reason = info.Label
	}
	b, kind, err := c.encode(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Goodbye{Goodbye: &imqpb.Goodbye{
		Reason: reason, Message: msg, Reconnect: info.Again(reconnect),
	}}})
	if err == nil {
		c.queue = append(c.queue, outFrame{data: b, kind: kind})
	}
	c.queue = append(c.queue, outFrame{data: websocket.FormatCloseMessage(info.CloseCode, closeText(msg)), kind: websocket.CloseMessage})
	c.startWriterLocked()
	return true
}

// maxCloseText is the most text a close frame carries: a control frame's
// payload is at most 125 bytes, two of them the close code.
const maxCloseText = 123

// closeText cuts msg to fit a close frame, on a UTF-8 boundary. The goodbye
// before it carries the whole message.
func closeText(msg string) string {
	if len(msg) <= maxCloseText {
		return msg
	}
	n := maxCloseText
	for n > 0 && !utf8.RuneStart(msg[n]) {
		n--
	}
	return msg[:n]
}

// writeLoop writes batches of queued frames, each batch in one syscall, and
// ends when the queue is empty, after the close frame, or on a write error.
func (c *conn) writeLoop() {
	for {
		c.mu.Lock()
		batch := c.queue
		if len(batch) == 0 {
			c.writing = false
			c.mu.Unlock()
			return
		}
		c.queue, c.spare = c.spare, nil
		c.queued = 0
		c.pongQueued = false
		c.mu.Unlock()

		final, err := c.writeBatch(batch)
		clear(batch)
		if cap(batch) <= 64 {
			c.mu.Lock()
			c.spare = batch[:0]
			c.mu.Unlock()
		}
		if err != nil || final {
			if err != nil {
				c.mu.Lock()
				c.closing = true
				c.queue = nil
				if c.reason == "" {
					c.reason = "write_failed"
				}
				c.mu.Unlock()
				c.s.log.Debug("write failed", "session", c.session, "err", err)
				c.bc.Conn.Close() // ends the reader, which cleans up
				c.flushOnce.Do(func() { close(c.flushed) })
			}
			return // writing stays true: no writer starts again
		}
	}
}

func (c *conn) writeBatch(batch []outFrame) (final bool, err error) {
	wt := c.s.cfg.WriteTimeout
	c.bc.begin()
	var n int
	for _, f := range batch {
		switch {
		case f.pm != nil:
			err = c.ws.WritePreparedMessage(f.pm)
			n++
		case f.kind == websocket.CloseMessage:
			err = c.ws.WriteControl(websocket.CloseMessage, f.data, time.Now().Add(wt))
			final = true
		case f.kind == websocket.PingMessage || f.kind == websocket.PongMessage:
			err = c.ws.WriteControl(f.kind, f.data, time.Now().Add(wt))
		case f.msg != nil:
			b, kind, encErr := c.encode(f.msg)
			if encErr != nil {
				c.s.log.Error("encode reply", "session", c.session, "err", encErr)
				continue
			}
			err = c.ws.WriteMessage(kind, b)
		default:
			err = c.ws.WriteMessage(f.kind, f.data)
		}
		if err != nil || final {
			break
		}
	}
	if ferr := c.bc.flush(wt); err == nil {
		err = ferr
	}
	c.s.m.deliveries.Add(float64(n))
	if final && err == nil {
		c.bc.CloseWrite()
		c.bc.Conn.SetReadDeadline(time.Now().Add(closeGrace))
		c.flushOnce.Do(func() { close(c.flushed) })
	}
	return final, err
}
