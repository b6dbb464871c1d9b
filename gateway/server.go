package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/gorilla/websocket"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/obs"
	"github.com/imq-dev/imq/internal/sysx"
	imqpb "github.com/imq-dev/imq/proto"
)

// Subprotocols the gateway speaks on /ws.
const (
	SubprotocolBinary = "imq.v1"
	SubprotocolJSON   = "imq.v1.json"
)

// maxHeaderBytes bounds a request's headers on both listeners (net/http
// adds 4 KiB of slack). Tokens travel in the connect message, API keys and
// kick signatures in one short Authorization header; 32 KiB leaves room for
// a browser's cookies on the handshake.
const maxHeaderBytes = 32 << 10

// fdReserve is kept out of the connection capacity for links, listeners,
// log files and the metrics scrape.
const fdReserve = 128

// Server is a gateway.
type Server struct {
	cfg      Config
	log      *slog.Logger
	m        *metrics
	ln       *limitListener
	http     *http.Server // clients: /ws, /rpc/v1/, /healthz
	upgrader websocket.Upgrader
	maxConns int // authenticated connections at most
	// maxPending bounds connections not yet authenticated (admission.go).
	maxPending int
	authLimit  *authLimiter
	logLimit   logLimiter   // warnLimited
	kickSigs   kickReplay   // signatures of passed-on kicks already taken (rpc_kick.go)
	kickReads  atomic.Int64 // passed-on kicks whose body is being read (rpc.go's runSignedKick)

	// The internal listener (Config.InternalAddr): /metrics, /healthz,
	// /varz, /v1/table and kicks passed on by other gateways.
	internalLn net.Listener
	internal   *http.Server

	// Routing (cluster.go). routes is replaced whole by setTable; lookups
	// load it without a lock.
	routes  atomic.Pointer[routes]
	routeMu sync.Mutex
	// Guarded by routeMu: Run has started the links; Shutdown has stopped
	// them (no link starts after).
	linksRunning, linksClosed bool
	movedWait                 time.Duration // bounds one wait for a newer table after MOVED; tests shorten it
	rebindWait                time.Duration // bounds a hand-off's wait for the new owner's link (handoff.go); tests shorten it

	// Cluster mode only (nil standalone): the membership and the table
	// watcher, whose install hook is setTable. Set in New before any
	// goroutine starts.
	cluster *cluster.Cluster

	index index
	conns connSet

	// Admin RPC (rpc.go) and the auth call-out (auth_callout.go); set in
	// New.
	apiKeys   []apiKey
	rpcSlots  chan struct{} // one per RPC call in progress
	rpcClient *http.Client  // asks the other gateways (kick)
	auth      *authCallout  // nil without Config.AuthURL
	jwt       *verifier     // checks connect tokens (auth.go)

	sessionPrefix string // gateway id and a random nonce: sessions stay unique if two gateways share an id
	connSeq       atomic.Uint64
	closing       atomic.Bool
	ctx           context.Context
	cancel        context.CancelFunc
	wg            sync.WaitGroup
	shutOnce      sync.Once
	shutDone      chan struct{} // closed when Shutdown has finished
	shutErr       error         // set before shutDone closes
}

