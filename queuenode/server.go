package queuenode

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/imqerr"
	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/internal/sysx"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

const numShards = 256

// Server is a queue node: it holds queues and serves gateway links.
type Server struct {
	cfg    Config
	log    *slog.Logger
	m      *metrics
	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the goroutines Run starts (goLocked); Run and Shutdown wait for them
	// startMu orders every start of a tracked goroutine (wg.Add, and the
	// call-out workers' start) before Shutdown's wait for them: a start
	// either happens before Shutdown sets stopping, and the wait sees it, or
	// sees stopping and starts nothing. Without it a Run beside a Shutdown
	// could Add while the Wait runs, a data race.
	startMu  sync.Mutex
	stopping bool // Guarded by startMu: Shutdown has begun.

	// The internal listener (Config.InternalAddr); both nil without one.
	internalLn net.Listener
	internal   *http.Server

	shards     [numShards]shard
	queueCount atomic.Int64

	// The memory budget and queue creation limits: see budget.go.
	nodeBytes      atomic.Int64
	historyBytes   atomic.Int64   // the part of nodeBytes that retained events make up
	evictMu        sync.Mutex     // one evictOldest at a time
	evictRestUntil time.Time      // Guarded by evictMu: no eviction before it.
	creates        *createLimiter // nil: MaxQueueCreates is off

	seedWarn atomic.Int64 // Unix ns of the last warning of a skipped seed

	co *callouts // nil: no call-outs configured

	ho *handoffs // live bucket hand-off: handoff_*.go
	// bossClient makes the node's calls of the boss's API (bossapi.go).
	bossClient *http.Client

	epochMu   sync.Mutex
	lastEpoch uint64 // Guarded by epochMu.

	// Cluster mode (Config.Member set): cluster is the membership and the
	// table watcher, whose install hook is applyTable; set in New, before
	// any goroutine starts. Standalone, it stays nil and table holds
	// bucket.Empty() for good.
	table   atomic.Pointer[bucket.Table] // what requests are checked against
	cluster *cluster.Cluster

	gwMu         sync.Mutex
	liveGateways map[string]bool // Guarded by gwMu: gateway ids alive in the membership.

	mu         sync.RWMutex
	links      map[string]*link // by link key; guarded by mu
	linkSerial uint64           // guarded by mu
	closed     bool             // guarded by mu

	// gate bounds the incoming link handshakes in flight, in all and per
	// address (Config.MaxLinkHandshakes).
	gate *imqlink.Gate
	// handshakeLog rate-limits the warnings of failed or shed link
	// handshakes: a port scan or a peer with the wrong key does not flood
	// the log.
	handshakeLog imqlink.LogLimiter
}

type shard struct {
	mu     sync.Mutex
	queues map[string]*Queue // Guarded by mu.
}

// New validates cfg and binds the link listener; in cluster mode it also
// joins the membership (Run starts following the bucket table).
func New(cfg Config) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.LinkAddr)
	if err != nil {
		return nil, fmt.Errorf("queuenode: listen for links: %w", err)
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "node-" + ln.Addr().String()
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("node", cfg.NodeID), ln: ln, links: make(map[string]*link),
		gate: imqlink.NewGate(cfg.MaxLinkHandshakes, cfg.MaxLinkHandshakesPerAddr)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	for i := range s.shards {
		s.shards[i].queues = make(map[string]*Queue)
	}
	s.table.Store(bucket.Empty())
	s.ho = newHandoffs()
	s.bossClient = &http.Client{}
	if cfg.MaxQueueCreates > 0 {
		s.creates = newCreateLimiter(cfg.MaxQueueCreates, limiterShardUsers)
	}
	s.m = newMetrics(cfg.Registry, s)
	s.co = newCallouts(&s.cfg, s.m, s.log)
	if cfg.InternalAddr != "" {
		// Bound before joining: the membership metadata carries its address.
		if s.internalLn, err = net.Listen("tcp", cfg.InternalAddr); err != nil {
			ln.Close()
			return nil, fmt.Errorf("queuenode: listen on the internal address: %w", err)
		}
		mux := http.NewServeMux()
		s.HandleHTTP(mux)
		s.internal = obs.NewInternalServer(mux, s.log)
	}
	if cfg.Member != nil {
		if err := s.startCluster(); err != nil {
			ln.Close()
			if s.internalLn != nil {
				s.internalLn.Close()
			}
			return nil, err
		}
	}
	return s, nil
}

