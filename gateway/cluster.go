package gateway

import (
	"context"
	"net/http"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/member"
)

const (
	// linkWarmup bounds how long a new table waits for the links to its new
	// nodes before the gateway routes by it.
	linkWarmup = time.Second
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

// startCluster joins the membership and makes the cluster runtime install
// the boss's tables with setTable (Run starts following them). It runs at
// the end of New, once the listeners are bound.
func (s *Server) startCluster() error {
	c, err := cluster.Start(cluster.Config{
		Member:  *s.cfg.Member,
		Meta:    member.Meta{Role: member.RoleGateway, ID: s.cfg.GatewayID, HTTPAddr: s.InternalAddr(), ClientAddr: s.Addr()},
		BossURL: s.cfg.BossURL,
		Install: s.setTable,
		Logger:  s.log,
	})
	if err != nil {
		return err
	}
	s.cluster = c
	return nil
}

// kickTable asks the boss for the table now; standalone, it does nothing.
func (s *Server) kickTable() {
	if s.cluster != nil {
		s.cluster.Kick()
	}
}

// leaveCluster leaves the membership gracefully (idempotent); standalone,
// it does nothing.
func (s *Server) leaveCluster() {
	if s.cluster != nil {
		s.cluster.Leave()
	}
}

// setTable makes next the table the gateway routes by, if it is newer than
// the current one, and reconciles the links: it starts one for each new node
// (and for a node whose link address changed: a restarted node), waits a
// little for them to come up so that the first requests routed to a new node
// do not find its link still dialling, switches routing over, and then stops
// the links of nodes that left the table or changed address. Stopping a link
// fails its pending requests (UNAVAILABLE) and ends the subscriptions made
// through it (NODE_LOST). It is the cluster runtime's install hook: it runs
// for each newer table, one at a time, and the waiters of that version
// (waitTable) are released once it returns.
func (s *Server) setTable(_, next *bucket.Table) {
	cur := s.routes.Load()
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
// newer, or ctx ends, asking the boss for it now. It reports whether the
// table arrived. Standalone, no other table ever comes: it waits out ctx.
func (s *Server) waitTable(ctx context.Context, v uint64) bool {
	if s.cluster == nil {
		if s.table().Version() >= v {
			return true
		}
		<-ctx.Done()
		return false
	}
	_, err := s.cluster.WaitVersion(ctx, v)
	return err == nil
}

// serveTable answers GET /v1/table with the table the gateway routes by.
func (s *Server) serveTable(w http.ResponseWriter, _ *http.Request) {
	cluster.ServeTable(w, s.table())
}