// New validates cfg, raises the open-file limit and binds the listener.
func New(cfg Config) (_ *Server, err error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.GatewayID == "" {
		var b [6]byte
		rand.Read(b[:])
		cfg.GatewayID = "gw-" + hex.EncodeToString(b[:])
	}
	s := &Server{
		cfg: cfg, log: cfg.Logger.With("gateway", cfg.GatewayID), shutDone: make(chan struct{}),
		movedWait: movedTableWait, rebindWait: rebindWait,
	}
	var nonce [4]byte
	rand.Read(nonce[:])
	s.sessionPrefix = cfg.GatewayID + "." + hex.EncodeToString(nonce[:]) + "."
	s.ctx, s.cancel = context.WithCancel(context.Background())
	defer func() { // on error, undo what was started and opened
		if err == nil {
			return
		}
		s.cancel()
		if s.ln != nil {
			s.ln.Listener.Close()
		}
		if s.internalLn != nil {
			s.internalLn.Close()
		}
	}()

	files, err := sysx.RaiseFileLimit()
	if err != nil {
		s.log.Warn("could not raise the open-file limit", "limit", files, "err", err)
	}
	capacity := int(files) - fdReserve
	if capacity < 1 {
		return nil, fmt.Errorf("gateway: the open-file limit %d leaves no room for connections", files)
	}
	s.maxConns = capacity
	if cfg.MaxConnections > 0 && cfg.MaxConnections < capacity {
		s.maxConns = cfg.MaxConnections
	}
	s.maxPending = cfg.MaxPending
	if s.maxPending == 0 {
		s.maxPending = max(16, s.maxConns/4)
	}
	if s.maxPending > capacity-s.maxConns { // the descriptors bound both pools (maxConns <= capacity: no overflow)
		s.maxPending = max(1, min(s.maxPending, capacity/5))
		s.maxConns = max(1, capacity-s.maxPending)
	}
	s.authLimit = newAuthLimiter(cfg.AuthFailuresPerIP)
	s.log.Info("connection capacity", "open_file_limit", files, "max_connections", s.maxConns, "max_pending", s.maxPending)

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("gateway: listen: %w", err)
	}
	s.ln = newLimitListener(ln, s.maxConns, s.maxPending, cfg.MaxPendingPerIP, s)
	s.internalLn, err = net.Listen("tcp", cfg.InternalAddr)
	if err != nil {
		return nil, fmt.Errorf("gateway: listen on the internal address: %w", err)
	}
	if cfg.Member == nil {
		// Standalone: one node owns every bucket, for good.
		node := bucket.Node{ID: "queuenode", LinkAddr: cfg.QueueNode}
		s.routes.Store(&routes{table: bucket.Single(node), links: map[string]*nodeLink{node.ID: newNodeLink(s, node)}})
	} else {
		// Cluster: nothing to route by until the boss's table arrives.
		s.routes.Store(&routes{table: bucket.Empty(), links: map[string]*nodeLink{}})
	}

	s.m = newMetrics(cfg.Registry, s)
	s.upgrader = websocket.Upgrader{
		Subprotocols:     []string{SubprotocolBinary, SubprotocolJSON},
		ReadBufferSize:   256, // frames stream through it; small keeps idle connections small
		WriteBufferPool:  &sync.Pool{},
		HandshakeTimeout: 10 * time.Second,
		CheckOrigin:      func(*http.Request) bool { return true }, // checked before Upgrade
		Error:            s.upgradeError,
	}
	s.conns.init()
	s.index.init()
	s.apiKeys = newAPIKeys(cfg.APIKeys)
	s.rpcSlots = make(chan struct{}, cfg.RPCMaxInflight)
	s.rpcClient = newRPCClient()
	s.auth = newAuthCallout(&s.cfg)
	jwks := newJWKSCache(s.ctx, &s.cfg, s.log, func(ok bool) { s.m.jwksFetches.WithLabelValues(okLabel(ok)).Inc() })
	if s.jwt, err = newVerifier(&s.cfg, jwks); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	if len(cfg.APIKeys) == 0 {
		s.log.Info("admin RPC off: no API keys configured")
	}

	// The client port shows nothing of the cluster's insides: internal
	// addresses, the table and metrics are on the internal listener.
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", s.serveWS)                            // any method: serveWS answers non-GETs 405 in JSON
	mux.HandleFunc(RPCPath, s.serveRPC)                         // bearer API keys only
	mux.HandleFunc("GET /healthz", obs.HealthHandler(s.health)) // a pending connection like any other: load balancers better check the internal one
	mux.HandleFunc("/", serveNotFound)                          // every answer of the client port is JSON
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       cfg.clientRead,
		WriteTimeout:      cfg.clientWrite,
		IdleTimeout:       cfg.clientIdle, // keep-alive admin RPC callers; WebSockets are hijacked
		MaxHeaderBytes:    maxHeaderBytes,
		ConnState:         s.ln.connState, // admission.go: idle connections are pending
		ConnContext:       withConn,       // serveWS finds its *countedConn
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	imux := http.NewServeMux()
	obs.Handle(imux, cfg.Registry, s.health, s.varz)
	imux.HandleFunc("GET "+cluster.TablePath, s.serveTable)
	// Other gateways pass kicks on here (rpc_kick.go), at the admin RPC's
	// path: a gateway of the previous release, which posts to the address
	// a peer advertises, finds it too.
	// Only signed kicks are taken here, and only here.
	imux.HandleFunc("POST "+RPCPath+"kick", s.serveSignedKick)
	s.internal = obs.NewInternalServer(imux, s.log)
	if cfg.Member != nil {
		if err := s.startCluster(); err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	return s, nil
}

// Addr returns the client listen address (/ws, /rpc/v1/, /healthz).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// InternalAddr returns the internal listen address (/metrics, /healthz,
// /varz, /v1/table).
func (s *Server) InternalAddr() string { return s.internalLn.Addr().String() }