// InternalAddr returns the internal listen address (/metrics, /healthz,
// /varz, /v1/table), or "" without one.
func (s *Server) InternalAddr() string {
	if s.internalLn == nil {
		return ""
	}
	return s.internalLn.Addr().String()
}

// LinkAddr returns the address gateways connect to.
func (s *Server) LinkAddr() string { return s.ln.Addr().String() }

// GossipAddr returns the address this process gossips on in cluster mode,
// or "" standalone.
func (s *Server) GossipAddr() string {
	if s.cluster != nil {
		return s.cluster.Member().Addr()
	}
	return ""
}

// NodeID returns the node's id.
func (s *Server) NodeID() string { return s.cfg.NodeID }

// Run accepts gateway links (and, in cluster mode, follows the boss's bucket
// table) until ctx is done or Shutdown is called. It returns nil after a
// shutdown; ctx ending is a Shutdown (links closed, the cluster left), not
// merely the end of accepting.
func (s *Server) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Shutdown(sctx)
	})
	defer stop()
	s.startMu.Lock()
	if s.stopping { // Shutdown came first: nothing to start
		s.startMu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.goLocked(s.sweepLoop) // ends with the server
	if s.co != nil {
		s.co.start() // Shutdown stops its workers
	}
	if s.cluster != nil {
		s.goLocked(func() { s.cluster.Run(s.ctx) }) // ends with the server
		s.goLocked(s.handoffLoop)                   // ends with the server
	}
	if s.internal != nil {
		s.goLocked(func() { // ends at Shutdown
			if err := s.internal.Serve(s.internalLn); !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("internal listener failed; /metrics, /varz and /v1/table are down", "addr", s.InternalAddr(), "err", err)
			}
		})
		s.log.Info("queue node internal HTTP", "addr", s.InternalAddr())
	}
	s.startMu.Unlock()
	s.log.Info("queue node serving links", "addr", s.LinkAddr())
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil {
				s.wg.Wait() // Shutdown's work: links closed, goroutines done
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || sysx.IsResourceExhausted(err) {
				s.log.Warn("accept failed; retrying", "err", err)
				select {
				case <-time.After(100 * time.Millisecond):
					continue
				case <-s.ctx.Done():
					s.wg.Wait()
					return nil
				}
			}
			return fmt.Errorf("queuenode: accept: %w", err)
		}
		release, shed, ok := s.gate.Admit(conn)
		if shed != "" {
			s.m.linkHandshakesShed.WithLabelValues(string(shed)).Inc()
			if logged, skipped := s.handshakeLog.Allow(string(shed), time.Now()); logged {
				s.log.Warn("too many link handshakes in flight; closed a connection", "shed", shed, "remote", conn.RemoteAddr().String(),
					"in_flight", s.gate.InFlight(), "skipped", skipped)
			}
		}
		if !ok {
			continue // the gate closed it
		}
		if !s.goTracked(func() { s.serveLink(conn, release) }) { // ends when the link closes
			release()
			conn.Close() // accepted as Shutdown began: it would not be closed
		}
	}
}

// goTracked runs fn on a goroutine that Run and Shutdown wait for, unless
// Shutdown has begun; it reports whether fn started.
func (s *Server) goTracked(fn func()) bool {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	if s.stopping {
		return false
	}
	s.goLocked(fn)
	return true
}

// goLocked runs fn on a goroutine that Run and Shutdown wait for. The
// caller holds startMu and has checked stopping.
func (s *Server) goLocked(fn func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn()
	}()
}

