// Package bucket is the consistent-hash routing table shared by the boss,
// gateways and queue nodes: queue name → bucket (the top Bits bits of the
// queue name's xxhash64) → owning node, as in IMVU's design.
//
// A Table is an immutable, versioned snapshot: share it freely between
// goroutines and replace it whole (an atomic.Pointer) when a newer version
// arrives. Join and Leave return the next version and the buckets that moved;
// they are pure and deterministic, so the same history of joins and leaves
// always yields the same table. Only the boss calls them.
//
// A table may also carry pending moves (bucket → target node): the owner
// stays the owner, and Lookup routes to it, until the hand-off completes
// (docs/handoff.md). Advance, CompleteMoves and Settled (move.go) are the
// pure functions the boss publishes them with.
//
// Invariants of every table (check enforces them on decode): the bucket
// count is 2^Bits, every bucket has an owner among the nodes, nodes are
// sorted by id and unique, a move names a bucket and a target among the
// nodes that is not the bucket's owner, and every node owns a bucket or is
// the target of a move (a node that holds nothing and receives nothing is
// not listed).
//
// Balance invariants hold for a table built only by Join and Leave (the
// boss's target layout; it never has moves): each node owns at least
// MinBuckets, and the counts differ by at most one, so the load differential
// max:min is 9:8 or better. A published table with moves pending (or with a
// draining node still holding buckets) need not be balanced; it converges to
// its layout as moves complete. A join steals the new node's
// share one bucket at a time from the nodes holding the most; when that share
// would be under MinBuckets it first splits every bucket in two (bucket b
// becomes 2b and 2b+1 with the same owner: nothing moves). A leave hands the
// leaver's buckets one at a time to the nodes holding the fewest. Ties go to
// the node whose id sorts first.
//
// It imports only xxhash and the standard library.
package bucket

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// MinBuckets is the fewest buckets a node holds (when the table has nodes).
const MinBuckets = 8

// maxBits bounds the table at 2^20 buckets (131,072 nodes at MinBuckets).
const maxBits = 20

// Node is a queue node as the table knows it.
type Node struct {
	ID       string
	LinkAddr string
}

// Move is one bucket changing owner.
type Move struct {
	Bucket   int
	From, To string
}

// Table maps 2^Bits buckets to nodes.
type Table struct {
	version uint64
	bits    uint8
	owners  []int  // bucket → index into nodes
	nodes   []Node // sorted by ID
	// moving maps a bucket to the index into nodes of its move's target;
	// nil when no move is pending. Never mutated once the table is built.
	moving map[int]int
}

// Errors of Join and Leave.
var (
	ErrNodeExists  = errors.New("bucket: node already in the table")
	ErrUnknownNode = errors.New("bucket: node not in the table")
	ErrTableFull   = errors.New("bucket: table at its maximum size")
	// ErrMovesPending: Join and Leave are the instant form of a change and
	// refuse a table with pending moves (Settled applies them first).
	ErrMovesPending = errors.New("bucket: table has pending moves")
	// ErrNotMoving: a completed move that the table does not mark.
	ErrNotMoving = errors.New("bucket: bucket not marked moving")
)

// Empty returns version 0 of a table with no nodes.
func Empty() *Table { return &Table{} }

// Single returns version 1 of a table in which node owns every bucket.
func Single(node Node) *Table {
	t, _, err := Empty().Join(node)
	if err != nil {
		panic(err) // an empty table takes any node
	}
	return t
}

// Hash is the fixed routing hash of a queue name. It must never change:
// changing it would move every queue.
func Hash(queue string) uint64 { return xxhash.Sum64String(queue) }

// Version returns the table's version; every Join or Leave adds one.
func (t *Table) Version() uint64 { return t.version }

// Bits returns k: the table has 2^k buckets.
func (t *Table) Bits() int { return int(t.bits) }

// Buckets returns the number of buckets (0 for a table without nodes).
func (t *Table) Buckets() int { return len(t.owners) }

