package boss

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/clusterauth"
	imqlink "github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/obs"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	// reconcileInterval is the safety-net reconcile, beside the one at each
	// membership change.
	reconcileInterval = time.Second
	// rejoinRetry is how often a restarted boss retries its persisted peers
	// until it hears from the cluster.
	rejoinRetry = time.Second
	// joinParallel bounds concurrent joins through persisted peers.
	joinParallel = 8
	// warnEvery rate-limits warnings repeated at each reconcile.
	warnEvery = 30 * time.Second
)

// Boss owns the bucket table: see the package documentation.
type Boss struct {
	cfg      Config
	log      *slog.Logger
	m        *metrics
	ln       net.Listener
	http     *http.Server
	member   *member.Member
	client   *http.Client // members' /varz and tables
	started  time.Time
	httpAddr string // advertised in membership
	gossip   string // gossip address, read once: member.Addr races with metadata updates

	table atomic.Pointer[bucket.Table]

	pubMu sync.Mutex
	pub   chan struct{} // closed and replaced at each publish; guarded by pubMu

	ready         atomic.Bool // the boss has heard from the cluster and may remove nodes
	persistFailed atomic.Bool // the last write of the state failed
	waiters       atomic.Int64
	kick          chan struct{} // cap 1: reconcile now
	ops           chan op       // cap maxOps: actions for the reconcile goroutine

	reportAuth *clusterauth.Verifier // nil: insecure, reports unsigned
	// operatorDigests are the SHA-256 digests of Config.OperatorKeys.
	operatorDigests [][sha256.Size]byte
	// refusedLog rate-limits the warnings of refused actions.
	refusedLog   imqlink.LogLimiter
	drainingView atomic.Pointer[[]string]
	// movesView is when each pending move of the published table was
	// first seen marked (for /v1/nodes); replaced whole.
	movesView atomic.Pointer[map[bucket.Move]time.Time]

	rejoin []string // persisted peers to rejoin at start; fixed after New

	// Owned by the reconcile goroutine.
	savedPeers []string      // peers in the state file
	dirty      bool          // the last write failed: write again
	warned     time.Time     // last rate-limited warning
	layout     *bucket.Table // Config.Handoff: the target layout, never with moves
	draining   map[string]bool
	moveSince  map[bucket.Move]time.Time // when each pending move was first seen

	closing  chan struct{} // closed when Shutdown starts: long polls end
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	runOnce  sync.Once
	shutOnce sync.Once
	// startMu orders Run's start of the loops (wg.Add) before Shutdown's
	// close of closing, so that shutdown's wg.Wait never runs beside an Add.
	startMu  sync.Mutex
	shutDone chan struct{} // closed when Shutdown has finished
	shutErr  error         // set before shutDone closes
}