// GossipAddr returns the address this process gossips on in cluster mode,
// or "" standalone.
func (s *Server) GossipAddr() string {
	if s.cluster != nil {
		return s.cluster.Member().Addr()
	}
	return ""
}

// ID returns the gateway id.
func (s *Server) ID() string { return s.cfg.GatewayID }

// Run serves until ctx is done or Shutdown is called; it returns nil then.
// In cluster mode it also follows the boss's bucket table.
func (s *Server) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Shutdown(sctx)
	})
	defer stop()
	s.startLinks()
	if s.cluster != nil {
		s.wg.Add(1)
		go func() { // ends at Shutdown
			defer s.wg.Done()
			s.cluster.Run(s.ctx)
		}()
	}
	s.wg.Add(1)
	go func() { // ends at Shutdown
		defer s.wg.Done()
		s.pingLoop()
	}()
	s.wg.Add(1)
	go func() { // ends at Shutdown
		defer s.wg.Done()
		if err := s.internal.Serve(s.internalLn); !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("internal listener failed; /metrics, /varz and passed-on kicks are down", "addr", s.InternalAddr(), "err", err)
		}
	}()
	if s.jwt.jwks != nil {
		s.wg.Add(1)
		go func() { // ends at Shutdown
			defer s.wg.Done()
			s.jwt.jwks.run(s.ctx)
		}()
	}
	s.log.Info("gateway serving", "addr", s.Addr(), "ws", "ws://"+s.Addr()+"/ws", "internal", s.InternalAddr())
	err := s.http.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) || s.closing.Load() { // Shutdown closed the listener
		<-s.shutDone
		s.wg.Wait()
		return nil
	}
	s.closeLinks() // the links and the watcher stop
	s.internal.Close()
	s.wg.Wait()
	s.leaveCluster()
	return fmt.Errorf("gateway: serve: %w", err)
}

// Shutdown drains the gateway and stops it, in this order: it marks itself
// not ready (/healthz on both listeners answers 503 "draining", /varz says
// draining: a load balancer stops sending clients here) and stops accepting
// connections; it says goodbye (reason SHUTDOWN, reconnect) to every client,
// one after another over ShutdownSpread (at most half of the time ctx
// leaves), so that they reconnect to the other gateways over that window
// rather than in one burst; it waits for the goodbyes to be flushed, closes
// what is left and the links, and in cluster mode leaves the membership
// gracefully (within about a second). The leave comes last: queue nodes
// close the links of a gateway that left, which would cut off the clients
// still waiting for their goodbye. Admin RPC calls in flight finish
// meanwhile. Shutdown waits for all of that or ctx, and is safe to call more
// than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutOnce.Do(func() {
		defer close(s.shutDone)
		s.closing.Store(true) // health and /varz say draining; serveWS refuses
		spread := goodbyeSpread(ctx, s.cfg.ShutdownSpread)
		s.log.Info("gateway draining", "connections", s.conns.count(), "spread", spread)
		s.ln.Close() // stop accepting now; Run's Serve sees closing and ends as a shutdown
		httpDone := make(chan error, 1)
		go func() { // ends once the calls in flight end, or at ctx
			err := s.http.Shutdown(ctx)
			if errors.Is(err, net.ErrClosed) { // the listener, closed above
				err = nil
			}
			httpDone <- err
		}()
		s.ln.waitDrains(ctx) // refused connections being drained (listener.go)
		s.sayGoodbyes(ctx, spread)
		for s.conns.count() > 0 && ctx.Err() == nil { // each flushes, then closes
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
		for _, c := range s.conns.snapshot() {
			c.ws.NetConn().Close()
		}
		err := <-httpDone
		s.closeLinks()
		s.leaveCluster()
		// The internal listener goes last: /metrics and /varz show the
		// drain. Close: a scrape in flight is cut short rather than holding
		// up the shutdown.
		s.internal.Close()
		s.internalLn.Close() // Close closes it, unless Run never got to Serve
		s.rpcClient.CloseIdleConnections()
		if s.auth != nil {
			s.auth.client.CloseIdleConnections()
		}
		s.log.Info("gateway stopped")
		s.shutErr = err
	})
	select {
	case <-s.shutDone:
		return s.shutErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// goodbyeBatch groups the goodbyes of a spread: those due within it of one
// another go out together, one timer per batch rather than per client.
const goodbyeBatch = 10 * time.Millisecond

// goodbyeSpread returns the window Shutdown spreads its goodbyes over: the
// configured one, but at most half of what ctx leaves, so that flushing and
// closing have the other half.
func goodbyeSpread(ctx context.Context, spread time.Duration) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		spread = min(spread, time.Until(dl)/2)
	}
	return max(spread, 0)
}

