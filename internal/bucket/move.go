package bucket

import (
	"fmt"
	"maps"
	"slices"
)

// This file is the two-phase form of a change (docs/handoff.md, "The
// boss"): instead of giving a bucket to its new owner at once, the published
// table marks it moving, the owner hands it off, and the boss flips the
// owner when the hand-off is reported. Everything here is pure: the boss
// brings its clock, its view of membership and its reports.

// Moving returns the pending moves, sorted by bucket: From is the bucket's
// owner, To its target.
func (t *Table) Moving() []Move {
	out := make([]Move, 0, len(t.moving))
	for b, to := range t.moving {
		out = append(out, Move{Bucket: b, From: t.nodes[t.owners[b]].ID, To: t.nodes[to].ID})
	}
	slices.SortFunc(out, func(a, c Move) int { return a.Bucket - c.Bucket })
	return out
}

// MovingCount returns how many buckets are marked moving.
func (t *Table) MovingCount() int { return len(t.moving) }

// Target returns the node bucket b is moving to, and false when b is not
// moving.
func (t *Table) Target(b int) (Node, bool) {
	to, ok := t.moving[b]
	if !ok {
		return Node{}, false
	}
	return t.nodes[to], true
}

// IsMoving reports whether bucket b is marked moving from node from to node
// to.
func (t *Table) IsMoving(b int, from, to string) bool {
	tn, ok := t.moving[b]
	return ok && t.nodes[t.owners[b]].ID == from && t.nodes[tn].ID == to
}

// CompleteMove returns the next version in which to owns b, which t marks
// moving from from to to; ErrNotMoving when it does not.
func (t *Table) CompleteMove(b int, from, to string) (*Table, error) {
	next, errs := t.CompleteMoves([]Move{{Bucket: b, From: from, To: to}})
	return next, errs[0]
}

// CompleteMoves applies several completed hand-offs in one version: each
// move that t marks (Bucket moving From → To) flips its owner to To and
// loses its mark. errs[i] is nil for an applied move and wraps ErrNotMoving
// for one t does not mark. The next version is t's plus one when any move
// applied; otherwise it is t itself. A former owner left holding nothing is
// no longer listed.
func (t *Table) CompleteMoves(ms []Move) (next *Table, errs []error) {
	return t.handOver(ms, nil, true)
}

// HandedOff applies hand-offs that happened, in one version, whether or not
// t still marks them: each move whose bucket From still owns flips to To,
// which must be in live, and any mark on the bucket goes
// (the next Advance marks it again if the layout wants it elsewhere). A
// hand-off is a fact once the new owner holds the queues: the old owner
// has given them up and only forwards to it, so a table that kept the
// bucket with the old owner, because a split or a new layout changed the
// mark meanwhile or the move was given up while the report was on its way,
// would leave the bucket's queues where the table does not look: the old
// owner would never move them again. errs[i] wraps ErrNotMoving for a move
// whose From no longer owns the bucket, or whose To is not in live.
func (t *Table) HandedOff(ms []Move, live []Node) (next *Table, errs []error) {
	return t.handOver(ms, live, false)
}

// handOver flips each move whose From owns its bucket: only those t marks
// when marked, else those whose To is in live (which also gives the
// addresses of To nodes t does not list).
func (t *Table) handOver(ms []Move, live []Node, marked bool) (next *Table, errs []error) {
	isLive := func(id string) bool {
		return marked || slices.ContainsFunc(live, func(n Node) bool { return n.ID == id })
	}
	errs = make([]error, len(ms))
	owners, targets := t.ids()
	applied := 0
	for i, m := range ms {
		switch {
		case m.Bucket < 0 || m.Bucket >= len(owners) || m.To == m.From || (marked && (targets[m.Bucket] != m.To || owners[m.Bucket] != m.From)):
			errs[i] = t.notMoving(m)
			continue
		case owners[m.Bucket] != m.From:
			errs[i] = fmt.Errorf("%w: bucket %d is owned by %s in table version %d, not %s", ErrNotMoving, m.Bucket, owners[m.Bucket], t.version, m.From)
			continue
		case !isLive(m.To):
			errs[i] = fmt.Errorf("%w: bucket %d: node %s is not a live queue node", ErrNotMoving, m.Bucket, m.To)
			continue
		}
		owners[m.Bucket] = m.To
		delete(targets, m.Bucket)
		applied++
	}
	if applied == 0 {
		return t, errs
	}
	addr := func(id string) Node {
		if _, ok := t.index(id); !ok {
			if i := slices.IndexFunc(live, func(n Node) bool { return n.ID == id }); i >= 0 {
				return live[i]
			}
		}
		return t.addr(id)
	}
	return build(t.version+1, t.bits, owners, targets, addr), errs
}