// Shutdown leaves the cluster (cluster mode: gracefully, within about a
// second, so that the boss sees "left" at once and moves the node's buckets),
// stops accepting links, closes every link (gateways tell their clients the
// node is gone; call-outs waiting for them are cancelled) and waits for the
// goroutines to end, then lets the leave call-outs still queued go out, all
// until ctx expires. It is safe to call more than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.startMu.Lock()
	s.stopping = true // no goroutine starts after this: the wait below sees them all
	s.startMu.Unlock()
	s.leaveCluster()
	s.mu.Lock()
	s.closed = true
	links := make([]*link, 0, len(s.links))
	for _, l := range s.links {
		links = append(links, l)
	}
	s.mu.Unlock()
	s.cancel()
	s.bossClient.CloseIdleConnections()
	s.ln.Close()
	if s.internal != nil {
		s.internal.Close()   // a scrape in flight is cut short
		s.internalLn.Close() // Close closes it, unless Run never got to Serve
	}
	for _, l := range links {
		l.close(nil)
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if s.co != nil {
		if cerr := s.co.stop(ctx); err == nil {
			err = cerr
		}
	}
	return err
}

// HandleHTTP adds /metrics, /healthz, /varz and GET /v1/table (the node's
// current bucket table; an empty one in standalone mode) to mux.
func (s *Server) HandleHTTP(mux *http.ServeMux) {
	obs.Handle(mux, s.cfg.Registry, s.health, s.varz)
	mux.HandleFunc("GET "+cluster.TablePath, s.serveTable)
}

func (s *Server) health() error {
	if s.ctx.Err() != nil {
		return errors.New("shutting down")
	}
	return nil
}

// Varz is the node's JSON state at /varz.
type Varz struct {
	NodeID   string `json:"node_id"`
	LinkAddr string `json:"link_addr"`
	Queues   int64  `json:"queues"`
	Links    int    `json:"links"`
	// TableVersion is the bucket table version the node holds (0: none yet,
	// or standalone).
	TableVersion uint64 `json:"table_version"`
	// BucketsOwned is how many of the table's buckets this node owns.
	BucketsOwned int `json:"buckets_owned"`
	// Bytes is what the node's queues hold by its memory budget's count
	// (history, state, overheads; see Queue.Bytes), and MaxBytes that
	// budget (--max-node-bytes).
	Bytes    int64 `json:"bytes"`
	MaxBytes int64 `json:"max_bytes"`
	// Insecure: no cluster key, so links are not authenticated.
	Insecure bool `json:"insecure"`
	// BucketsMovingOut are the buckets this node is handing off (frozen,
	// or handed off: answering MOVED, forwarding leaves); BucketsMovingIn those it adopted
	// and its table does not give it yet, or is receiving.
	BucketsMovingOut int `json:"buckets_moving_out"`
	BucketsMovingIn  int `json:"buckets_moving_in"`
}

func (s *Server) varz() any {
	t := s.currentTable()
	out, in := s.ho.counts()
	return Varz{
		BucketsMovingOut: out, BucketsMovingIn: in,
		NodeID: s.cfg.NodeID, LinkAddr: s.LinkAddr(), Queues: s.queueCount.Load(), Links: s.linkCount(),
		TableVersion: t.Version(), BucketsOwned: t.Counts()[s.cfg.NodeID],
		Bytes: s.nodeBytes.Load(), MaxBytes: s.cfg.MaxNodeBytes, Insecure: len(s.cfg.ClusterKeys) == 0,
	}
}

func (s *Server) linkCount() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.links)
}

func (s *Server) shardFor(queue string) *shard {
	return &s.shards[xxhash.Sum64String(queue)%numShards]
}