// sayGoodbyes tells every client to reconnect (goodbye SHUTDOWN, reconnect),
// the i-th of n at spread·i/n, so that the last goes out just before spread
// ends. Once ctx ends, those left hear it at once. A connection accepted
// after the snapshot hears it from serveWS, which checks closing.
func (s *Server) sayGoodbyes(ctx context.Context, spread time.Duration) {
	conns := s.conns.snapshot()
	start := time.Now()
	var t *time.Timer
	for i, c := range conns {
		due := start.Add(spread * time.Duration(i) / time.Duration(len(conns)))
		if d := time.Until(due); d > goodbyeBatch && ctx.Err() == nil {
			if t == nil {
				t = time.NewTimer(d)
				defer t.Stop()
			} else {
				t.Reset(d)
			}
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		}
		c.goAway(imqpb.Reason_REASON_SHUTDOWN, shutdownGoodbye, true)
	}
}

// shutdownGoodbye is the message of the goodbye a draining gateway sends.
const shutdownGoodbye = "gateway going away, reconnect"

// pingLoop pings every connection once per PingInterval. One loop for all
// connections, rather than a timer each, keeps idle connections small.
func (s *Server) pingLoop() {
	// Ticks of a hundredth of the interval ping about 1 % of the connections
	// each: small bursts rather than one large one.
	tick := time.NewTicker(min(max(s.cfg.PingInterval/100, 10*time.Millisecond), 250*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-tick.C:
			s.conns.each(func(c *conn) { c.pingIfDue(now) })
		}
	}
}

// health is ready when the gateway can route: in cluster mode once a table
// with nodes is known, and in both modes while at least one link is up.
func (s *Server) health() error {
	if s.closing.Load() {
		return errors.New("draining: shutting down, clients are told to reconnect elsewhere")
	}
	if len(s.routes.Load().links) == 0 {
		return errors.New("no bucket table with queue nodes yet; waiting for the boss")
	}
	if s.linksUp() == 0 {
		return errors.New("no queue node link is up")
	}
	return nil
}

// Varz is the gateway's JSON state at /varz.
type Varz struct {
	GatewayID string `json:"gateway_id"`
	// Addr is the client listen address, InternalAddr the internal one.
	Addr         string `json:"addr"`
	InternalAddr string `json:"internal_addr"`
	Mode         string `json:"mode"` // "standalone" or "cluster"
	// Draining: Shutdown has begun; the gateway accepts no connection and
	// tells its clients to reconnect elsewhere.
	Draining       bool   `json:"draining"`
	Connections    int    `json:"connections"`
	MaxConnections int    `json:"max_connections"`
	Queues         int    `json:"queues"`
	LinksUp        int    `json:"links_up"`
	Table          string `json:"table"`
	// TableVersion is the version of the bucket table the gateway routes by
	// (0: none yet).
	TableVersion uint64 `json:"table_version"`
	// Boss is the HTTP address of the boss the table comes from (cluster
	// mode; empty while none is known).
	Boss  string     `json:"boss,omitempty"`
	Links []LinkVarz `json:"links"`
	// Insecure: no cluster key, so links are not authenticated.
	Insecure bool `json:"insecure"`
}

// LinkVarz is one queue node link in Varz.
type LinkVarz struct {
	Node string `json:"node"`
	Addr string `json:"addr"`
	Up   bool   `json:"up"`
}

func (s *Server) varz() any {
	r := s.routes.Load()
	v := Varz{
		GatewayID: s.cfg.GatewayID, Addr: s.Addr(), InternalAddr: s.InternalAddr(), Mode: "standalone", Draining: s.closing.Load(), Connections: s.conns.count(), MaxConnections: s.maxConns,
		Queues: s.index.count(), Table: r.table.String(), TableVersion: r.table.Version(), Links: []LinkVarz{},
		Insecure: len(s.cfg.ClusterKeys) == 0,
	}
	if s.cluster != nil {
		v.Mode = "cluster"
		if u, ok := s.cluster.BossURL(); ok {
			v.Boss = strings.TrimPrefix(u, "http://")
		}
	}
	for _, n := range r.table.Nodes() {
		if l := r.links[n.ID]; l != nil {
			up := l.isUp()
			v.Links = append(v.Links, LinkVarz{Node: n.ID, Addr: n.LinkAddr, Up: up})
			if up {
				v.LinksUp++
			}
		}
	}
	return v
}

