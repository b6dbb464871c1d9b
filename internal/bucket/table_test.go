package bucket

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// checkInvariants fails unless t is a valid table for its nodes.
func checkInvariants(t *testing.T, tb *Table) {
	t.Helper()
	if len(tb.nodes) == 0 {
		if len(tb.owners) != 0 {
			t.Fatalf("%v: buckets without nodes", tb)
		}
		return
	}
	if len(tb.owners) != 1<<tb.bits {
		t.Fatalf("%v: %d owners for %d bits", tb, len(tb.owners), tb.bits)
	}
	if !slices.IsSortedFunc(tb.nodes, func(a, b Node) int { return strings.Compare(a.ID, b.ID) }) {
		t.Fatalf("%v: nodes not sorted", tb)
	}
	counts := make([]int, len(tb.nodes))
	for b, o := range tb.owners {
		if o < 0 || o >= len(tb.nodes) {
			t.Fatalf("%v: bucket %d owned by no live node (%d)", tb, b, o)
		}
		counts[o]++
	}
	lo, hi := slices.Min(counts), slices.Max(counts)
	if lo < MinBuckets {
		t.Fatalf("%v: a node holds %d buckets, fewer than %d (counts %v)", tb, lo, MinBuckets, counts)
	}
	if 8*hi > 9*lo {
		t.Fatalf("%v: load differential %d:%d is worse than 9:8", tb, hi, lo)
	}
}

// ownerAt returns, for each bucket of a table with bits k, the owner's ID in
// old, mapping old's coarser buckets down (a split moves nothing).
func ownersAt(old *Table, bits uint8) []string {
	out := make([]string, 1<<bits)
	if len(old.nodes) == 0 {
		return out
	}
	for b := range out {
		out[b] = old.nodes[old.owners[b>>(bits-old.bits)]].ID
	}
	return out
}

func TestGrowthMatchesTheTalk(t *testing.T) {
	tb := Empty()
	type step struct {
		buckets int
		counts  []int // by join order
	}
	want := []step{
		{8, []int{8}},
		{16, []int{8, 8}},
		{32, []int{11, 11, 10}},
		{32, []int{8, 8, 8, 8}},
		{64, []int{13, 13, 13, 13, 12}},
	}
	for i, w := range want {
		var err error
		if tb, _, err = tb.Join(Node{ID: fmt.Sprintf("n%d", i)}); err != nil {
			t.Fatal(err)
		}
		checkInvariants(t, tb)
		c := tb.Counts()
		got := make([]int, i+1)
		for j := range got {
			got[j] = c[fmt.Sprintf("n%d", j)]
		}
		if tb.Buckets() != w.buckets || !slices.Equal(got, w.counts) {
			t.Fatalf("after %d joins: %d buckets, counts %v; want %d, %v", i+1, tb.Buckets(), got, w.buckets, w.counts)
		}
		if tb.Version() != uint64(i+1) {
			t.Fatalf("version %d after %d joins", tb.Version(), i+1)
		}
	}
}

// TestRandomHistories: random joins and leaves keep every invariant, move
// exactly what they say, and the same history yields the same table.
func TestRandomHistories(t *testing.T) {
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 0))
		var history []string // "+id" or "-id"
		tb := Empty()
		live := map[string]bool{}
		next := 0
		for range 60 {
			var (
				nt    *Table
				moves []Move
				err   error
				op    string
			)
			if len(live) == 0 || rng.IntN(3) > 0 && len(live) < 40 {
				id := "node-" + strconv.Itoa(rng.IntN(1000)) + "-" + strconv.Itoa(next)
				next++
				op = "+" + id
				nt, moves, err = tb.Join(Node{ID: id, LinkAddr: "127.0.0.1:1"})
			} else {
				ids := slices.Sorted(func(yield func(string) bool) {
					for id := range live {
						if !yield(id) {
							return
						}
					}
				})
				id := ids[rng.IntN(len(ids))]
				op = "-" + id
				nt, moves, err = tb.Leave(id)
			}
			if err != nil {
				t.Fatalf("seed %d %s: %v", seed, op, err)
			}
			checkInvariants(t, nt)
			if nt.Version() != tb.Version()+1 {
				t.Fatalf("seed %d %s: version %d after %d", seed, op, nt.Version(), tb.Version())
			}
			// What moved is exactly what the moves list, at the new
			// granularity: a split alone moves nothing.
			before := ownersAt(tb, nt.bits)
			moved := map[int]Move{}
			for _, m := range moves {
				moved[m.Bucket] = m
			}
			for b := range nt.owners {
				after := nt.Owner(b).ID
				m, listed := moved[b]
				switch {
				case len(tb.nodes) == 0:
					// the first node takes the whole new table
				case before[b] != after && !listed:
					t.Fatalf("seed %d %s: bucket %d moved %s→%s unlisted", seed, op, b, before[b], after)
				case before[b] == after && listed:
					t.Fatalf("seed %d %s: bucket %d listed as moved but stayed with %s", seed, op, b, after)
				case listed && (m.From != before[b] || m.To != after):
					t.Fatalf("seed %d %s: move %+v, but %s→%s", seed, op, m, before[b], after)
				}
				if listed && op[0] == '+' && m.To != op[1:] {
					t.Fatalf("seed %d %s: a join moved bucket %d to %s, not the new node", seed, op, b, m.To)
				}
				if listed && op[0] == '-' && m.From != op[1:] {
					t.Fatalf("seed %d %s: a leave moved bucket %d from %s, not the leaver", seed, op, b, m.From)
				}
			}
			if op[0] == '+' && len(tb.nodes) > 0 && len(moves) != len(nt.owners)/len(nt.nodes) {
				t.Fatalf("seed %d %s: a join moved %d buckets, want the share %d", seed, op, len(moves), len(nt.owners)/len(nt.nodes))
			}
			if op[0] == '-' && len(moves) != tb.Counts()[op[1:]] && len(nt.nodes) > 0 {
				t.Fatalf("seed %d %s: a leave moved %d buckets, the leaver had %d", seed, op, len(moves), tb.Counts()[op[1:]])
			}
			if op[0] == '+' {
				live[op[1:]] = true
			} else {
				delete(live, op[1:])
			}
			history = append(history, op)
			tb = nt
		}
		if replay := replay(t, history); !reflect.DeepEqual(replay, tb) {
			t.Fatalf("seed %d: replaying the history gave another table", seed)
		}
	}
}