func (t *Table) notMoving(m Move) error {
	switch {
	case m.Bucket < 0 || m.Bucket >= len(t.owners):
		return fmt.Errorf("%w: bucket %d is not in a table of %d buckets", ErrNotMoving, m.Bucket, len(t.owners))
	case !t.hasMove(m.Bucket):
		return fmt.Errorf("%w: bucket %d (owner %s) is not moving in table version %d", ErrNotMoving, m.Bucket, t.Owner(m.Bucket).ID, t.version)
	}
	to, _ := t.Target(m.Bucket)
	return fmt.Errorf("%w: bucket %d is moving from %s to %s in table version %d, not from %s to %s",
		ErrNotMoving, m.Bucket, t.Owner(m.Bucket).ID, to.ID, t.version, m.From, m.To)
}

func (t *Table) hasMove(b int) bool {
	_, ok := t.moving[b]
	return ok
}

// Settled returns the next version with every pending move applied, as if
// each hand-off had completed (the instant form; the boss uses it when
// hand-off is off). Without pending moves it returns t itself.
func (t *Table) Settled() *Table {
	if len(t.moving) == 0 {
		return t
	}
	owners, targets := t.ids()
	for b, to := range targets {
		owners[b] = to
	}
	return build(t.version+1, t.bits, owners, nil, t.addr)
}

// Step says how Advance changed the table.
type Step struct {
	// Assigned are buckets whose owner was not live, given at once to their
	// layout owner (From is the lost owner): their queues start afresh.
	Assigned []Move
	// Marked are the moves newly marked; Unmarked those whose mark was
	// removed (the target is not live, the layout changed, or the move was
	// given up).
	Marked, Unmarked []Move
	// Split is true when the table doubled its buckets to match the
	// layout's (a split moves nothing; a move pending on bucket b is then
	// pending on 2b and 2b+1, which may exceed maxMoves for a while).
	Split bool
}