// Bucket returns the bucket of queue: the top Bits bits of its hash.
func (t *Table) Bucket(queue string) int { return Of(queue, int(t.bits)) }

// Of returns the bucket of queue in a table of 2^bits buckets, as
// Table.Bucket computes it: the top bits bits of its hash. A hand-off
// names its bucket with the bits of the table that made it, which need
// not be the current table's. For bits outside 0..63 (more than an int
// holds, or a frame from a bad peer) it returns -1, which matches no
// bucket.
func Of(queue string, bits int) int {
	switch {
	case bits == 0:
		return 0
	case bits < 0 || bits > 63:
		return -1
	}
	return int(Hash(queue) >> (64 - bits))
}

// Lookup returns the node owning queue, and false for a table without nodes.
// It does not allocate.
func (t *Table) Lookup(queue string) (Node, bool) {
	if len(t.nodes) == 0 {
		return Node{}, false
	}
	return t.nodes[t.owners[t.Bucket(queue)]], true
}

// Owner returns the node owning bucket b.
func (t *Table) Owner(b int) Node { return t.nodes[t.owners[b]] }

// Nodes returns the nodes, sorted by ID.
func (t *Table) Nodes() []Node { return slices.Clone(t.nodes) }

// Counts returns how many buckets each node owns, by node ID.
func (t *Table) Counts() map[string]int {
	c := make(map[string]int, len(t.nodes))
	for _, n := range t.nodes {
		c[n.ID] = 0
	}
	for _, o := range t.owners {
		c[t.nodes[o].ID]++
	}
	return c
}

func (t *Table) String() string {
	return fmt.Sprintf("table v%d: %s on %s", t.version, plural(len(t.owners), "bucket"), plural(len(t.nodes), "node"))
}

// plural is "1 node", "2 nodes".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func (t *Table) index(id string) (int, bool) {
	return slices.BinarySearchFunc(t.nodes, id, func(n Node, id string) int {
		switch {
		case n.ID < id:
			return -1
		case n.ID > id:
			return 1
		}
		return 0
	})
}

// Join returns the next version with node added, and the buckets that moved
// to it. Splitting moves nothing, so the moves are exactly the stolen buckets.
// It refuses a table with pending moves.
func (t *Table) Join(node Node) (*Table, []Move, error) {
	if len(t.moving) > 0 {
		return nil, nil, ErrMovesPending
	}
	if _, ok := t.index(node.ID); ok {
		return nil, nil, fmt.Errorf("%w: %s", ErrNodeExists, node.ID)
	}
	next := &Table{version: t.version + 1, bits: t.bits, owners: slices.Clone(t.owners)}
	pos, _ := t.index(node.ID)
	next.nodes = slices.Insert(slices.Clone(t.nodes), pos, node)
	for i, o := range next.owners { // indexes at or after pos shift by one
		if o >= pos {
			next.owners[i] = o + 1
		}
	}
	if len(t.nodes) == 0 {
		next.bits = 3 // 8 buckets
		next.owners = make([]int, 1<<next.bits)
		return next, nil, nil
	}
	n := len(next.nodes)
	for len(next.owners)/n < MinBuckets {
		if next.bits == maxBits {
			return nil, nil, ErrTableFull
		}
		next.split()
	}
	counts := next.counts()
	share := len(next.owners) / n
	moves := make([]Move, 0, share)
	for range share {
		// The node holding the most gives up its highest bucket.
		donor := -1
		for i, c := range counts {
			if i != pos && (donor < 0 || c > counts[donor]) {
				donor = i
			}
		}
		b := lastIndex(next.owners, donor)
		next.owners[b] = pos
		counts[donor]--
		counts[pos]++
		moves = append(moves, Move{Bucket: b, From: next.nodes[donor].ID, To: node.ID})
	}
	slices.SortFunc(moves, func(a, b Move) int { return a.Bucket - b.Bucket })
	return next, moves, nil
}