// queueLocked returns queue name from sh, creating it when create is set
// (for user: a client's request counts against its MaxQueueCreates; ""
// for the backend's); created says it did.
func (s *Server) queueLocked(sh *shard, name string, create bool, user string) (q *Queue, created bool, err error) {
	if q := sh.queues[name]; q != nil {
		return q, false, nil
	}
	if !create {
		return nil, false, nil
	}
	if s.queueCount.Load() >= int64(s.cfg.MaxQueues) {
		s.m.refused.WithLabelValues(refusedMaxQueues).Inc()
		return nil, false, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "node holds %d queues, its limit", s.cfg.MaxQueues)
	}
	if user != "" && s.creates != nil {
		switch ok, full := s.creates.allow(user, s.cfg.Now()); {
		case full:
			s.m.refused.WithLabelValues(refusedCreators).Inc()
			return nil, false, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s tracks as many users creating queues as it may (--max-queue-creates); try again shortly",
				s.cfg.NodeID)
		case !ok:
			s.m.refused.WithLabelValues(refusedQueueCreates).Inc()
			return nil, false, imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "user %s created %d queues within a minute, the limit (--max-queue-creates); try again later",
				user, s.cfg.MaxQueueCreates)
		}
	}
	q = NewQueue(name, s.nextEpoch(), &s.cfg.Limits, s.cfg.Now())
	sh.queues[name] = q
	s.queueCount.Add(1)
	s.m.queuesCreated.Inc()
	return q, true, nil
}

// dropIfDisposableLocked drops q from sh when keeping it would serve no one:
// a room that was joined and left without traffic need not wait for the
// idle TTL, which keeps join/leave churn from filling the node.
func (s *Server) dropIfDisposableLocked(sh *shard, q *Queue) {
	if q.Disposable() {
		s.removeQueueLocked(sh, q)
		s.m.queuesExpired.Inc()
	}
}

// nextEpoch returns a new epoch: the creation time in Unix microseconds, made
// strictly increasing within the process.
func (s *Server) nextEpoch() uint64 {
	s.epochMu.Lock()
	defer s.epochMu.Unlock()
	e := uint64(s.cfg.Now().UnixMicro())
	if e <= s.lastEpoch {
		e = s.lastEpoch + 1
	}
	s.lastEpoch = e
	return e
}

// handle runs one request from link l, on l's reader. A client operation
// on a queue with call-outs may be handed to its chain (chain.go); every
// other request runs at once. Each operation sends its own success reply
// under the queue's lock, so that a joiner's reply precedes the events after
// it; finish answers errors.
func (s *Server) handle(l *link, req *imqpb.NodeRequest) {
	if err := s.fence(req.GetTableVersion()); err != nil {
		if _, leave := req.GetOp().(*imqpb.NodeRequest_Leave); !leave {
			s.finish(l, req, opName(req), err)
			return
		}
	}
	var rt *route
	if s.co != nil && !req.GetBackend() {
		if rt = s.co.match(requestQueue(req)); rt != nil && l.enqueue(rt, req) {
			return
		}
	}
	s.execute(l, req, rt, nil)
}

// execute runs req: rt is its queue's call-out route (nil: none, or a
// backend request) and res what its call-outs decided when it ran in a
// chain (nil: it runs on the reader). A request for a bucket being handed
// off is held, or answered MOVED, instead (intercept).
func (s *Server) execute(l *link, req *imqpb.NodeRequest, rt *route, res *calloutResult) {
	if s.intercept(l, req, res) {
		return
	}
	s.dispatch(l, req, rt, res)
}

// dispatch runs req here, whatever the hand-offs.
func (s *Server) dispatch(l *link, req *imqpb.NodeRequest, rt *route, res *calloutResult) {
	var op string
	var err error
	switch x := req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		op, err = "join", s.join(l, req, x.Join, res)
	case *imqpb.NodeRequest_Leave:
		op, err = "leave", s.leave(l, req, x.Leave, rt)
	case *imqpb.NodeRequest_Publish:
		op, err = "publish", s.publish(l, req, x.Publish, res)
	case *imqpb.NodeRequest_SetState:
		op, err = "set_state", s.setState(l, req, x.SetState)
	case *imqpb.NodeRequest_GetState:
		op, err = "get_state", s.getState(l, req, x.GetState)
	case *imqpb.NodeRequest_History:
		op, err = "history", s.history(l, req, x.History)
	case *imqpb.NodeRequest_QueueInfo:
		op, err = "queue_info", s.queueInfo(l, req, x.QueueInfo)
	default:
		err = imqerr.New(imqpb.Code_UNKNOWN_MESSAGE, "unknown link request")
	}
	s.finish(l, req, op, err)
}