// linksUp counts the links up to the nodes of the current table.
func (s *Server) linksUp() int {
	n := 0
	for _, l := range s.routes.Load().links {
		if l.isUp() {
			n++
		}
	}
	return n
}

// httpError answers a request that cannot become a WebSocket with the same
// JSON error shape as the admin RPC.
// It counts in imq_gateway_connections_total by code.
func (s *Server) httpError(w http.ResponseWriter, status int, code imqpb.Code, msg string) {
	s.m.accepted.WithLabelValues(strings.ToLower(code.String())).Inc()
	writeHTTPError(w, status, code, msg)
}

// serveNotFound answers the client port's requests no other handler
// takes, in JSON like every answer of the port: 405 for /healthz by another
// method than GET or HEAD, 404 NOT_FOUND otherwise.
func serveNotFound(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/healthz" {
		w.Header().Set("Allow", "GET, HEAD")
		writeHTTPError(w, http.StatusMethodNotAllowed, imqpb.Code_BAD_REQUEST, "/healthz takes GET, not "+r.Method)
		return
	}
	writeHTTPError(w, http.StatusNotFound, imqpb.Code_NOT_FOUND, "no such path; the client port serves /ws, "+RPCPath+" and /healthz")
}

// writeHTTPError writes the JSON error answer of httpError, counting
// nothing.
func writeHTTPError(w http.ResponseWriter, status int, code imqpb.Code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-IMQ-Error", code.String())
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"error": errorBodyOf(&imqerr.Error{Code: code, Message: msg})})
}

func (s *Server) serveWS(w http.ResponseWriter, r *http.Request) {
	if s.closing.Load() {
		s.httpError(w, http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "gateway is shutting down")
		return
	}
	if !s.checkHandshake(w, r) {
		return
	}
	if origin := r.Header.Get("Origin"); origin != "" && !s.originAllowed(origin, r.Host) {
		s.httpError(w, http.StatusForbidden, imqpb.Code_FORBIDDEN, fmt.Sprintf("origin %q is not allowed", origin))
		return
	}
	proto := ""
	for _, p := range websocket.Subprotocols(r) {
		if p == SubprotocolBinary || p == SubprotocolJSON {
			proto = p
			break
		}
	}
	if proto == "" {
		s.httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "request the subprotocol imq.v1 (protobuf) or imq.v1.json (JSON)")
		return
	}
	devUser := r.URL.Query().Get("user")
	if devUser != "" {
		if !s.cfg.Dev {
			s.httpError(w, http.StatusUnauthorized, imqpb.Code_UNAUTHORIZED, "?user= works only in development mode; send a token in connect")
			return
		}
		if err := validUserID(devUser); err != nil {
			s.httpError(w, http.StatusBadRequest, imqpb.Code_UNAUTHORIZED, err.Error())
			return
		}
	}
	// Admission (admission.go): a ?user= connection is authenticated at
	// once and takes its place in the authenticated pool now; any other
	// is pending until its connect.
	cc := connOf(r)
	if ok, wait := s.authLimit.allowed(cc.source(), time.Now()); !ok {
		s.refuse(w, r, refusedAuthFailures, wait)
		return
	}
	if devUser != "" && !s.conns.tryAuth(s.maxConns) || devUser == "" && s.conns.authCount() >= s.maxConns {
		s.refuse(w, r, refusedFull, 0)
		return
	}
	if devUser == "" {
		if reason := cc.pend(false); reason != "" { // pending since accept, unless an API key took it out
			s.refuse(w, r, reason, 0)
			return
		}
	}
	ws, err := s.upgrader.Upgrade(hijackWrapper{w}, r, nil)
	if err != nil {
		if devUser != "" {
			s.conns.unAuth()
		}
		s.m.accepted.WithLabelValues("upgrade_failed").Inc()
		s.log.Debug("upgrade failed", "err", err)
		return
	}
	s.m.accepted.WithLabelValues("ok").Inc()
	if devUser != "" {
		cc.unpend() // authenticated
	}
	c := newConn(s, ws, proto == SubprotocolJSON, devUser)
	c.cc = cc
	s.conns.add(c)
	if s.closing.Load() { // Shutdown may have said its goodbyes before this one was added
		c.goAway(imqpb.Reason_REASON_SHUTDOWN, shutdownGoodbye, true)
	}
	go func() { // the connection's reader; ends with the connection
		c.serve()
		s.conns.remove(c)
	}()
}

