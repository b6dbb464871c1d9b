package boss

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
)

// This file is the boss's pure core: which members are the live queue nodes,
// and how the table becomes one of exactly those nodes. No I/O, no clock.

// liveNodes returns the live queue nodes among peers, one per id, sorted by
// id: when two incarnations of an id are live, the newer Started wins (ties
// go to the greater memberlist name, so the choice is deterministic). Nodes
// without a link address are left out. winners maps each id to the peer
// chosen, those without a link address included.
func liveNodes(peers []member.Peer) (nodes []bucket.Node, winners map[string]member.Peer) {
	winners = make(map[string]member.Peer)
	for _, p := range peers {
		if p.Meta.Role != member.RoleQueueNode {
			continue
		}
		w, ok := winners[p.Meta.ID]
		if !ok || newer(p, w) {
			winners[p.Meta.ID] = p
		}
	}
	for id, p := range winners {
		if p.Meta.LinkAddr != "" {
			nodes = append(nodes, bucket.Node{ID: id, LinkAddr: p.Meta.LinkAddr})
		}
	}
	slices.SortFunc(nodes, func(a, b bucket.Node) int { return cmp.Compare(a.ID, b.ID) })
	return nodes, winners
}

// newer reports whether incarnation a of an id supersedes b.
func newer(a, b member.Peer) bool {
	if a.Meta.Started != b.Meta.Started {
		return a.Meta.Started > b.Meta.Started
	}
	return a.Name > b.Name
}

// plan is how one reconcile changes the table.
type plan struct {
	next        *bucket.Table // cur itself when nothing changes
	left        []string
	joined      []string
	readdressed []string
	moves       []bucket.Move
	// failed lists nodes that could not join (the table is at its maximum
	// size); they stay out and are retried at the next reconcile.
	failed []error
}

func (p plan) changed() bool {
	return len(p.left)+len(p.joined)+len(p.readdressed) > 0
}

// planTable returns how cur becomes a table of exactly the alive nodes
// (sorted by id, unique): the table nodes not alive leave, in id order; then
// the alive nodes not in the table join, in id order; then nodes whose link
// address changed are readdressed. Each step adds one to the version.
func planTable(cur *bucket.Table, alive []bucket.Node) plan {
	p := plan{next: cur}
	want := make(map[string]bucket.Node, len(alive))
	for _, n := range alive {
		want[n.ID] = n
	}
	have := make(map[string]bucket.Node)
	for _, n := range cur.Nodes() { // sorted by id
		have[n.ID] = n
		if _, ok := want[n.ID]; ok {
			continue
		}
		next, moves, err := p.next.Leave(n.ID)
		if err != nil {
			panic(fmt.Sprintf("boss: leave of a table node failed: %v", err)) // n is in the table
		}
		p.next, p.left, p.moves = next, append(p.left, n.ID), append(p.moves, moves...)
	}
	for _, n := range alive {
		if _, ok := have[n.ID]; ok {
			continue
		}
		next, moves, err := p.next.Join(n)
		if err != nil {
			p.failed = append(p.failed, fmt.Errorf("join %s: %w", n.ID, err))
			continue
		}
		p.next, p.joined, p.moves = next, append(p.joined, n.ID), append(p.moves, moves...)
	}
	for _, n := range alive {
		if h, ok := have[n.ID]; !ok || h.LinkAddr == n.LinkAddr {
			continue
		}
		next, err := p.next.Readdress(n)
		if err != nil {
			panic(fmt.Sprintf("boss: readdress of a table node failed: %v", err)) // n is in the table
		}
		p.next, p.readdressed = next, append(p.readdressed, n.ID)
	}
	return p
}