// opName names req's operation in metrics ("" for an unknown one).
func opName(req *imqpb.NodeRequest) string {
	switch req.GetOp().(type) {
	case *imqpb.NodeRequest_Join:
		return "join"
	case *imqpb.NodeRequest_Leave:
		return "leave"
	case *imqpb.NodeRequest_Publish:
		return "publish"
	case *imqpb.NodeRequest_SetState:
		return "set_state"
	case *imqpb.NodeRequest_GetState:
		return "get_state"
	case *imqpb.NodeRequest_History:
		return "history"
	case *imqpb.NodeRequest_QueueInfo:
		return "queue_info"
	}
	return ""
}

// finish counts a request that ended, and answers it if it failed (the
// operation sent its own success reply).
func (s *Server) finish(l *link, req *imqpb.NodeRequest, op string, err error) {
	if op != "" {
		s.m.requests.WithLabelValues(op).Inc()
	}
	if err == nil {
		return
	}
	var ho *handingOffError
	if errors.As(err, &ho) {
		// The bucket froze while req ran: it waits with the others (or,
		// should the hand-off be over already, runs again).
		if !s.divert(l, req, nil) {
			s.execute(l, req, nil, nil)
		}
		return
	}
	e := imqerr.From(err)
	s.m.errors.WithLabelValues(e.Code.String()).Inc()
	r := &imqpb.NodeReply{Id: req.GetId(), Code: e.Code, Message: e.Message}
	var moved *movedError
	if errors.As(err, &moved) {
		r.TableVersion = moved.version
		s.m.movedReplies.Inc()
	}
	if req.GetId() != 0 {
		l.sendMsg(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: r}})
	}
}

// checkClient refuses a client operation (not the backend's) that does not
// name its user and session, which the gateway always sets.
func checkClient(req *imqpb.NodeRequest) error {
	if !req.GetBackend() && (req.GetUser() == "" || req.GetSession() == "") {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "a client request must name its user and session")
	}
	return nil
}

// senderOf is who req's events and state changes are from: its user, or ""
// for the backend.
func senderOf(req *imqpb.NodeRequest) string {
	if req.GetBackend() {
		return ""
	}
	return req.GetUser()
}

// join joins req's session to j's queue. After a join call-out (res set),
// it first sets the state the backend seeded where it is not set, as the
// backend, so that the joiner's snapshots hold it.
func (s *Server) join(l *link, req *imqpb.NodeRequest, j *imqpb.Join, res *calloutResult) error {
	if req.GetBackend() {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "the backend does not join queues")
	}
	if err := checkClient(req); err != nil {
		return err
	}
	if err := wire.ValidateQueueName(j.GetQueue()); err != nil {
		return err
	}
	sh := s.shardFor(j.GetQueue())
	var q *Queue
	mounts := make([]string, len(j.GetMounts()))
	for i, m := range j.GetMounts() {
		mounts[i] = m.GetName()
	}
	reserved, err := s.lockWithRoom(sh, j.GetQueue(), func() int64 { return s.needLocked(sh, j.GetQueue(), mounts...) })
	defer sh.mu.Unlock()
	defer func() { s.settleLocked(q, reserved) }()
	if err != nil {
		return err
	}
	if res != nil && l.ctx.Err() != nil {
		return nil // the link closed during the call-out: see runChained
	}
	if q, _, err = s.queueLocked(sh, j.GetQueue(), true, req.GetUser()); err != nil {
		return err
	}
	if res != nil && len(res.seed) > 0 {
		s.seedLocked(q, res.seed, j.GetMounts(), &reserved)
	}
	joined, err := q.Join(Subscriber{User: req.GetUser(), Session: req.GetSession(), Gateway: l.key}, j.GetMounts(), s.cfg.Now())
	if err != nil {
		return err
	}
	l.reply(req.GetId(), func(r *imqpb.NodeReply) { r.Result = &imqpb.NodeReply_Joined{Joined: joined} })
	return nil
}