// New validates cfg, loads the persisted state, binds the HTTP listener and
// joins the cluster as its boss. Reconciling starts with Run.
func New(cfg Config) (*Boss, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	b := &Boss{
		cfg: cfg, log: cfg.Logger.With("boss", cfg.ID), started: time.Now(),
		pub: make(chan struct{}), kick: make(chan struct{}, 1), ops: make(chan op, maxOps),
		draining: make(map[string]bool), moveSince: make(map[bucket.Move]time.Time),
		closing: make(chan struct{}), shutDone: make(chan struct{}),
		client: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 2, IdleConnTimeout: time.Minute,
			ResponseHeaderTimeout: cfg.TableFetchTimeout,
		}},
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())

	st := state{Format: stateFormat, Table: bucket.Empty()}
	if cfg.DataDir == "" && cfg.Ephemeral {
		b.log.Debug("no data directory: the bucket table is not persisted (ephemeral boss)")
	} else if cfg.DataDir == "" {
		b.log.Warn("no data directory: the bucket table will not survive a restart of the boss (it is then recovered from the members); set one")
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
			return nil, fmt.Errorf("boss: data directory: %w", err)
		}
		var err error
		if st, err = loadState(cfg.DataDir); err != nil {
			return nil, err
		}
		stale, _ := filepath.Glob(filepath.Join(cfg.DataDir, StateFile+".*.tmp"))
		for _, f := range stale { // a write a crash interrupted
			os.Remove(f)
		}
		b.log.Info("boss state loaded", "dir", cfg.DataDir, "version", st.Table.Version(),
			"nodes", len(st.Table.Nodes()), "buckets", st.Table.Buckets(), "peers", len(st.Peers))
	}
	b.table.Store(st.Table)
	b.rejoin, b.savedPeers = st.Peers, st.Peers
	for _, id := range st.Draining {
		b.draining[id] = true
	}
	b.publishDraining()
	b.movesView.Store(&map[bucket.Move]time.Time{})
	if cfg.Handoff {
		// Without a persisted layout, the table with its moves done is the
		// best guess of the layout; the first reconcile corrects it.
		b.layout = st.Layout
		if b.layout == nil || b.layout.MovingCount() > 0 {
			b.layout = st.Table.Settled()
		}
	}
	for _, k := range cfg.OperatorKeys {
		b.operatorDigests = append(b.operatorDigests, sha256.Sum256(k))
	}
	if len(cfg.ClusterKeys) > 0 {
		var err error
		if b.reportAuth, err = clusterauth.NewVerifier(cfg.ClusterKeys, clusterauth.DefaultWindow); err != nil {
			return nil, fmt.Errorf("boss: %w", err)
		}
	} else {
		b.log.Warn("no cluster key: hand-off reports (POST " + HandoffPath + ") are accepted unsigned; this boss is insecure")
	}
	// A table without nodes has nothing to lose to an incomplete view.
	b.ready.Store(len(st.Table.Nodes()) == 0)

	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("boss: listen: %w", err)
	}
	b.ln = ln
	b.httpAddr = advertised(ln.Addr().String(), cfg.Member.BindAddr)
	b.m = newMetrics(cfg.Registry, b)

	mcfg := cfg.Member
	onChange := mcfg.OnChange
	mcfg.OnChange = func() {
		if onChange != nil {
			onChange()
		}
		b.kickReconcile()
	}
	b.member, err = member.Start(mcfg, member.Meta{
		Role: member.RoleBoss, ID: cfg.ID, HTTPAddr: b.httpAddr, TableVersion: st.Table.Version(), TableSum: st.Table.Sum(),
	})
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("boss: %w", err)
	}

	b.gossip = b.member.Addr()

	mux := http.NewServeMux()
	mux.HandleFunc("GET "+cluster.TablePath, b.serveTable)
	mux.HandleFunc("GET /v1/nodes", b.serveNodes)
	mux.HandleFunc("POST "+HandoffPath, b.serveHandoff)
	mux.HandleFunc("POST /v1/nodes/{id}/drain", b.serveDrain(opDrain))
	mux.HandleFunc("POST /v1/nodes/{id}/undrain", b.serveDrain(opUndrain))
	obs.Handle(mux, cfg.Registry, b.health, b.varz)
	b.http = obs.NewInternalServer(mux, b.log) // its WriteTimeout outlasts a long poll (MaxWait)
	return b, nil
}

// advertised is the HTTP address members are told: the listen address, with
// the gossip host when it listens on every interface and the gossip address
// names one.
func advertised(listen, gossip string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return listen
	}
	if gh, _, err := net.SplitHostPort(gossip); err == nil {
		if ip := net.ParseIP(gh); ip != nil && !ip.IsUnspecified() {
			return net.JoinHostPort(gh, port)
		}
	}
	return listen
}

// Addr returns the HTTP listen address.
func (b *Boss) Addr() string { return b.ln.Addr().String() }

// GossipAddr returns the gossip address members join through.
func (b *Boss) GossipAddr() string { return b.gossip }

// Table returns the table the boss serves. It does not allocate.
func (b *Boss) Table() *bucket.Table { return b.table.Load() }

// Ready reports whether the boss has heard from the cluster and removes
// nodes it does not see (see the package documentation, Reconcile step 3).
func (b *Boss) Ready() bool { return b.ready.Load() }