// Advance returns the next version of t, the published table, moved one
// step toward layout, the table the boss would publish if every move were
// instant (built by Join and Leave, without moves). live are the live
// nodes, those the layout owns included, with their current link
// addresses. The rules of docs/handoff.md, in this order:
//
//  1. A bucket whose owner is not live is given to its layout owner at
//     once: nobody can hand it off.
//  2. A bucket marked moving whose target is not live, whose target is no
//     longer its layout owner, or that is listed in giveUp (bucket numbers
//     of t) loses its mark. A bucket given up is not marked again in this
//     step: it is retried at a later one.
//  3. A bucket whose owner is live and differs from its layout owner is
//     marked moving to the layout owner, in bucket order, while fewer than
//     maxMoves buckets are moving.
//
// When the layout has more buckets than t, t first splits to match; when it
// has fewer, each layout bucket covers several of t's. A layout without
// nodes empties the table. Node addresses come from live (then the layout,
// then t), and a node that owns nothing and is targeted by nothing is not
// listed. When nothing changes Advance returns t itself; otherwise the
// version is t's plus one.
func (t *Table) Advance(layout *Table, live []Node, maxMoves int, giveUp []int) (*Table, Step) {
	var step Step
	if len(layout.owners) == 0 {
		if len(t.owners) == 0 {
			return t, step
		}
		for b, o := range t.owners {
			if !slices.ContainsFunc(live, func(n Node) bool { return n.ID == t.nodes[o].ID }) {
				step.Assigned = append(step.Assigned, Move{Bucket: b, From: t.nodes[o].ID})
			}
		}
		return &Table{version: t.version + 1}, step
	}
	liveBy := make(map[string]Node, len(live))
	for _, n := range live {
		liveBy[n.ID] = n
	}
	addr := func(id string) Node {
		if n, ok := liveBy[id]; ok {
			return n
		}
		if i, ok := layout.index(id); ok {
			return layout.nodes[i]
		}
		return t.addr(id)
	}
	bits := max(t.bits, layout.bits)
	owners := make([]string, 1<<bits)
	targets := make(map[int]string)
	skip := make(map[int]bool, len(giveUp))
	if len(t.owners) == 0 {
		for b := range owners {
			owners[b] = layout.nodes[layout.owners[b>>(bits-layout.bits)]].ID
			step.Assigned = append(step.Assigned, Move{Bucket: b, To: owners[b]})
		}
		return build(t.version+1, bits, owners, nil, addr), step
	}
	step.Split = bits > t.bits
	tOwners, tTargets := t.ids()
	for b := range owners {
		owners[b] = tOwners[b>>(bits-t.bits)]
	}
	for b, to := range tTargets {
		for i := range 1 << (bits - t.bits) {
			targets[b<<(bits-t.bits)+i] = to
		}
	}
	for _, g := range giveUp {
		for i := range 1 << (bits - t.bits) {
			skip[g<<(bits-t.bits)+i] = true
		}
	}
	want := func(b int) string { return layout.nodes[layout.owners[b>>(bits-layout.bits)]].ID }
	for b, owner := range owners {
		w := want(b)
		if _, ok := liveBy[owner]; !ok {
			owners[b] = w
			delete(targets, b)
			step.Assigned = append(step.Assigned, Move{Bucket: b, From: owner, To: w})
			continue
		}
		if to, ok := targets[b]; ok {
			if _, live := liveBy[to]; !live || to != w || skip[b] {
				delete(targets, b)
				step.Unmarked = append(step.Unmarked, Move{Bucket: b, From: owner, To: to})
			}
		}
	}
	for b, owner := range owners {
		if len(targets) >= maxMoves {
			break
		}
		w := want(b)
		if _, moving := targets[b]; moving || owner == w || skip[b] {
			continue
		}
		if _, live := liveBy[w]; !live {
			continue
		}
		targets[b] = w
		step.Marked = append(step.Marked, Move{Bucket: b, From: owner, To: w})
	}
	next := build(t.version+1, bits, owners, targets, addr)
	if next.sameContents(t) {
		return t, Step{}
	}
	return next, step
}

// ids returns the owner id of every bucket and the target id of every
// moving bucket: the form the builders above edit.
func (t *Table) ids() (owners []string, targets map[int]string) {
	owners = make([]string, len(t.owners))
	for b, o := range t.owners {
		owners[b] = t.nodes[o].ID
	}
	targets = make(map[int]string, len(t.moving))
	for b, to := range t.moving {
		targets[b] = t.nodes[to].ID
	}
	return owners, targets
}

// addr returns t's node with id (an id not in t: just the id).
func (t *Table) addr(id string) Node {
	if i, ok := t.index(id); ok {
		return t.nodes[i]
	}
	return Node{ID: id}
}

// build makes a table from owner and target ids, listing exactly the nodes
// named, with the addresses addr gives.
func build(version uint64, bits uint8, owners []string, targets map[int]string, addr func(string) Node) *Table {
	named := make(map[string]bool)
	for _, id := range owners {
		named[id] = true
	}
	for _, id := range targets {
		named[id] = true
	}
	ids := slices.Sorted(maps.Keys(named))
	index := make(map[string]int, len(ids))
	t := &Table{version: version, bits: bits, owners: make([]int, len(owners)), nodes: make([]Node, len(ids))}
	for i, id := range ids {
		t.nodes[i], index[id] = addr(id), i
		t.nodes[i].ID = id
	}
	for b, id := range owners {
		t.owners[b] = index[id]
	}
	if len(targets) > 0 {
		t.moving = make(map[int]int, len(targets))
		for b, id := range targets {
			t.moving[b] = index[id]
		}
	}
	if len(owners) == 0 {
		t.bits = 0
	}
	return t
}

// sameContents reports whether t and u have the same bits, nodes, owners
// and moves (versions aside).
func (t *Table) sameContents(u *Table) bool {
	return t.bits == u.bits && slices.Equal(t.nodes, u.nodes) && slices.Equal(t.owners, u.owners) && maps.Equal(t.moving, u.moving)
}
