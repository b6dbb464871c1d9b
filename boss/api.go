package boss

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/cluster"
	"github.com/imq-dev/imq/internal/member"
	imqpb "github.com/imq-dev/imq/proto"
)

const (
	// MaxWait is the longest wait a long poll of /v1/table may ask for.
	MaxWait = 60 * time.Second
	// maxWaiters bounds concurrent long polls; one more is answered 503.
	// Each gateway and queue node holds one.
	maxWaiters = 16384
	// maxVarzBytes bounds one member's /varz in /v1/nodes.
	maxVarzBytes = 256 << 10
	// varzParallel bounds concurrent /varz fetches for one /v1/nodes.
	varzParallel = 32
)

// serveTable answers GET /v1/table[?after=V[&wait=D]]: without after, the
// current table; with it, a table newer than V as soon as there is one
// (200), or 304 Not Modified when none came within the wait (default
// cluster.DefaultPollWait, at most MaxWait; "25s" or whole seconds).
func (b *Boss) serveTable(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if !q.Has("after") {
		if q.Has("wait") {
			httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "wait needs after=VERSION")
			return
		}
		cluster.ServeTable(w, b.Table())
		return
	}
	after, err := strconv.ParseUint(q.Get("after"), 10, 64)
	if err != nil {
		httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, fmt.Sprintf("after=%q is not a table version (an unsigned integer)", q.Get("after")))
		return
	}
	wait := cluster.DefaultPollWait
	if q.Has("wait") {
		if wait, err = parseWait(q.Get("wait")); err != nil {
			httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, err.Error())
			return
		}
	}
	if t := b.Table(); t.Version() > after {
		cluster.ServeTable(w, t)
		return
	}
	if n := b.waiters.Add(1); n > maxWaiters {
		b.waiters.Add(-1)
		httpError(w, http.StatusServiceUnavailable, imqpb.Code_UNAVAILABLE, "too many table long polls waiting; retry later")
		return
	}
	defer b.waiters.Add(-1)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		ch := b.published()
		if t := b.Table(); t.Version() > after {
			cluster.ServeTable(w, t)
			return
		}
		select {
		case <-ch:
		case <-timer.C:
			notModified(w, b.Table())
			return
		case <-b.closing:
			notModified(w, b.Table())
			return
		case <-r.Context().Done():
			return
		}
	}
}

// parseWait reads a long poll's wait: a Go duration ("25s", "500ms") or
// whole seconds ("25"), from 0 to MaxWait.
func parseWait(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		n, nerr := strconv.ParseUint(s, 10, 32)
		if nerr != nil {
			return 0, fmt.Errorf("wait=%q is not a duration (such as 25s) or whole seconds", s)
		}
		d = time.Duration(n) * time.Second
	}
	if d < 0 || d > MaxWait {
		return 0, fmt.Errorf("wait=%q must be between 0 and %s", s, MaxWait)
	}
	return d, nil
}

func notModified(w http.ResponseWriter, t *bucket.Table) {
	w.Header().Set("X-IMQ-Table-Version", strconv.FormatUint(t.Version(), 10))
	w.WriteHeader(http.StatusNotModified)
}

// httpError answers with the JSON error shape of every IMQ HTTP API:
// {"error": {"code": "BAD_REQUEST", "message": "..."}}.
func httpError(w http.ResponseWriter, status int, code imqpb.Code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-IMQ-Error", code.String())
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": code.String(), "message": msg}})
}

// Statuses of /v1/nodes members, for people.
const (
	StatusServing      = "IMQ node is available and accepting connections"
	StatusJoining      = "joining: not yet in the bucket table"
	StatusReaddressing = "restarted on a new link address: the bucket table is being updated"
	StatusNoLink       = "not routable: announces no link address"
	StatusSuperseded   = "superseded: a newer incarnation of this id is live"
	StatusLost         = "lost: in the table but not a live member"
	StatusDraining     = "draining: its buckets are moving to other nodes"
	StatusDrained      = "drained: holds no buckets and receives none; it can be stopped"
	StatusGateway      = "gateway is available and accepting connections"
	StatusBoss         = "boss: owns the bucket table"
	// StatusBossSuperseded is an older boss, such as a killed one not yet
	// declared dead, while a newer one is live: members follow the newest.
	StatusBossSuperseded = "superseded: a newer boss is live and owns the bucket table"
	StatusUnknownRole    = "member of an unknown role"
)

// Member states in /v1/nodes. Membership reports suspects (members failing
// probes but not yet declared dead) as alive.
const (
	StateAlive = "alive"
	StateLost  = "lost" // a table node that is not a live member
)

