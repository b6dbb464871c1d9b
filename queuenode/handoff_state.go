package queuenode

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// The node's part of live hand-off (docs/handoff.md): which buckets it is
// handing off (outgoing) or has adopted, and the per-gateway holds of an
// adopted bucket's events. handoff_out.go moves a bucket away,
// handoff_in.go takes one in.
//
// Buckets are named by (bits, bucket) pairs, so that a hand-off begun
// under one table survives a split: a queue is in entry k when
// bucket.Of(queue, k.bits) == k.b, whatever the current table's bits.

// fenceWait bounds how long a link's reader waits for the table a request
// was routed by, when it is newer than the node's. The other hand-off
// bounds are the operator's: Config.HandoffHoldBytes and the like.
const fenceWait = time.Second

// maxHandoffFrame bounds the queue snapshots of one HandoffQueues frame
// (one larger queue travels alone, up to the link's frame limit).
const maxHandoffFrame = 1 << 20

// maxEarlyConfirms bounds the BucketAdopted kept for hand-offs not ended yet.
const maxEarlyConfirms = 4096

// bkey is a bucket: number b in a table of 2^bits buckets.
type bkey struct{ bits, b int }

func (k bkey) has(queue string) bool { return bucket.Of(queue, k.bits) == k.b }

// tableCovers reports whether table t gives every queue of k to node id.
func tableCovers(t *bucket.Table, k bkey, id string) bool {
	if t.Buckets() == 0 {
		return false
	}
	tb := t.Bits()
	if tb <= k.bits {
		return t.Owner(k.b>>(k.bits-tb)).ID == id
	}
	shift := tb - k.bits
	for i := range 1 << shift {
		if t.Owner(k.b<<shift+i).ID != id {
			return false
		}
	}
	return true
}

// outMode is what an outgoing bucket does with its requests.
type outMode int

const (
	outFrozen     outMode = iota // held, in arrival order
	outForwarding                // handed off: answered MOVED, leaves forwarded to the new owner, in order
	outLocal                     // the hand-off failed: run here, in order
)

// heldReq is one request of an outgoing bucket, with what it needs to run
// here should the hand-off fail (its call-out route and result, if any).
type heldReq struct {
	l    *link
	req  *imqpb.NodeRequest
	res  *calloutResult // nil: its call-outs (if any) have not run
	size int
}

// outgoing is one bucket this node hands off. Guarded by handoffs.mu,
// except the fields set before it is published.
type outgoing struct {
	key     bkey
	to      bucket.Node
	version uint64
	mode    outMode
	held    []heldReq
	bytes   int
	wake    chan struct{} // cap 1: held grew or mode changed
	peer    *peerLink     // forwarding: the link to the new owner, for leaves
	retire  *time.Timer   // forwarding: set once the table gave the bucket away
}

func (o *outgoing) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// handoffs is a node's hand-off state.
type handoffs struct {
	mu      sync.Mutex
	out     map[bkey]*outgoing // guarded by mu
	adopted map[bkey]string    // guarded by mu: by the node handed from
	retryAt map[bkey]time.Time // guarded by mu: failed hand-offs wait
	holds   map[holdKey]*hold  // guarded by mu
	// confirmed are BucketAdopted that arrived before their bucket's
	// HandoffEnd (the gateway may see the mark before the queues are
	// streamed): setHolds skips them. Guarded by mu; bounded by
	// maxEarlyConfirms, each kept Config.AdoptHoldTime.
	confirmed map[holdKey]time.Time
	staged    int64                  // guarded by mu: bytes of snapshots being received
	peers     map[string]int         // guarded by mu: open node links from each node, by id
	view      atomic.Pointer[hoView] // what checkOwnerLocked reads without mu
	holding   atomic.Int32           // len(holds): deliveries skip mu when 0
	kick      chan struct{}          // cap 1: look for moves to start
}

// hoView is an immutable summary of the entries for the request path.
type hoView struct {
	out     []bkey // outgoing, in any mode
	local   []bkey // outgoing in mode local
	adopted []bkey
}

func (v *hoView) outgoing(queue string) (out, local bool) {
	for _, k := range v.out {
		if k.has(queue) {
			out = true
			break
		}
	}
	for _, k := range v.local {
		if k.has(queue) {
			return out, true
		}
	}
	return out, false
}

func (v *hoView) isAdopted(queue string) bool {
	for _, k := range v.adopted {
		if k.has(queue) {
			return true
		}
	}
	return false
}

func newHandoffs() *handoffs {
	h := &handoffs{out: make(map[bkey]*outgoing), adopted: make(map[bkey]string), retryAt: make(map[bkey]time.Time),
		holds: make(map[holdKey]*hold), confirmed: make(map[holdKey]time.Time), peers: make(map[string]int), kick: make(chan struct{}, 1)}
	h.view.Store(&hoView{})
	return h
}