// originAllowed applies AllowedOrigins.
func (s *Server) originAllowed(origin, host string) bool {
	if len(s.cfg.AllowedOrigins) == 0 {
		u, err := url.Parse(origin)
		return err == nil && strings.EqualFold(u.Host, host)
	}
	return slices.Contains(s.cfg.AllowedOrigins, "*") || slices.ContainsFunc(s.cfg.AllowedOrigins, func(o string) bool {
		return strings.EqualFold(strings.TrimRight(o, "/"), origin)
	})
}

// connSet is the set of open connections, sharded to keep registration off
// one lock, with an index by user (for kick) sharded the same way. A
// connection is in the user index once its user is known: from the start
// with ?user= (development mode), else from its successful connect.
type connSet struct {
	shards [64]struct {
		mu    sync.Mutex
		conns map[*conn]struct{}
	}
	users [64]struct {
		mu    sync.Mutex
		conns map[string]map[*conn]struct{} // by user; an entry per connection, so bounded by them
	}
	n atomic.Int64
	// authed counts the connections with a user (authenticated), bounded
	// by Server.maxConns through tryAuth.
	authed atomic.Int64
}

// tryAuth takes a place in the authenticated pool, if one of max is free.
func (cs *connSet) tryAuth(max int) bool {
	for {
		n := cs.authed.Load()
		if n >= int64(max) {
			return false
		}
		if cs.authed.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// unAuth gives back a place tryAuth took for a connection that never got
// its user.
func (cs *connSet) unAuth() { cs.authed.Add(-1) }

func (cs *connSet) authCount() int { return int(cs.authed.Load()) }

func (cs *connSet) init() {
	for i := range cs.shards {
		cs.shards[i].conns = make(map[*conn]struct{})
		cs.users[i].conns = make(map[string]map[*conn]struct{})
	}
}

// add registers c, and indexes it by its user when that is known already.
// It runs before c's reader starts.
func (cs *connSet) add(c *conn) {
	sh := &cs.shards[c.id%uint64(len(cs.shards))]
	sh.mu.Lock()
	sh.conns[c] = struct{}{}
	sh.mu.Unlock()
	cs.n.Add(1)
	if c.user != "" {
		cs.addUser(c, c.user)
	}
}

// addUser indexes c by user; c's reader calls it once connect has
// authenticated it.
func (cs *connSet) addUser(c *conn, user string) {
	sh := &cs.users[xxhash.Sum64String(user)%uint64(len(cs.users))]
	sh.mu.Lock()
	set := sh.conns[user]
	if set == nil {
		set = make(map[*conn]struct{}, 1)
		sh.conns[user] = set
	}
	set[c] = struct{}{}
	sh.mu.Unlock()
}

// remove forgets c. It runs on c's reader goroutine, after the reader ended
// (c.user no longer changes).
func (cs *connSet) remove(c *conn) {
	sh := &cs.shards[c.id%uint64(len(cs.shards))]
	sh.mu.Lock()
	delete(sh.conns, c)
	sh.mu.Unlock()
	cs.n.Add(-1)
	if c.user == "" {
		return
	}
	cs.authed.Add(-1) // a user was set only after tryAuth
	ush := &cs.users[xxhash.Sum64String(c.user)%uint64(len(cs.users))]
	ush.mu.Lock()
	if set := ush.conns[c.user]; set != nil {
		delete(set, c)
		if len(set) == 0 {
			delete(ush.conns, c.user)
		}
	}
	ush.mu.Unlock()
}

// ofUser returns the open connections of user.
func (cs *connSet) ofUser(user string) []*conn {
	sh := &cs.users[xxhash.Sum64String(user)%uint64(len(cs.users))]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	set := sh.conns[user]
	out := make([]*conn, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	return out
}

func (cs *connSet) count() int { return int(cs.n.Load()) }

// each calls fn for every connection, one shard lock at a time.
func (cs *connSet) each(fn func(*conn)) {
	for i := range cs.shards {
		sh := &cs.shards[i]
		sh.mu.Lock()
		for c := range sh.conns {
			fn(c)
		}
		sh.mu.Unlock()
	}
}

func (cs *connSet) snapshot() []*conn {
	var out []*conn
	for i := range cs.shards {
		sh := &cs.shards[i]
		sh.mu.Lock()
		for c := range sh.conns {
			out = append(out, c)
		}
		sh.mu.Unlock()
	}
	return out
}