func replay(t *testing.T, history []string) *Table {
	t.Helper()
	tb := Empty()
	for _, op := range history {
		var err error
		if op[0] == '+' {
			tb, _, err = tb.Join(Node{ID: op[1:], LinkAddr: "127.0.0.1:1"})
		} else {
			tb, _, err = tb.Leave(op[1:])
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return tb
}

func TestSplitMovesNothing(t *testing.T) {
	tb := Single(Node{ID: "a"})
	before := ownersAt(tb, tb.bits+1)
	tb.split()
	for b := range tb.owners {
		if tb.Owner(b).ID != before[b] {
			t.Fatalf("split moved bucket %d", b)
		}
	}
}

func TestLookupAndErrors(t *testing.T) {
	if _, ok := Empty().Lookup("/room/1"); ok {
		t.Fatal("an empty table routed a queue")
	}
	tb := Single(Node{ID: "a"})
	tb, _, _ = tb.Join(Node{ID: "b"})
	n, ok := tb.Lookup("/room/1")
	if !ok || n.ID != tb.Owner(tb.Bucket("/room/1")).ID {
		t.Fatalf("lookup gave %v %v", n, ok)
	}
	if got := tb.Bucket("/room/1"); got != int(Hash("/room/1")>>(64-tb.bits)) {
		t.Fatalf("bucket %d is not the top bits of the hash", got)
	}
	if _, _, err := tb.Join(Node{ID: "a"}); !errors.Is(err, ErrNodeExists) {
		t.Fatalf("joining twice: %v", err)
	}
	if _, _, err := tb.Leave("zz"); !errors.Is(err, ErrUnknownNode) {
		t.Fatalf("leaving unknown: %v", err)
	}
	tb, _, _ = tb.Leave("a")
	tb, _, _ = tb.Leave("b")
	if _, ok := tb.Lookup("/room/1"); ok || tb.Buckets() != 0 {
		t.Fatal("a table whose last node left still routes")
	}
}

func BenchmarkLookup(b *testing.B) {
	tb := Empty()
	for i := range 10 {
		tb, _, _ = tb.Join(Node{ID: "node-" + strconv.Itoa(i)})
	}
	queues := make([]string, 1024)
	for i := range queues {
		queues[i] = "/room/" + strconv.Itoa(i)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		tb.Lookup(queues[i&1023])
		i++
	}
}

func TestJSONRoundTrip(t *testing.T) {
	tb := Empty()
	for i := range 5 {
		tb, _, _ = tb.Join(Node{ID: "node-" + strconv.Itoa(i), LinkAddr: "127.0.0.1:" + strconv.Itoa(7100+i)})
	}
	tb, _, _ = tb.Leave("node-2")
	for _, in := range []*Table{Empty(), tb} {
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		var out Table
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatalf("decode %s: %v", b, err)
		}
		if !reflect.DeepEqual(in.Nodes(), out.Nodes()) || in.Version() != out.Version() || in.Buckets() != out.Buckets() {
			t.Fatalf("round trip changed %v into %v", in, &out)
		}
		for q := range 500 {
			name := "/room/" + strconv.Itoa(q)
			a, _ := in.Lookup(name)
			b, _ := out.Lookup(name)
			if a != b {
				t.Fatalf("%s routes to %v before and %v after", name, a, b)
			}
		}
	}
}

func TestJSONRefusesBrokenTables(t *testing.T) {
	for _, bad := range []string{
		`{"version":1,"bits":3,"nodes":[{"id":"a"}],"owners":[0,0,0]}`,          // too few owners
		`{"version":1,"bits":1,"nodes":[{"id":"a"}],"owners":[0,1]}`,            // owner out of range
		`{"version":1,"bits":1,"nodes":[{"id":"a"}],"owners":[0,-1]}`,           // negative owner
		`{"version":1,"bits":1,"nodes":[{"id":"b"},{"id":"a"}],"owners":[0,1]}`, // unsorted
		`{"version":1,"bits":1,"nodes":[{"id":"a"},{"id":"a"}],"owners":[0,1]}`, // duplicate
		`{"version":1,"bits":1,"nodes":[{"id":""}],"owners":[0,0]}`,             // no id
		`{"version":1,"bits":40,"nodes":[{"id":"a"}],"owners":[0]}`,             // too many bits
		`{"version":1,"bits":2,"nodes":[],"owners":[]}`,                         // bits without nodes
		`[1,2]`,
	} {
		var tb Table
		if err := json.Unmarshal([]byte(bad), &tb); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestReaddressMovesNothing(t *testing.T) {
	tb := Single(Node{ID: "a", LinkAddr: "old"})
	tb, _, _ = tb.Join(Node{ID: "b", LinkAddr: "b"})
	next, err := tb.Readdress(Node{ID: "a", LinkAddr: "new"})
	if err != nil {
		t.Fatal(err)
	}
	if next.Version() != tb.Version()+1 {
		t.Fatalf("version %d after %d", next.Version(), tb.Version())
	}
	for b := range tb.Buckets() {
		if tb.Owner(b).ID != next.Owner(b).ID {
			t.Fatalf("bucket %d moved", b)
		}
	}
	if n, _ := next.Lookup(queueOwnedBy(t, next, "a")); n.LinkAddr != "new" {
		t.Fatalf("a's address is %q", n.LinkAddr)
	}
	if n, _ := tb.Lookup(queueOwnedBy(t, tb, "a")); n.LinkAddr != "old" {
		t.Fatalf("the old table changed: a's address is %q", n.LinkAddr)
	}
	if _, err := tb.Readdress(Node{ID: "zz"}); !errors.Is(err, ErrUnknownNode) {
		t.Fatalf("readdressing an unknown node: %v", err)
	}
}

func queueOwnedBy(t *testing.T, tb *Table, id string) string {
	for i := range 10000 {
		q := "/room/" + strconv.Itoa(i)
		if n, _ := tb.Lookup(q); n.ID == id {
			return q
		}
	}
	t.Fatalf("no queue routes to %s", id)
	return ""
}

func TestSumAndRenumber(t *testing.T) {
	a := Single(Node{ID: "a", LinkAddr: "1"})
	b, _, _ := a.Join(Node{ID: "b", LinkAddr: "2"})
	moved, _ := a.Readdress(Node{ID: "a", LinkAddr: "9"})
	if a.Sum() == b.Sum() || a.Sum() == moved.Sum() {
		t.Fatal("different tables have one sum")
	}
	again, err := b.Renumber(b.Version() + 5)
	if err != nil || again.Version() != b.Version()+5 || again.Sum() != b.Sum() {
		t.Fatalf("renumbered: %v %v, sum %s vs %s", again, err, again.Sum(), b.Sum())
	}
	var decoded Table
	js, _ := json.Marshal(b)
	json.Unmarshal(js, &decoded)
	if decoded.Sum() != b.Sum() {
		t.Fatal("a decoded table has another sum")
	}
	if _, err := b.Renumber(b.Version()); err == nil {
		t.Fatal("renumbered to the same version")
	}
}

// TestString: the summary /varz shows counts its nouns right.
func TestString(t *testing.T) {
	tb, _, err := Empty().Join(Node{ID: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := tb.String(), "table v1: 8 buckets on 1 node"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if tb, _, err = tb.Join(Node{ID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if got, want := tb.String(), "table v2: 16 buckets on 2 nodes"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

// TestOf checks that Of agrees with Table.Bucket and that bits no table
// can have match no bucket (rather than bucket 0).
func TestOf(t *testing.T) {
	for _, bits := range []int{0, 1, 7, 20, 63} {
		for i := range 50 {
			q := fmt.Sprintf("room-%d", i)
			b := Of(q, bits)
			if b < 0 || (bits < 63 && b >= 1<<bits) {
				t.Fatalf("Of(%q, %d) = %d, outside the table", q, bits, b)
			}
			if bits > 0 && Of(q, bits-1) != b>>1 {
				t.Fatalf("Of(%q, %d) = %d is not the parent of Of(%q, %d) = %d", q, bits-1, Of(q, bits-1), q, bits, b)
			}
		}
	}
	for _, bits := range []int{-1, 64, 65, 1 << 20} {
		if b := Of("room", bits); b != -1 {
			t.Fatalf("Of(room, %d) = %d, want -1", bits, b)
		}
	}
}