// Run reconciles and serves HTTP until ctx is done or Shutdown is called; it
// returns nil then. Call it once.
func (b *Boss) Run(ctx context.Context) error {
	b.startMu.Lock()
	select {
	case <-b.closing:
		b.startMu.Unlock()
		<-b.shutDone
		return nil
	default:
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b.Shutdown(sctx)
	})
	defer stop()
	b.runOnce.Do(func() {
		b.wg.Add(2)
		go func() { // ends at Shutdown
			defer b.wg.Done()
			b.reconcileLoop(b.ctx)
		}()
		go func() { // ends when the boss hears from the cluster, or at Shutdown
			defer b.wg.Done()
			b.rejoinLoop(b.ctx)
		}()
	})
	b.startMu.Unlock()
	t := b.Table()
	b.log.Info("boss serving", "addr", b.Addr(), "gossip", b.GossipAddr(), "table_version", t.Version(),
		"nodes", len(t.Nodes()), "ready", b.Ready())
	err := b.http.Serve(b.ln)
	if errors.Is(err, http.ErrServerClosed) {
		<-b.shutDone
		return nil
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b.Shutdown(sctx)
	return fmt.Errorf("boss: serve: %w", err)
}

// Shutdown stops reconciling, ends the long polls, stops HTTP and leaves the
// cluster gracefully (members see "left" at once). It waits for that or ctx,
// and is safe to call more than once. The cluster keeps routing by the last
// table.
func (b *Boss) Shutdown(ctx context.Context) error {
	b.shutOnce.Do(func() {
		b.startMu.Lock()
		close(b.closing)
		b.startMu.Unlock()
		go func() { // ends when the shutdown is done
			defer close(b.shutDone)
			b.shutErr = b.shutdown(ctx)
		}()
	})
	select {
	case <-b.shutDone:
		return b.shutErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *Boss) shutdown(ctx context.Context) error {
	b.cancel()
	b.wg.Wait() // no publish after this
	err := b.http.Shutdown(ctx)
	b.ln.Close() // Serve closes it, unless Run never got to Serve
	leave := 3 * time.Second
	if d, ok := ctx.Deadline(); ok {
		leave = min(max(time.Until(d), 100*time.Millisecond), leave)
	}
	if e := b.member.Close(leave); e != nil {
		err = errors.Join(err, fmt.Errorf("boss: leave the cluster: %w", e))
	}
	b.client.CloseIdleConnections()
	b.log.Info("boss stopped", "table_version", b.Table().Version())
	return err
}

func (b *Boss) kickReconcile() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// reconcileLoop reconciles at start, at each membership change, at each
// batch of actions and every reconcileInterval, until ctx ends.
func (b *Boss) reconcileLoop(ctx context.Context) {
	tick := time.NewTicker(reconcileInterval)
	defer tick.Stop()
	var ops []op
	for ctx.Err() == nil {
		b.reconcile(ctx, ops)
		ops = nil
		select {
		case <-ctx.Done():
		case <-b.kick:
		case <-tick.C:
		case o := <-b.ops:
			ops = b.gatherOps(o)
		}
	}
}

// reconcile brings the table in line with membership and applies ops (each
// is answered): see the package documentation for the steps.
func (b *Boss) reconcile(ctx context.Context, ops []op) {
	start := time.Now()
	defer func() { b.m.reconcile.Observe(time.Since(start).Seconds()) }()
	peers := b.member.Peers()
	b.countMembers(peers)
	cur, ok := b.catchUp(ctx, peers)
	if !ok {
		for _, o := range ops {
			o.reply <- opError(http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "the boss is catching up with a newer table a member holds; retry")
		}
		return
	}
	ready := b.isReady()
	peerAddrs := b.savedPeers // until the boss hears from the cluster, keep whom to rejoin
	if ready {
		peerAddrs = b.otherAddrs(peers)
		cur = b.undiverge(cur, peers, peerAddrs)
	}
	alive, _ := liveNodes(peers)
	known := func(id string) bool {
		return slices.ContainsFunc(alive, func(n bucket.Node) bool { return n.ID == id }) || cur.Counts()[id] > 0 ||
			slices.ContainsFunc(cur.Moving(), func(m bucket.Move) bool { return m.To == id })
	}
	stateChanged, drains := b.applyDrains(ops, known)
	moves, accepted := reportMoves(ops, cur, alive)
	next, _ := cur.HandedOff(moves, alive)
	c := change{completed: moves}
	if ready {
		layoutNodes := b.layoutNodes(alive)
		if b.cfg.Handoff {
			p := planTable(b.layout, layoutNodes)
			if len(p.failed) > 0 && b.warnDue() {
				b.log.Error("queue nodes cannot join the bucket table", "err", errors.Join(p.failed...))
			}
			if p.changed() {
				b.layout, stateChanged = p.next, true
				c.joined, c.left = p.joined, p.left
			}
			c.gaveUp = b.dueMoves(next, start)
			next, c.step = next.Advance(b.layout, alive, b.cfg.MaxMoves, c.gaveUp)
		} else {
			// Moves left by a boss that ran with hand-off (or adopted from
			// a member) are done at once, like every other move here.
			next = next.Settled()
			p := planTable(next, layoutNodes)
			if len(p.failed) > 0 && b.warnDue() {
				b.log.Error("queue nodes cannot join the bucket table", "err", errors.Join(p.failed...))
			}
			next, c.joined, c.left, c.readdressed = p.next, p.joined, p.left, p.readdressed
			c.step.Assigned = p.moves
		}
	}
	if next != cur {
		b.commit(next, peerAddrs)
		b.logChange(cur, next, c, start)
	} else if stateChanged || b.dirty || !slices.Equal(peerAddrs, b.savedPeers) {
		b.persist(cur, peerAddrs)
	}
	b.trackMoves(b.Table(), start)
	answerReports(ops, accepted, b.Table().Version())
	live := len(b.layoutNodes(alive))
	if live == len(alive) && slices.ContainsFunc(alive, func(n bucket.Node) bool { return b.draining[n.ID] }) {
		live = 0 // every live node drains: nowhere to move to
	}
	b.answerDrains(ops, drains, b.Table(), live)
}

// change is what one reconcile did, for the log and the metrics.
type change struct {
	joined, left, readdressed []string
	completed                 []bucket.Move // hand-offs reported
	gaveUp                    []int         // moves given up (buckets of the table before)
	step                      bucket.Step
}

func (b *Boss) logChange(cur, next *bucket.Table, c change, start time.Time) {
	b.m.moved.Add(float64(len(c.step.Assigned) + len(c.completed)))
	b.m.movesCompleted.Add(float64(len(c.completed)))
	b.m.movesGivenUp.Add(float64(len(c.gaveUp)))
	b.log.Info("bucket table published", "version", next.Version(), "from", cur.Version(),
		"joined", c.joined, "left", c.left, "readdressed", c.readdressed,
		"buckets_moved", len(c.step.Assigned), "handoffs_completed", len(c.completed),
		"moves_marked", len(c.step.Marked), "moves_unmarked", len(c.step.Unmarked), "moves_given_up", len(c.gaveUp),
		"moving", next.MovingCount(), "nodes", len(next.Nodes()), "buckets", next.Buckets(),
		"elapsed", time.Since(start))
	if len(c.gaveUp) > 0 {
		b.log.Warn("bucket moves given up: not reported within the move timeout; they are tried again",
			"buckets", c.gaveUp, "timeout", b.cfg.MoveTimeout)
	}
}

// layoutNodes returns the live nodes that are not draining; all of them
// when every one drains, since a drain cannot empty the cluster.
func (b *Boss) layoutNodes(alive []bucket.Node) []bucket.Node {
	out := slices.DeleteFunc(slices.Clone(alive), func(n bucket.Node) bool { return b.draining[n.ID] })
	if len(out) == 0 {
		return alive
	}
	return out
}

// dueMoves returns the buckets of t whose move has been marked for longer
// than the move timeout.
func (b *Boss) dueMoves(t *bucket.Table, now time.Time) []int {
	var due []int
	for _, m := range t.Moving() {
		if since, ok := b.moveSince[m]; ok && now.Sub(since) > b.cfg.MoveTimeout {
			due = append(due, m.Bucket)
		}
	}
	return due
}

// trackMoves notes when each pending move of t was first seen (a restarted
// boss gives every pending move a fresh timeout) and forgets the others.
func (b *Boss) trackMoves(t *bucket.Table, now time.Time) {
	ms := t.Moving()
	if len(ms) == 0 && len(b.moveSince) == 0 {
		return
	}
	since := make(map[bucket.Move]time.Time, len(ms))
	for _, m := range ms {
		s, ok := b.moveSince[m]
		if !ok {
			s = now
		}
		since[m] = s
	}
	b.moveSince = since
	view := maps.Clone(since)
	b.movesView.Store(&view)
}

// undiverge republishes cur under the next version when a live member holds
// another table with cur's version: a boss that lost its state published a
// version the cluster already had, and members would ignore it as not newer.
// Renumbered, the boss's table wins everywhere.
func (b *Boss) undiverge(cur *bucket.Table, peers []member.Peer, peerAddrs []string) *bucket.Table {
	self, sum := b.member.Name(), cur.Sum()
	for _, p := range peers {
		if p.Name == self || p.Meta.TableVersion != cur.Version() || p.Meta.TableSum == "" || p.Meta.TableSum == sum {
			continue
		}
		next, err := cur.Renumber(cur.Version() + 1)
		if err != nil {
			return cur
		}
		b.commit(next, peerAddrs)
		b.log.Warn("a member holds another table of the same version; republished the boss's as the next",
			"member", p.Name, "version", next.Version(), "member_sum", p.Meta.TableSum, "sum", sum)
		return next
	}
	return cur
}

// catchUp adopts the newest table a live member holds when it is newer than
// the boss's. ok is false while a newer version exists that the boss could
// not fetch: it must change nothing then.
func (b *Boss) catchUp(ctx context.Context, peers []member.Peer) (cur *bucket.Table, ok bool) {
	cur = b.Table()
	self := b.member.Name()
	var newest uint64
	for _, p := range peers {
		if p.Name != self {
			newest = max(newest, p.Meta.TableVersion)
		}
	}
	if newest <= cur.Version() {
		return cur, true
	}
	var errs []error
	for _, p := range peers {
		if p.Name == self || p.Meta.TableVersion != newest {
			continue
		}
		t, err := b.fetchTable(ctx, p)
		if err == nil && t.Version() < newest {
			err = fmt.Errorf("served version %d, announced %d", t.Version(), newest)
		}
		if err != nil {
			b.m.fetchErrors.Inc()
			errs = append(errs, fmt.Errorf("%s: %w", p.Name, err))
			continue
		}
		b.commit(t, b.savedPeers)
		b.m.adoptions.Inc()
		b.log.Warn("adopted a newer bucket table from a member", "version", t.Version(), "from", cur.Version(),
			"member", p.Name, "nodes", len(t.Nodes()), "buckets", t.Buckets())
		return t, true
	}
	if b.warnDue() {
		b.log.Warn("a member holds a newer bucket table the boss cannot fetch; the table stays as it is",
			"version", cur.Version(), "newest", newest, "err", errors.Join(errs...))
	}
	return cur, false
}

// fetchTable gets p's current table from its /v1/table.
func (b *Boss) fetchTable(ctx context.Context, p member.Peer) (*bucket.Table, error) {
	var t *bucket.Table
	err := b.peerGet(ctx, p, cluster.TablePath, b.cfg.TableFetchTimeout, func(r io.Reader) (err error) {
		t, err = cluster.DecodeTable(r)
		return err
	})
	return t, err
}

// peerGet GETs path from p's HTTP address within timeout and hands a 200's
// body to read.
func (b *Boss) peerGet(ctx context.Context, p member.Peer, path string, timeout time.Duration, read func(io.Reader) error) error {
	base, err := peerURL(p)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return err
	}
	resp, err := b.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s answered %s", path, resp.Status)
	}
	return read(resp.Body)
}