// Leave returns the next version without node, and the buckets that moved:
// exactly the leaver's. It refuses a table with pending moves.
func (t *Table) Leave(id string) (*Table, []Move, error) {
	if len(t.moving) > 0 {
		return nil, nil, ErrMovesPending
	}
	pos, ok := t.index(id)
	if !ok {
		return nil, nil, fmt.Errorf("%w: %s", ErrUnknownNode, id)
	}
	next := &Table{version: t.version + 1, bits: t.bits, owners: slices.Clone(t.owners)}
	next.nodes = slices.Delete(slices.Clone(t.nodes), pos, pos+1)
	if len(next.nodes) == 0 {
		next.bits, next.owners = 0, nil
		return next, nil, nil
	}
	counts := make([]int, len(next.nodes))
	for _, o := range t.owners {
		if o != pos {
			counts[shift(o, pos)]++
		}
	}
	var moves []Move
	for b, o := range t.owners {
		if o != pos {
			next.owners[b] = shift(o, pos)
			continue
		}
		// The node holding the fewest takes it.
		heir := 0
		for i, c := range counts {
			if c < counts[heir] {
				heir = i
			}
		}
		next.owners[b] = heir
		counts[heir]++
		moves = append(moves, Move{Bucket: b, From: id, To: next.nodes[heir].ID})
	}
	return next, moves, nil
}

// shift maps a node index of the old table to the new one after removing
// the node at pos.
func shift(o, pos int) int {
	if o > pos {
		return o - 1
	}
	return o
}

// split doubles the buckets: bucket b becomes 2b and 2b+1, same owner.
func (t *Table) split() {
	owners := make([]int, 2*len(t.owners))
	for b, o := range t.owners {
		owners[2*b], owners[2*b+1] = o, o
	}
	t.owners = owners
	t.bits++
}

func (t *Table) counts() []int {
	c := make([]int, len(t.nodes))
	for _, o := range t.owners {
		c[o]++
	}
	return c
}

func lastIndex(s []int, v int) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == v {
			return i
		}
	}
	return -1
}

// Readdress returns the next version in which node, already in the table,
// has a new link address (a restarted node); no bucket moves, and pending
// moves stay pending.
func (t *Table) Readdress(node Node) (*Table, error) {
	pos, ok := t.index(node.ID)
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownNode, node.ID)
	}
	next := &Table{version: t.version + 1, bits: t.bits, owners: t.owners, nodes: slices.Clone(t.nodes), moving: t.moving}
	next.nodes[pos] = node // owners and moving are shared: tables are immutable
	return next, nil
}