// seedLocked sets the state a join call-out seeded (mount, key, JSON value)
// where the key is not set, as the backend would, in order of mount and
// key. A seed the queue refuses (wrong mount kind, limits) is skipped, and
// so is one for a mount the join (specs) names as a message mount, which
// would make the join fail, and one the node's memory budget has no room
// for (seeds never evict); each skip is counted and warned of
// (skippedSeed). The room taken is added to reserved.
func (s *Server) seedLocked(q *Queue, seed map[string]map[string]json.RawMessage, specs []*imqpb.MountSpec, reserved *int64) {
	now := s.cfg.Now()
	for _, mount := range slices.Sorted(maps.Keys(seed)) {
		if slices.ContainsFunc(specs, func(m *imqpb.MountSpec) bool {
			return m.GetName() == mount && m.GetKind() != imqpb.MountKind_STATE
		}) {
			s.skippedSeed(seedSkippedRefused, q, mount, "", errors.New("the join names it as a message mount"))
			continue
		}
		for _, key := range slices.Sorted(maps.Keys(seed[mount])) {
			if q.StateKeySet(mount, key) {
				continue
			}
			var v bytes.Buffer
			json.Compact(&v, seed[mount][key]) // valid: it was decoded
			need := int64(len(key) + v.Len() + entryOverhead)
			if q.mounts[mount] == nil {
				need += MountBytes(mount)
			}
			if !s.tryReserve(need) {
				s.skippedSeed(seedSkippedBytes, q, mount, key, nil)
				continue
			}
			*reserved += need
			ch, err := q.SetState(mount, "", key, v.Bytes(), false, now)
			if err != nil {
				s.skippedSeed(seedSkippedRefused, q, mount, key, err)
				continue
			}
			s.m.stateChanges.Inc()
			s.deliverLocked(q, ch.Mount, &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_State{State: ch}})
		}
	}
}

// Reasons a join call-out's state seed is skipped, the reason label of
// imq_queuenode_join_seeds_skipped_total.
const (
	seedSkippedBytes   = "node_bytes"
	seedSkippedRefused = "refused"
)

// seedWarnEvery bounds the warnings of skipped seeds: one per interval,
// however many joins skip seeds.
const seedWarnEvery = 10 * time.Second

// skippedSeed counts a seed skipped for reason (key "": every key of
// mount) and warns of it, at most once per seedWarnEvery.
func (s *Server) skippedSeed(reason string, q *Queue, mount, key string, err error) {
	s.m.seedsSkipped.WithLabelValues(reason).Inc()
	now := time.Now().UnixNano()
	last := s.seedWarn.Load()
	if now-last < int64(seedWarnEvery) || !s.seedWarn.CompareAndSwap(last, now) {
		return
	}
	msg := "join call-out state seed skipped: the node's memory budget is full (seeds never evict; see imq_queuenode_join_seeds_skipped_total)"
	if reason != seedSkippedBytes {
		msg = "join call-out state seed refused by the queue (see imq_queuenode_join_seeds_skipped_total)"
	}
	args := []any{"queue", q.Name(), "mount", mount, "key", key}
	if err != nil {
		args = append(args, "err", err)
	}
	s.log.Warn(msg, args...)
}