// peerURL is the base URL of p's HTTP address; an address on every
// interface takes the host of p's gossip address.
func peerURL(p member.Peer) (string, error) {
	if p.Meta.HTTPAddr == "" {
		return "", errors.New("announces no HTTP address")
	}
	host, port, err := net.SplitHostPort(p.Meta.HTTPAddr)
	if err != nil {
		return "", fmt.Errorf("HTTP address %q: %v", p.Meta.HTTPAddr, err)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		if gh, _, err := net.SplitHostPort(p.Addr); err == nil {
			host = gh
		}
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

// isReady reports whether the boss may remove nodes, ending the grace
// period when it has passed.
func (b *Boss) isReady() bool {
	if b.ready.Load() {
		return true
	}
	if time.Since(b.started) < b.cfg.ReconcileGrace {
		return false
	}
	b.markReady("grace period over")
	return true
}

func (b *Boss) markReady(why string) {
	if b.ready.CompareAndSwap(false, true) {
		b.log.Info("boss reconciling the table with membership", "because", why, "after", time.Since(b.started))
		b.kickReconcile()
	}
}

// rejoinLoop joins the cluster through the persisted peers and the seeds
// until one join succeeds (the boss has then heard from the cluster), the
// grace period ends, or ctx does.
func (b *Boss) rejoinLoop(ctx context.Context) {
	self := b.GossipAddr()
	var addrs []string
	for _, a := range slices.Concat(b.rejoin, b.cfg.Member.Join) {
		if a != self && !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return
	}
	for !b.isReady() {
		if b.joinAny(ctx, addrs) {
			b.markReady("rejoined the cluster")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(rejoinRetry):
		}
	}
}

// joinAny tries addrs, a few at a time, and reports whether a join reached
// another member.
func (b *Boss) joinAny(ctx context.Context, addrs []string) bool {
	var ok atomic.Bool
	var wg sync.WaitGroup
	sem := make(chan struct{}, joinParallel)
	for _, a := range addrs {
		if ok.Load() || ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() { // ends with the join attempt
			defer wg.Done()
			defer func() { <-sem }()
			// A join through ourselves (a seed naming this process) reaches
			// no one: count it only when others are now known.
			if n, err := b.member.Join([]string{a}); err == nil && n > 0 && len(b.member.Peers()) > 1 {
				ok.Store(true)
			}
		}()
	}
	wg.Wait()
	return ok.Load()
}

// commit persists t, then publishes it.
func (b *Boss) commit(t *bucket.Table, peers []string) {
	b.persist(t, peers)
	b.table.Store(t)
	b.pubMu.Lock()
	close(b.pub)
	b.pub = make(chan struct{})
	b.pubMu.Unlock()
	b.member.SetTable(t.Version(), t.Sum())
	b.m.publishes.Inc()
}

// published returns a channel closed at the next publish.
func (b *Boss) published() <-chan struct{} {
	b.pubMu.Lock()
	defer b.pubMu.Unlock()
	return b.pub
}

// persist writes the state, if the boss has a data directory. A failure is
// logged, counted and retried at the next reconcile; /healthz reports it
// until a write succeeds.
func (b *Boss) persist(t *bucket.Table, peers []string) {
	if b.cfg.DataDir == "" {
		return
	}
	if peers == nil {
		peers = []string{}
	}
	err := saveState(b.cfg.DataDir, state{
		Format: stateFormat, Table: t, Peers: peers, Draining: *b.drainingView.Load(), Layout: b.layout, Saved: time.Now().UTC(),
	})
	if err != nil {
		b.m.persistErrors.Inc()
		if !b.dirty || b.warnDue() {
			b.log.Error("cannot persist the boss state; the table will not survive a restart until this is fixed",
				"dir", b.cfg.DataDir, "version", t.Version(), "err", err)
		}
		b.dirty = true
		b.persistFailed.Store(true)
		return
	}
	if b.dirty {
		b.log.Info("boss state persisted again", "dir", b.cfg.DataDir, "version", t.Version())
	}
	b.dirty = false
	b.persistFailed.Store(false)
	b.savedPeers = peers
}

// otherAddrs returns the sorted gossip addresses of the live members other
// than this boss.
func (b *Boss) otherAddrs(peers []member.Peer) []string {
	self := b.member.Name()
	out := make([]string, 0, len(peers))
	for _, p := range peers {
		if p.Name != self {
			out = append(out, p.Addr)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (b *Boss) countMembers(peers []member.Peer) {
	counts := map[member.Role]int{member.RoleBoss: 0, member.RoleQueueNode: 0, member.RoleGateway: 0}
	for _, p := range peers {
		if _, known := counts[p.Meta.Role]; known {
			counts[p.Meta.Role]++
		}
	}
	for r, n := range counts {
		b.m.members.WithLabelValues(string(r)).Set(float64(n))
	}
}

// warnDue rate-limits warnings repeated at each reconcile. Reconcile
// goroutine only.
func (b *Boss) warnDue() bool {
	if now := time.Now(); now.Sub(b.warned) >= warnEvery {
		b.warned = now
		return true
	}
	return false
}

func (b *Boss) health() error {
	select {
	case <-b.closing:
		return errors.New("shutting down")
	default:
	}
	if b.persistFailed.Load() {
		return errPersist
	}
	return nil
}
