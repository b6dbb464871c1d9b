package gateway

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/internal/tablewatch"
)

const (
	// linkWarmup bounds how long a new table waits for the links to its new
	// nodes before the gateway routes by it.
	linkWarmup = time.Second
	// leaveTimeout bounds the graceful leave of the membership at Shutdown.
	leaveTimeout = time.Second
)

// routes is what the gateway routes by: a bucket table and a link to each of
// its nodes, by node id. It is immutable and replaced whole (copy on write):
// a lookup loads one pointer and sees a table and links that agree.
type routes struct {
	table *bucket.Table
	links map[string]*nodeLink
}

// linkFor routes queue to the link of its node, and returns the version of
// the table it routed by. It does not allocate. The error (UNAVAILABLE) says
// the gateway has no table with nodes yet.
func (s *Server) linkFor(queue string) (*nodeLink, uint64, error) {
	r := s.routes.Load()
	node, ok := r.table.Lookup(queue)
	if !ok {
		return nil, r.table.Version(), errNoTable
	}
	l := r.links[node.ID]
	if l == nil { // setTable gives every node a link; never crash on a bug
		return nil, r.table.Version(), errNoTable
	}
	return l, r.table.Version(), nil
}

// table returns the bucket table the gateway routes by.
func (s *Server) table() *bucket.Table { return s.routes.Load().table }

// startCluster creates the table watcher (which Run starts) and joins the
// membership. It runs at the end of New, once the listener is bound.
func (s *Server) startCluster() error {
	s.watcher = tablewatch.New(tablewatch.Config{
		BossURL:  s.bossURL,
		OnChange: func(_, next *bucket.Table) { s.setTable(next) },
		Logger:   s.log,
	}, nil)
	mc := *s.cfg.Member
	if mc.Logger == nil {
		mc.Logger = s.log
	}
	userOnChange := mc.OnChange
	mc.OnChange = func() {
		if userOnChange != nil {
			userOnChange()
		}
		s.membersChanged()
	}
	m, err := member.Start(mc, member.Meta{
		Role: member.RoleGateway, ID: s.cfg.GatewayID, HTTPAddr: s.InternalAddr(), ClientAddr: s.Addr(),
	})
	if err != nil {
		return err
	}
	s.member.Store(m)
	s.membersChanged() // changes reported before the store were ignored
	return nil
}

// bossURL is the watcher's view of where the boss is: the newest live boss
// in the membership that advertises an HTTP address.
func (s *Server) bossURL() (string, bool) {
	if s.cfg.BossURL != "" {
		return strings.TrimRight(s.cfg.BossURL, "/"), true
	}
	m := s.member.Load()
	if m == nil {
		return "", false
	}
	return m.BossURL()
}

// membersChanged runs after membership changes: a boss or queue node that
// gossips a newer table version than ours means the boss has one for us, so
// the watcher asks now rather than at the end of its poll.
func (s *Server) membersChanged() {
	m := s.member.Load()
	if m == nil {
		return
	}
	cur := s.table().Version()
	for _, p := range m.Peers() {
		if (p.Meta.Role == member.RoleBoss || p.Meta.Role == member.RoleQueueNode) && p.Meta.TableVersion > cur {
			s.kickTable()
			return
		}
	}
}

// kickTable asks the watcher to fetch the table now; standalone, it does
// nothing.
func (s *Server) kickTable() {
	if s.watcher != nil {
		s.watcher.Kick()
	}
}

// leaveCluster leaves the membership gracefully, so that the others see
// "left" at once. It is idempotent (member.Close is).
func (s *Server) leaveCluster() {
	if m := s.member.Load(); m != nil {
		if err := m.Close(leaveTimeout); err != nil {
			s.log.Warn("leaving the cluster", "err", err)
		}
	}
}