// leave removes req's session from lv's queue; with a leave call-out on rt,
// the backend is told afterwards.
func (s *Server) leave(l *link, req *imqpb.NodeRequest, lv *imqpb.Leave, rt *route) error {
	if req.GetBackend() {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "the backend does not leave queues")
	}
	if err := checkClient(req); err != nil {
		return err
	}
	if err := wire.ValidateQueueName(lv.GetQueue()); err != nil {
		return err
	}
	sh := s.shardFor(lv.GetQueue())
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if _, err := s.handoffOwnerLocked(lv.GetQueue()); err != nil {
		return err // the bucket froze: see finish
	}
	q, _, _ := s.queueLocked(sh, lv.GetQueue(), false, "")
	if q == nil || !q.Leave(req.GetSession(), s.cfg.Now()) {
		return imqerr.New(imqpb.Code_NOT_JOINED, "not joined to %s", lv.GetQueue())
	}
	s.dropIfDisposableLocked(sh, q)
	if rt != nil && rt.hooks&HookLeave != 0 {
		s.co.notifyLeave(rt, req.GetUser(), req.GetSession(), lv.GetQueue())
	}
	l.reply(req.GetId(), nil)
	return nil
}

// publish appends p's payload, or the one its call-out rewrote it to (res).
func (s *Server) publish(l *link, req *imqpb.NodeRequest, p *imqpb.Publish, res *calloutResult) error {
	if err := checkClient(req); err != nil {
		return err
	}
	if err := wire.ValidateQueueName(p.GetQueue()); err != nil {
		return err
	}
	payload := p.GetPayload()
	if res != nil && res.rewritten {
		payload = res.payload
	}
	sh := s.shardFor(p.GetQueue())
	var q *Queue
	reserved, err := s.lockWithRoom(sh, p.GetQueue(), func() int64 {
		return s.needLocked(sh, p.GetQueue(), p.GetMount()) + int64(len(payload)+len(senderOf(req))+entryOverhead)
	})
	defer sh.mu.Unlock()
	defer func() { s.settleLocked(q, reserved) }()
	if err != nil {
		return err
	}
	q, created, err := s.queueLocked(sh, p.GetQueue(), true, senderOf(req))
	if err != nil {
		return err
	}
	ev, err := q.Publish(p.GetMount(), senderOf(req), payload, s.cfg.Now())
	if err != nil {
		return err
	}
	s.m.published.Inc()
	s.deliverLocked(q, ev.Mount, &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: ev}})
	l.reply(req.GetId(), func(r *imqpb.NodeReply) {
		r.Result = &imqpb.NodeReply_Published{Published: &imqpb.Published{Offset: ev.Offset}}
		r.Created = created
	})
	return nil
}

// ownedStatePrefix returns the OwnedState prefix queue is under, or "".
func (s *Server) ownedStatePrefix(queue string) string {
	for _, p := range s.cfg.OwnedState {
		if strings.HasPrefix(queue, p) {
			return p
		}
	}
	return ""
}

// checkStateOwner refuses a client's change of a state key that belongs
// to another user, on a queue under an OwnedState prefix (see
// Config.OwnedState). The backend may change any key.
func (s *Server) checkStateOwner(req *imqpb.NodeRequest, st *imqpb.SetState) error {
	if req.GetBackend() {
		return nil
	}
	p := s.ownedStatePrefix(st.GetQueue())
	if p == "" {
		return nil
	}
	user, key := req.GetUser(), st.GetKey()
	if key == user || strings.HasPrefix(key, user+"/") {
		return nil
	}
	return imqerr.New(imqpb.Code_FORBIDDEN, "state key %q of %s belongs to another user: under %s a user may write only the key %q and keys starting with %q",
		key, st.GetQueue(), p, user, user+"/")
}

