// Package bucket is the consistent-hash routing table shared by the boss,
// gateways and queue nodes: queue name → bucket (the top Bits bits of the
// queue name's xxhash64) → owning node.
//
// A Table is an immutable, versioned snapshot: share it freely between
// goroutines and replace it whole (an atomic.Pointer) when a newer version
// arrives. It imports only xxhash. The rebalancing algorithm (joins steal,
// splits, leaves) arrives with the boss; for now a table is built with Single.
package bucket

import (
	"fmt"

	"github.com/cespare/xxhash/v2"
)

// Node is a queue node as the table knows it.
type Node struct {
	ID       string
	LinkAddr string
}

// Table maps 2^Bits buckets to nodes.
type Table struct {
	version uint64
	bits    uint8
	owners  []int // bucket → index into nodes
	nodes   []Node
}

// Single returns version 1 of a table in which node owns every bucket.
func Single(node Node) *Table {
	return &Table{version: 1, bits: 0, owners: []int{0}, nodes: []Node{node}}
}

// Hash is the fixed routing hash of a queue name. It must never change:
// changing it would move every queue.
func Hash(queue string) uint64 { return xxhash.Sum64String(queue) }

// Version returns the table's version; only the boss makes new ones.
func (t *Table) Version() uint64 { return t.version }

// Buckets returns the number of buckets.
func (t *Table) Buckets() int { return len(t.owners) }

// Bucket returns the bucket of queue.
func (t *Table) Bucket(queue string) int {
	if t.bits == 0 {
		return 0
	}
	return int(Hash(queue) >> (64 - t.bits))
}

// Lookup returns the node owning queue. It does not allocate.
func (t *Table) Lookup(queue string) Node {
	return t.nodes[t.owners[t.Bucket(queue)]]
}

// Nodes returns the nodes that own at least one bucket.
func (t *Table) Nodes() []Node { return append([]Node(nil), t.nodes...) }

func (t *Table) String() string {
	return fmt.Sprintf("table v%d: %d buckets on %d nodes", t.version, len(t.owners), len(t.nodes))
}