// Sum identifies the table's contents (bits, nodes, owners and pending moves;
// not the version) in 16 hex digits: two tables with one version and different sums
// diverged (a boss that lost its state published a version the cluster
// already had).
func (t *Table) Sum() string {
	h := sha256.New()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(t.bits))
	h.Write(b[:])
	for _, n := range t.nodes {
		fmt.Fprintf(h, "%q %q\n", n.ID, n.LinkAddr)
	}
	for _, o := range t.owners {
		binary.BigEndian.PutUint64(b[:], uint64(o))
		h.Write(b[:])
	}
	// Only a table with moves hashes them, so a table without keeps the sum
	// older boss versions computed for it.
	for _, m := range t.Moving() {
		fmt.Fprintf(h, "move %d %q\n", m.Bucket, m.To)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// Renumber returns the same table as version v, which must be newer.
func (t *Table) Renumber(v uint64) (*Table, error) {
	if v <= t.version {
		return nil, fmt.Errorf("bucket: renumber version %d to %d: not newer", t.version, v)
	}
	next := *t // owners, nodes and moving are shared: tables are immutable
	next.version = v
	return &next, nil
}

// tableJSON is the wire and disk form of a Table.
type tableJSON struct {
	Version uint64     `json:"version"`
	Bits    uint8      `json:"bits"`
	Nodes   []nodeJSON `json:"nodes"`
	// Owners[b] indexes Nodes: the owner of bucket b.
	Owners []int `json:"owners"`
	// Moving maps a bucket (decimal) to its move's target node id. Absent
	// when no move is pending, and in tables written before moves existed.
	Moving map[string]string `json:"moving,omitempty"`
}

type nodeJSON struct {
	ID       string `json:"id"`
	LinkAddr string `json:"link_addr"`
}

// MarshalJSON encodes the table as {"version", "bits", "nodes": [{"id",
// "link_addr"}], "owners": [node index per bucket], "moving": {"<bucket>":
// "<target node id>"}}, "moving" only when a move is pending.
func (t *Table) MarshalJSON() ([]byte, error) {
	j := tableJSON{Version: t.version, Bits: t.bits, Nodes: make([]nodeJSON, len(t.nodes)), Owners: t.owners}
	for i, n := range t.nodes {
		j.Nodes[i] = nodeJSON(n)
	}
	if len(t.moving) > 0 {
		j.Moving = make(map[string]string, len(t.moving))
		for b, to := range t.moving {
			j.Moving[strconv.Itoa(b)] = t.nodes[to].ID
		}
	}
	if j.Owners == nil {
		j.Owners = []int{}
	}
	return json.Marshal(j)
}

// UnmarshalJSON decodes what MarshalJSON encodes, and refuses a table that
// breaks the invariants a lookup relies on.
func (t *Table) UnmarshalJSON(b []byte) error {
	var j tableJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("bucket: decode table: %w", err)
	}
	next := Table{version: j.Version, bits: j.Bits}
	if len(j.Owners) > 0 {
		next.owners = j.Owners
	}
	for _, n := range j.Nodes {
		next.nodes = append(next.nodes, Node(n))
	}
	for bs, id := range j.Moving {
		b, err := strconv.Atoi(bs)
		if err != nil || strconv.Itoa(b) != bs {
			return fmt.Errorf("bucket: decode table: moving bucket %q is not a bucket number", bs)
		}
		to, ok := next.index(id)
		if !ok {
			return fmt.Errorf("bucket: decode table: bucket %d moving to %q, not a node of the table", b, id)
		}
		if next.moving == nil {
			next.moving = make(map[int]int, len(j.Moving))
		}
		next.moving[b] = to
	}
	if err := next.check(); err != nil {
		return fmt.Errorf("bucket: decode table: %w", err)
	}
	*t = next
	return nil
}

// check verifies the invariants every table keeps (see the package
// documentation): what Lookup relies on, that moves are well formed, and
// that no node is listed idle. Balance is not checked: a published table
// with pending moves need not be balanced.
func (t *Table) check() error {
	if len(t.nodes) == 0 {
		if len(t.owners) != 0 || t.bits != 0 {
			return errors.New("buckets without nodes")
		}
		return nil
	}
	if t.bits > maxBits {
		return fmt.Errorf("%d bits, more than %d", t.bits, maxBits)
	}
	if len(t.owners) != 1<<t.bits {
		return fmt.Errorf("%d owners for %d bits", len(t.owners), t.bits)
	}
	for i, n := range t.nodes {
		if n.ID == "" {
			return errors.New("a node without an id")
		}
		if i > 0 && t.nodes[i-1].ID >= n.ID {
			return fmt.Errorf("nodes not sorted and unique at %q", n.ID)
		}
	}
	used := make([]bool, len(t.nodes))
	for b, o := range t.owners {
		if o < 0 || o >= len(t.nodes) {
			return fmt.Errorf("bucket %d owned by node index %d of %d", b, o, len(t.nodes))
		}
		used[o] = true
	}
	for b, to := range t.moving {
		switch {
		case b < 0 || b >= len(t.owners):
			return fmt.Errorf("move of bucket %d, out of %d buckets", b, len(t.owners))
		case to < 0 || to >= len(t.nodes):
			return fmt.Errorf("bucket %d moving to node index %d of %d", b, to, len(t.nodes))
		case to == t.owners[b]:
			return fmt.Errorf("bucket %d moving to its owner %q", b, t.nodes[to].ID)
		}
		used[to] = true
	}
	for i, u := range used {
		if !u {
			return fmt.Errorf("node %q owns no bucket and receives none", t.nodes[i].ID)
		}
	}
	return nil
}