// publishLocked rebuilds the view after a change. The caller holds mu.
func (h *handoffs) publishLocked() {
	v := &hoView{}
	for k, o := range h.out {
		v.out = append(v.out, k)
		if o.mode == outLocal {
			v.local = append(v.local, k)
		}
	}
	for k := range h.adopted {
		v.adopted = append(v.adopted, k)
	}
	h.view.Store(v)
}

// outForLocked returns the outgoing entry of queue's bucket. The caller holds mu.
func (h *handoffs) outForLocked(queue string) *outgoing {
	for k, o := range h.out {
		if k.has(queue) {
			return o
		}
	}
	return nil
}

func (h *handoffs) kickMoves() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// handingOffError is what checkOwnerLocked answers for a queue of a bucket
// this node is handing off: finish then holds the request, or answers it
// MOVED once the bucket is handed off (divert), instead of answering it
// with this error.
type handingOffError struct{ queue string }

func (e *handingOffError) Error() string { return "queue " + e.queue + " is being handed off" }

// opQueue returns the queue any request names.
func opQueue(req *imqpb.NodeRequest) string {
	switch x := req.GetOp().(type) {
	case *imqpb.NodeRequest_GetState:
		return x.GetState.GetQueue()
	case *imqpb.NodeRequest_History:
		return x.History.GetQueue()
	case *imqpb.NodeRequest_QueueInfo:
		return x.QueueInfo.GetQueue()
	}
	return requestQueue(req)
}

// intercept takes req before it runs when its queue's bucket is being
// handed off (held; once handed off, answered MOVED or, a leave without a
// reply, forwarded) or was (its held requests still run here): so
// requests keep their order across the freeze. It holds a gateway's
// request for a bucket this node adopted while the gateway has not
// confirmed it (holdRequest). It reports whether it took req.
func (s *Server) intercept(l *link, req *imqpb.NodeRequest, res *calloutResult) bool {
	return s.interceptOut(l, req, res) || s.holdRequest(l, req, res)
}

// interceptOut is intercept for the buckets this node hands off.
func (s *Server) interceptOut(l *link, req *imqpb.NodeRequest, res *calloutResult) bool {
	v := s.ho.view.Load()
	if len(v.out) == 0 {
		return false
	}
	q := opQueue(req)
	if out, _ := v.outgoing(q); !out {
		return false
	}
	return s.divert(l, req, res)
}

// divert appends req to its bucket's outgoing requests; false when the
// bucket is no longer outgoing (the caller runs it).
func (s *Server) divert(l *link, req *imqpb.NodeRequest, res *calloutResult) bool {
	size := chainedBytes(req)
	s.ho.mu.Lock()
	o := s.ho.outForLocked(opQueue(req))
	if o == nil {
		s.ho.mu.Unlock()
		return false
	}
	_, leave := req.GetOp().(*imqpb.NodeRequest_Leave)
	if !leave && o.bytes+size > s.cfg.HandoffHoldBytes {
		s.ho.mu.Unlock()
		s.m.heldRefused.Inc()
		s.finish(l, req, opName(req), imqerr.New(imqpb.Code_UNAVAILABLE,
			"queue node %s holds %d bytes of requests for a bucket it is handing off, its limit; retry shortly", s.cfg.NodeID, o.bytes))
		return true
	}
	o.held = append(o.held, heldReq{l: l, req: req, res: res, size: size})
	o.bytes += size
	s.m.heldRequests.Add(1)
	s.m.heldBytes.Add(float64(size))
	s.ho.mu.Unlock()
	o.signal()
	return true
}

// takeHeld takes the first request of o; ok false when there is none.
func (s *Server) takeHeld(o *outgoing) (h heldReq, ok bool) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	if len(o.held) == 0 {
		return h, false
	}
	h = o.held[0]
	o.held[0] = heldReq{}
	o.held = o.held[1:]
	o.bytes -= h.size
	s.m.heldRequests.Add(-1)
	s.m.heldBytes.Add(-float64(h.size))
	return h, true
}

// handoffOwnerLocked is checkOwnerLocked's hand-off part: handled says the
// entries decided (err nil: serve).
func (s *Server) handoffOwnerLocked(queue string) (handled bool, err error) {
	v := s.ho.view.Load()
	if len(v.out) > 0 {
		if out, local := v.outgoing(queue); out && !local {
			return true, &handingOffError{queue: queue}
		}
	}
	if len(v.adopted) > 0 && v.isAdopted(queue) {
		return true, nil
	}
	return false, nil
}

// counts returns the buckets moving out (outgoing) and in (adopted, or
// being received) for /varz.
func (h *handoffs) counts() (out, in int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	in = len(h.adopted)
	if h.staged > 0 {
		in++
	}
	return len(h.out), in
}