// NodesView is the JSON answer of GET /v1/nodes.
type NodesView struct {
	TableVersion uint64 `json:"table_version"`
	Buckets      int    `json:"buckets"`
	// Ready is false while a restarted boss waits to hear from the cluster
	// before removing nodes.
	Ready bool `json:"ready"`
	// Handoff says buckets move by hand-off (Config.Handoff); MaxMoves
	// bounds how many move at once.
	Handoff  bool `json:"handoff"`
	MaxMoves int  `json:"max_moves"`
	// Moving lists the cluster's moves in progress, by bucket.
	Moving []MoveView `json:"moving"`
	// Draining lists the nodes an operator drained, sorted.
	Draining []string     `json:"draining"`
	Members  []MemberView `json:"members"`
}

// MoveView is one bucket marked moving in /v1/nodes.
type MoveView struct {
	Bucket int    `json:"bucket"`
	From   string `json:"from"`
	To     string `json:"to"`
	// Since is when the boss first published the mark (a restarted boss:
	// when it started); the move is given up at Since + Config.MoveTimeout.
	Since time.Time `json:"since,omitzero"`
}

// MemberView is one live member in /v1/nodes, or a table node that is not
// live (State "lost").
type MemberView struct {
	Name       string      `json:"name,omitempty"` // memberlist name; empty for a lost node
	Role       member.Role `json:"role"`
	ID         string      `json:"id"`
	GossipAddr string      `json:"gossip_addr,omitempty"`
	LinkAddr   string      `json:"link_addr,omitempty"`
	HTTPAddr   string      `json:"http_addr,omitempty"`   // internal: the boss's API, a gateway's or queue node's internal listener
	ClientAddr string      `json:"client_addr,omitempty"` // a gateway's client address (/ws)
	State      string      `json:"state"`
	Status     string      `json:"status"`
	// Buckets is how many buckets a queue node owns (absent for other
	// roles).
	Buckets *int `json:"buckets,omitempty"`
	// Draining, MovingOut and MovingIn are a queue node's: whether an
	// operator drained it, and how many of its buckets are moving away and
	// how many are moving to it.
	Draining  bool `json:"draining,omitempty"`
	MovingOut int  `json:"moving_out,omitempty"`
	MovingIn  int  `json:"moving_in,omitempty"`
	// TableVersion is the table version the member holds.
	TableVersion uint64    `json:"table_version"`
	Started      time.Time `json:"started,omitzero"`
	// Varz is the member's own /varz, fetched from HTTPAddr within
	// Config.PeerTimeout; VarzError says why it is missing.
	Varz      json.RawMessage `json:"varz,omitempty"`
	VarzError string          `json:"varz_error,omitempty"`
}