// setTable makes next the table the gateway routes by, if it is newer than
// the current one, and reconciles the links: it starts one for each new node
// (and for a node whose link address changed: a restarted node), waits a
// little for them to come up so that the first requests routed to a new node
// do not find its link still dialling, switches routing over, and then stops
// the links of nodes that left the table or changed address. Stopping a link
// fails its pending requests (UNAVAILABLE) and ends the subscriptions made
// through it (NODE_LOST). It runs on the watcher's goroutine (tests call it
// directly); calls are serialized.
func (s *Server) setTable(next *bucket.Table) {
	s.installMu.Lock()
	defer s.installMu.Unlock()
	cur := s.routes.Load()
	if next.Version() <= cur.table.Version() {
		return
	}
	nodes := next.Nodes()
	links := make(map[string]*nodeLink, len(nodes))
	var fresh, gone []*nodeLink
	for _, n := range nodes {
		if l := cur.links[n.ID]; l != nil && l.node.LinkAddr == n.LinkAddr {
			links[n.ID] = l
			continue
		}
		l := newNodeLink(s, n)
		links[n.ID] = l
		fresh = append(fresh, l)
	}
	for id, l := range cur.links {
		if links[id] != l {
			gone = append(gone, l)
		}
	}

	s.routeMu.Lock()
	for _, l := range fresh {
		s.startLinkLocked(l)
	}
	running := s.linksRunning && !s.linksClosed
	s.routeMu.Unlock()
	if running && len(fresh) > 0 {
		s.warmUp(fresh)
	}

	s.routes.Store(&routes{table: next, links: links})
	s.routeMu.Lock()
	for _, l := range links { // Run may have started since: a link never started starts now
		s.startLinkLocked(l)
	}
	for _, l := range gone {
		s.stopLinkLocked(l)
	}
	s.routeMu.Unlock()

	s.changedMu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.changedMu.Unlock()

	if m := s.member.Load(); m != nil {
		m.SetTable(next.Version(), next.Sum())
	}
	s.m.tableChanges.Inc()
	s.log.Info("routing by bucket table", "version", next.Version(), "from", cur.table.Version(),
		"nodes", len(nodes), "buckets", next.Buckets(), "links_started", len(fresh), "links_stopped", len(gone))
}

// warmUp waits until each of links has been up once, for at most
// linkWarmup.
func (s *Server) warmUp(links []*nodeLink) {
	ctx, cancel := context.WithTimeout(s.ctx, linkWarmup)
	defer cancel()
	for _, l := range links {
		select {
		case <-l.everUp:
		case <-ctx.Done():
			s.log.Warn("routing by a new table before the link to its node is up", "node", l.node.ID, "addr", l.node.LinkAddr)
		}
	}
}

// startLinkLocked starts l's goroutine unless it runs already, was stopped,
// or the gateway is not running (yet, or any more). The caller holds
// routeMu.
func (s *Server) startLinkLocked(l *nodeLink) {
	if l.started || l.stopped || !s.linksRunning || s.linksClosed {
		return
	}
	l.started = true
	ctx, cancel := context.WithCancel(s.ctx)
	l.cancel = cancel
	s.wg.Add(1) // Run's Wait comes after linksClosed, so this never races it
	go func() { // ends when the link is stopped, or at Shutdown
		defer s.wg.Done()
		defer cancel()
		l.run(ctx)
	}()
}

// stopLinkLocked stops l for good; its goroutine takes it down. The caller
// holds routeMu.
func (s *Server) stopLinkLocked(l *nodeLink) {
	l.stopped = true
	if l.cancel != nil {
		l.cancel()
	}
}

// startLinks starts the links of the current table; Run calls it.
func (s *Server) startLinks() {
	s.routeMu.Lock()
	defer s.routeMu.Unlock()
	s.linksRunning = true
	for _, l := range s.routes.Load().links {
		s.startLinkLocked(l)
	}
}

// closeLinks stops every link, and keeps new ones from starting.
func (s *Server) closeLinks() {
	s.routeMu.Lock()
	s.linksClosed = true
	s.routeMu.Unlock()
	s.cancel()
}

// waitTable waits until the gateway routes by a table of version v or
// newer, or ctx ends, asking the watcher to fetch it now. It reports whether
// the table arrived.
func (s *Server) waitTable(ctx context.Context, v uint64) bool {
	for {
		s.changedMu.Lock()
		ch := s.changed
		s.changedMu.Unlock()
		if s.table().Version() >= v {
			return true
		}
		s.kickTable()
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		}
	}
}

// serveTable answers GET /v1/table with the table the gateway routes by.
func (s *Server) serveTable(w http.ResponseWriter, _ *http.Request) {
	tablewatch.ServeTable(w, s.table())
}