func (s *Server) setState(l *link, req *imqpb.NodeRequest, st *imqpb.SetState) error {
	if err := checkClient(req); err != nil {
		return err
	}
	if err := wire.ValidateQueueName(st.GetQueue()); err != nil {
		return err
	}
	if err := s.checkStateOwner(req, st); err != nil {
		return err
	}
	sh := s.shardFor(st.GetQueue())
	var q *Queue
	reserved, err := s.lockWithRoom(sh, st.GetQueue(), func() int64 {
		if st.GetDelete() {
			return s.needLocked(sh, st.GetQueue())
		}
		return s.needLocked(sh, st.GetQueue(), st.GetMount()) + int64(len(st.GetKey())+len(st.GetValue())+entryOverhead)
	})
	defer sh.mu.Unlock()
	defer func() { s.settleLocked(q, reserved) }()
	if err != nil {
		return err
	}
	// The backend deleting a key of a queue that does not exist learns so,
	// rather than creating an empty queue.
	create := !(req.GetBackend() && st.GetDelete())
	q, created, err := s.queueLocked(sh, st.GetQueue(), create, senderOf(req))
	if err != nil {
		return err
	}
	if q == nil {
		return imqerr.New(imqpb.Code_NOT_FOUND, "queue %s does not exist on this node", st.GetQueue())
	}
	ch, err := q.SetState(st.GetMount(), senderOf(req), st.GetKey(), st.GetValue(), st.GetDelete(), s.cfg.Now())
	if err != nil {
		return err
	}
	version := q.Head()
	if ch != nil {
		version = ch.Version
		s.m.stateChanges.Inc()
		s.deliverLocked(q, ch.Mount, &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_State{State: ch}})
	}
	l.reply(req.GetId(), func(r *imqpb.NodeReply) {
		r.Result = &imqpb.NodeReply_StateSet{StateSet: &imqpb.StateSet{Version: version}}
		r.Created = created
	})
	return nil
}

// deliverLocked encodes msg once and queues it to every gateway subscribed to
// mount. The caller holds q's shard lock, which keeps per-queue order.
func (s *Server) deliverLocked(q *Queue, mount string, msg *imqpb.ServerMessage) {
	var frame []byte
	q.ForEachGateway(mount, func(gw string) {
		if frame == nil {
			clientFrame, err := proto.Marshal(msg)
			if err != nil {
				s.log.Error("encode event", "err", err)
				return
			}
			frame = encodeLink(&imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{
				Queue: q.Name(), Mount: mount, Frame: clientFrame,
			}}})
		}
		s.mu.RLock()
		l := s.links[gw]
		s.mu.RUnlock()
		if l != nil && s.deliver(l, q.Name(), frame) {
			s.m.deliveries.Inc()
		}
	})
}

// removeGateway drops every subscriber that joined through link key, and
// tells the backends with a leave call-out.
func (s *Server) removeGateway(key string) {
	now := s.cfg.Now()
	removed := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			var left func(Subscriber)
			if s.co != nil {
				if rt := s.co.match(q.Name()); rt != nil && rt.hooks&HookLeave != 0 {
					left = func(sub Subscriber) { s.co.notifyLeave(rt, sub.User, sub.Session, q.Name()) }
				}
			}
			removed += q.RemoveGateway(key, now, left)
			s.dropIfDisposableLocked(sh, q)
		}
		sh.mu.Unlock()
	}
	if removed > 0 {
		s.log.Info("removed subscribers of closed link", "link", key, "subscribers", removed)
	}
}

// sweepLoop drops idle queues and aged history until the server stops.
func (s *Server) sweepLoop() {
	every := min(s.cfg.IdleTTL/4, 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			s.sweep()
		}
	}
}

func (s *Server) sweep() {
	now := s.cfg.Now()
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			if q.Expire(now, s.cfg.IdleTTL) {
				s.removeQueueLocked(sh, q)
				s.m.queuesExpired.Inc()
			} else {
				s.settleLocked(q, 0)
			}
		}
		sh.mu.Unlock()
	}
	if s.creates != nil {
		s.creates.sweep(now)
	}
}

func encodeLink(m *imqpb.LinkDown) []byte {
	b, err := imqlink.MarshalFrame(m)
	if err != nil {
		panic(fmt.Sprintf("queuenode: encode link frame: %v", err)) // a bug: every field is valid by construction
	}
	return b
}