func (b *Boss) serveNodes(w http.ResponseWriter, r *http.Request) {
	v := b.nodes(r.Context())
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// nodes builds the /v1/nodes view, fetching every member's /varz at once.
func (b *Boss) nodes(ctx context.Context) NodesView {
	peers := b.member.Peers()
	t := b.Table()
	counts := t.Counts()
	inTable := make(map[string]bucket.Node)
	for _, n := range t.Nodes() {
		inTable[n.ID] = n
	}
	_, winners := liveNodes(peers)
	newestBoss, _ := member.NewestBoss(peers) // the boss members follow
	self := b.member.Name()
	draining := b.Draining()
	view := NodesView{
		TableVersion: t.Version(), Buckets: t.Buckets(), Ready: b.Ready(), Handoff: b.cfg.Handoff, MaxMoves: b.cfg.MaxMoves,
		Moving: []MoveView{}, Draining: draining, Members: make([]MemberView, 0, len(peers)),
	}
	since := *b.movesView.Load()
	movingOut, movingIn := make(map[string]int), make(map[string]int)
	for _, m := range t.Moving() {
		view.Moving = append(view.Moving, MoveView{Bucket: m.Bucket, From: m.From, To: m.To, Since: since[m].UTC()})
		movingOut[m.From]++
		movingIn[m.To]++
	}
	live := make(map[string]bool)
	for _, p := range peers {
		m := MemberView{
			Name: p.Name, Role: p.Meta.Role, ID: p.Meta.ID, GossipAddr: p.Addr, LinkAddr: p.Meta.LinkAddr,
			HTTPAddr: p.Meta.HTTPAddr, ClientAddr: p.Meta.ClientAddr, State: StateAlive, TableVersion: p.Meta.TableVersion,
		}
		if p.Meta.Started > 0 {
			m.Started = time.UnixMilli(p.Meta.Started).UTC()
		}
		switch p.Meta.Role {
		case member.RoleBoss:
			m.Status = StatusBoss
			if p.Name != newestBoss.Name {
				m.Status = StatusBossSuperseded
			}
		case member.RoleGateway:
			m.Status = StatusGateway
		case member.RoleQueueNode:
			n := 0
			node, ok := inTable[p.Meta.ID]
			m.Draining = slices.Contains(draining, p.Meta.ID)
			switch {
			case winners[p.Meta.ID].Name != p.Name:
				m.Status = StatusSuperseded
			case p.Meta.LinkAddr == "":
				m.Status = StatusNoLink
			case !ok && m.Draining:
				m.Status = StatusDrained
			case !ok:
				m.Status = StatusJoining
			case m.Draining && node.LinkAddr == p.Meta.LinkAddr:
				m.Status = StatusDraining
			case node.LinkAddr != p.Meta.LinkAddr:
				m.Status = StatusReaddressing
			default:
				m.Status = StatusServing
			}
			if ok && m.Status != StatusSuperseded {
				n = counts[p.Meta.ID]
				m.MovingOut, m.MovingIn = movingOut[p.Meta.ID], movingIn[p.Meta.ID]
				live[p.Meta.ID] = true
			}
			m.Buckets = &n
		default:
			m.Status = StatusUnknownRole
		}
		view.Members = append(view.Members, m)
	}
	for _, n := range t.Nodes() {
		if !live[n.ID] {
			c := counts[n.ID]
			view.Members = append(view.Members, MemberView{
				Role: member.RoleQueueNode, ID: n.ID, LinkAddr: n.LinkAddr, State: StateLost, Status: StatusLost, Buckets: &c,
				Draining: slices.Contains(draining, n.ID), MovingOut: movingOut[n.ID], MovingIn: movingIn[n.ID],
			})
		}
	}
	slices.SortStableFunc(view.Members, func(a, c MemberView) int {
		if d := roleRank(a.Role) - roleRank(c.Role); d != 0 {
			return d
		}
		if d := strings.Compare(a.ID, c.ID); d != 0 {
			return d
		}
		return a.Started.Compare(c.Started)
	})
	b.fillVarz(ctx, view.Members, self)
	return view
}

func roleRank(r member.Role) int {
	switch r {
	case member.RoleBoss:
		return 0
	case member.RoleQueueNode:
		return 1
	case member.RoleGateway:
		return 2
	}
	return 3
}

// fillVarz fetches the members' /varz concurrently, each within
// PeerTimeout; the boss's own comes from memory.
func (b *Boss) fillVarz(ctx context.Context, ms []MemberView, self string) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, varzParallel)
	for i := range ms {
		m := &ms[i]
		switch {
		case m.State == StateLost:
			continue
		case m.Name == self:
			if raw, err := json.Marshal(b.varz()); err == nil {
				m.Varz = raw
			}
			continue
		}
		wg.Add(1)
		go func() { // ends within PeerTimeout
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			raw, err := b.fetchVarz(ctx, member.Peer{Addr: m.GossipAddr, Meta: member.Meta{HTTPAddr: m.HTTPAddr}})
			if err != nil {
				m.VarzError = err.Error()
				return
			}
			m.Varz = raw
		}()
	}
	wg.Wait()
}

func (b *Boss) fetchVarz(ctx context.Context, p member.Peer) (json.RawMessage, error) {
	var raw []byte
	err := b.peerGet(ctx, p, "/varz", b.cfg.PeerTimeout, func(r io.Reader) (err error) {
		raw, err = io.ReadAll(io.LimitReader(r, maxVarzBytes+1))
		return err
	})
	switch {
	case err != nil:
		return nil, err
	case len(raw) > maxVarzBytes:
		return nil, fmt.Errorf("/varz is larger than %d bytes", maxVarzBytes)
	case !json.Valid(raw):
		return nil, fmt.Errorf("/varz is not JSON")
	}
	return json.RawMessage(raw), nil
}

// Varz is the boss's JSON state at /varz.
type Varz struct {
	ID           string   `json:"id"`
	Addr         string   `json:"addr"`
	GossipAddr   string   `json:"gossip_addr"`
	TableVersion uint64   `json:"table_version"`
	Nodes        int      `json:"nodes"`
	Buckets      int      `json:"buckets"`
	Moving       int      `json:"buckets_moving"`
	Draining     []string `json:"draining"`
	Handoff      bool     `json:"handoff"`
	// Insecure: no cluster key, hand-off reports are accepted unsigned.
	Insecure  bool      `json:"insecure"`
	Members   int       `json:"members"`
	Ready     bool      `json:"ready"`
	DataDir   string    `json:"data_dir"`
	Persisted bool      `json:"persisted"` // the last write of the state succeeded (false without a DataDir)
	Waiters   int64     `json:"table_waiters"`
	Started   time.Time `json:"started"`
}

func (b *Boss) varz() any {
	t := b.Table()
	return Varz{
		ID: b.cfg.ID, Addr: b.Addr(), GossipAddr: b.GossipAddr(), TableVersion: t.Version(),
		Nodes: len(t.Nodes()), Buckets: t.Buckets(), Moving: t.MovingCount(), Draining: b.Draining(),
		Handoff: b.cfg.Handoff, Insecure: b.reportAuth == nil, Members: len(b.member.Peers()), Ready: b.Ready(),
		DataDir: b.cfg.DataDir, Persisted: b.cfg.DataDir != "" && !b.persistFailed.Load(),
		Waiters: b.waiters.Load(), Started: b.started.UTC(),
	}
}
