package bucket

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// cluster is the model a property test drives: the live nodes, the layout
// of the live non-draining ones (Join/Leave only) and the published table.
type cluster struct {
	t        *testing.T
	live     []Node
	layout   *Table
	pub      *Table
	maxMoves int
	next     int // next node number
}

func (c *cluster) isLive(id string) bool {
	return slices.ContainsFunc(c.live, func(n Node) bool { return n.ID == id })
}

// advance publishes one step and checks the safety properties of it.
func (c *cluster) advance(giveUp []int) Step {
	c.t.Helper()
	prev := c.pub
	next, step := prev.Advance(c.layout, c.live, c.maxMoves, giveUp)
	if next == prev {
		if len(step.Assigned)+len(step.Marked)+len(step.Unmarked) > 0 {
			c.t.Fatalf("unchanged table with a step %+v", step)
		}
		return step
	}
	if next.Version() != prev.Version()+1 {
		t := c.t
		t.Fatalf("version %d after %d", next.Version(), prev.Version())
	}
	if next.Sum() == prev.Sum() {
		c.t.Fatalf("v%d and v%d differ but share the sum %s", prev.Version(), next.Version(), next.Sum())
	}
	c.checkTable(next)
	if len(step.Marked) > 0 && next.MovingCount() > c.maxMoves {
		c.t.Fatalf("marked %d moves, leaving %d moving, more than %d", len(step.Marked), next.MovingCount(), c.maxMoves)
	}
	// A bucket changes owner in Advance only when its owner is not live:
	// a live owner keeps it until it reports the hand-off.
	if next.Buckets() > 0 && prev.Buckets() > 0 {
		shift := next.bits - prev.bits
		for b := range next.Buckets() {
			was := prev.Owner(b >> shift).ID
			if now := next.Owner(b).ID; now != was && c.isLive(was) {
				c.t.Fatalf("bucket %d went from live %s to %s without a hand-off", b, was, now)
			}
		}
	}
	for _, id := range ids(next) {
		if !c.isLive(id) {
			c.t.Fatalf("v%d lists %s, which is not live", next.Version(), id)
		}
	}
	c.pub = next
	return step
}

// checkTable checks what every table keeps, through its JSON form too.
func (c *cluster) checkTable(tb *Table) {
	c.t.Helper()
	if err := tb.check(); err != nil {
		c.t.Fatalf("%v: %v", tb, err)
	}
	for _, m := range tb.Moving() {
		if m.From == m.To {
			c.t.Fatalf("bucket %d moves to its owner %s", m.Bucket, m.To)
		}
	}
	raw, err := json.Marshal(tb)
	if err != nil {
		c.t.Fatal(err)
	}
	var back Table
	if err := json.Unmarshal(raw, &back); err != nil {
		c.t.Fatalf("decode %s: %v", raw, err)
	}
	if !back.sameContents(tb) || back.Version() != tb.Version() || back.Sum() != tb.Sum() {
		c.t.Fatalf("JSON round trip changed %s", raw)
	}
}

func ids(tb *Table) []string {
	var out []string
	for _, n := range tb.Nodes() {
		out = append(out, n.ID)
	}
	return out
}

func (c *cluster) join() {
	c.t.Helper()
	n := Node{ID: fmt.Sprintf("n%02d", c.next), LinkAddr: fmt.Sprintf("10.0.0.%d:7100", c.next)}
	c.next++
	c.live = append(c.live, n)
	slices.SortFunc(c.live, func(a, b Node) int { return cmpID(a.ID, b.ID) })
	layout, _, err := c.layout.Join(n)
	if err != nil {
		c.t.Fatal(err)
	}
	c.layout = layout
}

func cmpID(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// drain takes id out of the layout but keeps it live.
func (c *cluster) drain(id string) {
	c.t.Helper()
	if _, ok := c.layout.index(id); !ok || len(c.layout.Nodes()) == 1 {
		return
	}
	layout, _, err := c.layout.Leave(id)
	if err != nil {
		c.t.Fatal(err)
	}
	c.layout = layout
}

// die takes id out of the live nodes and the layout.
func (c *cluster) die(id string) {
	c.t.Helper()
	c.live = slices.DeleteFunc(c.live, func(n Node) bool { return n.ID == id })
	if _, ok := c.layout.index(id); ok {
		layout, _, err := c.layout.Leave(id)
		if err != nil {
			c.t.Fatal(err)
		}
		c.layout = layout
	}
}

// complete reports the pending moves ms as handed off.
func (c *cluster) complete(ms []Move) {
	c.t.Helper()
	prev := c.pub
	next, errs := prev.CompleteMoves(ms)
	for i, err := range errs {
		if err != nil {
			c.t.Fatalf("complete %+v: %v", ms[i], err)
		}
	}
	if len(ms) == 0 {
		if next != prev {
			c.t.Fatal("completing nothing made a new version")
		}
		return
	}
	if next.Version() != prev.Version()+1 {
		c.t.Fatalf("completing %d moves: version %d after %d", len(ms), next.Version(), prev.Version())
	}
	c.checkTable(next)
	for b := range next.Buckets() {
		was, now := prev.Owner(b).ID, next.Owner(b).ID
		if was == now {
			continue
		}
		if !slices.Contains(ms, Move{Bucket: b, From: was, To: now}) {
			c.t.Fatalf("bucket %d went from %s to %s, not a completed move", b, was, now)
		}
	}
	c.pub = next
}

// converge completes every move and advances until the table stops
// changing, then checks it is the layout.
func (c *cluster) converge() {
	c.t.Helper()
	for i := 0; ; i++ {
		if i > 1<<12 {
			c.t.Fatalf("no convergence: %v moving %v", c.pub, c.pub.Moving())
		}
		c.complete(c.pub.Moving())
		before := c.pub
		c.advance(nil)
		if c.pub == before && c.pub.MovingCount() == 0 {
			break
		}
	}
	if c.layout.Buckets() == 0 {
		if c.pub.Buckets() != 0 {
			c.t.Fatalf("layout empty, published %v", c.pub)
		}
		return
	}
	shift := c.pub.bits - c.layout.bits
	for b := range c.pub.Buckets() {
		if got, want := c.pub.Owner(b).ID, c.layout.Owner(b>>shift).ID; got != want {
			c.t.Fatalf("converged: bucket %d owned by %s, layout says %s", b, got, want)
		}
	}
	if !slices.Equal(c.pub.Nodes(), c.layout.Nodes()) {
		c.t.Fatalf("converged nodes %v, layout %v", c.pub.Nodes(), c.layout.Nodes())
	}
}

// TestAdvanceRandomHistories drives random joins, drains, deaths, partial
// completions and give-ups, checking at each step that no live owner loses
// a bucket without a hand-off, no move targets its owner, versions go up by
// one per change, moves stay within maxMoves, and in the end the published
// table converges to the layout.
func TestAdvanceRandomHistories(t *testing.T) {
	for seed := range uint64(200) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 11))
			c := &cluster{t: t, layout: Empty(), pub: Empty(), maxMoves: 1 + r.IntN(10)}
			for range 1 + r.IntN(3) {
				c.join()
			}
			c.advance(nil)
			for range 40 {
				switch k := r.IntN(10); {
				case k < 2:
					c.join()
				case k < 3 && len(c.live) > 1:
					c.drain(c.live[r.IntN(len(c.live))].ID)
				case k < 4 && len(c.live) > 1:
					c.die(c.live[r.IntN(len(c.live))].ID)
				case k < 8:
					ms := c.pub.Moving()
					r.Shuffle(len(ms), func(i, j int) { ms[i], ms[j] = ms[j], ms[i] })
					c.complete(ms[:r.IntN(len(ms)+1)])
				case k < 9:
					var giveUp []int
					for _, m := range c.pub.Moving() {
						if r.IntN(2) == 0 {
							giveUp = append(giveUp, m.Bucket)
						}
					}
					step := c.advance(giveUp)
					for _, m := range step.Marked {
						if slices.Contains(giveUp, m.Bucket) {
							t.Fatalf("bucket %d given up and marked again in one step", m.Bucket)
						}
					}
				}
				c.advance(nil)
			}
			c.converge()
			c.die(c.live[0].ID) // and the last ones die too
			for len(c.live) > 0 {
				c.die(c.live[0].ID)
			}
			c.converge()
		})
	}
}

func threeNodeLayout(t *testing.T) (*Table, []Node) {
	t.Helper()
	layout := Empty()
	var live []Node
	for _, id := range []string{"a", "b", "c"} {
		n := Node{ID: id, LinkAddr: id + ":1"}
		live = append(live, n)
		var err error
		if layout, _, err = layout.Join(n); err != nil {
			t.Fatal(err)
		}
	}
	return layout, live
}

func TestAdvanceRules(t *testing.T) {
	layout, live := threeNodeLayout(t)
	// Published: a owns everything (b and c just joined).
	pub := Single(live[0])
	for pub.Buckets() < layout.Buckets() {
		pub = pub.Settled()
		next := *pub
		next.split()
		pub = &next
	}

	t.Run("alive owner: marked, at most maxMoves", func(t *testing.T) {
		next, step := pub.Advance(layout, live, 3, nil)
		if next.MovingCount() != 3 || len(step.Marked) != 3 || len(step.Assigned) != 0 {
			t.Fatalf("moving %v, step %+v", next.Moving(), step)
		}
		for b := range next.Buckets() {
			if next.Owner(b).ID != "a" {
				t.Fatalf("bucket %d flipped to %s before a hand-off", b, next.Owner(b).ID)
			}
		}
		for _, m := range next.Moving() {
			if m.To != layout.Owner(m.Bucket).ID {
				t.Fatalf("move %+v does not target the layout owner %s", m, layout.Owner(m.Bucket).ID)
			}
		}
		want := []string{"a"}
		for _, m := range next.Moving() {
			want = append(want, m.To)
		}
		slices.Sort(want)
		if !slices.Equal(ids(next), slices.Compact(want)) {
			t.Fatalf("nodes %v, want the owner and the targets %v", ids(next), want)
		}
		again, _ := next.Advance(layout, live, 3, nil)
		if again != next {
			t.Fatal("a second step with nothing new changed the table")
		}
	})

	t.Run("dead owner: assigned at once", func(t *testing.T) {
		marked, _ := pub.Advance(layout, live, 3, nil)
		layout2, _, _ := layout.Leave("a")
		next, step := marked.Advance(layout2, live[1:], 3, nil)
		if len(step.Assigned) != next.Buckets() || next.MovingCount() != 0 {
			t.Fatalf("step %+v, moving %v", step, next.Moving())
		}
		for b := range next.Buckets() {
			if next.Owner(b).ID != layout2.Owner(b).ID {
				t.Fatalf("bucket %d owned by %s, layout %s", b, next.Owner(b).ID, layout2.Owner(b).ID)
			}
		}
		if slices.Contains(ids(next), "a") {
			t.Fatal("dead a still listed")
		}
	})

	t.Run("dead target or changed layout: unmarked", func(t *testing.T) {
		marked, _ := pub.Advance(layout, live, 100, nil)
		layout2, _, _ := layout.Leave("c")
		next, step := marked.Advance(layout2, []Node{live[0], live[1]}, 100, nil)
		for _, m := range next.Moving() {
			if m.To == "c" {
				t.Fatalf("still moving to dead c: %+v", m)
			}
		}
		if len(step.Unmarked) == 0 {
			t.Fatal("nothing unmarked")
		}
		// Draining c (alive, out of the layout) unmarks moves to c as well.
		next, _ = marked.Advance(layout2, live, 100, nil)
		for _, m := range next.Moving() {
			if m.To == "c" {
				t.Fatalf("still moving to draining c: %+v", m)
			}
		}
		if !slices.Contains(ids(next), "a") || slices.Contains(ids(next), "c") {
			t.Fatalf("nodes %v", ids(next))
		}
	})

	t.Run("given up: unmarked, not marked again in the same step", func(t *testing.T) {
		marked, _ := pub.Advance(layout, live, 2, nil)
		ms := marked.Moving()
		next, step := marked.Advance(layout, live, 2, []int{ms[0].Bucket})
		if next.IsMoving(ms[0].Bucket, ms[0].From, ms[0].To) || !slices.Contains(step.Unmarked, ms[0]) {
			t.Fatalf("given-up move still marked: %v", next.Moving())
		}
		later, _ := next.Advance(layout, live, 100, nil)
		if !later.IsMoving(ms[0].Bucket, ms[0].From, ms[0].To) {
			t.Fatal("given-up move not retried later")
		}
	})
}

func TestCompleteMove(t *testing.T) {
	layout, live := threeNodeLayout(t)
	a := Single(live[0])
	pub := a
	for pub.Buckets() < layout.Buckets() {
		next := *pub
		next.split()
		pub = &next
	}
	pub, _ = pub.Advance(layout, live, 1, nil)
	m := pub.Moving()[0]
	if _, err := pub.CompleteMove(m.Bucket, m.From, "c"+m.To); !errors.Is(err, ErrNotMoving) {
		t.Fatalf("wrong target: %v", err)
	}
	if _, err := pub.CompleteMove(m.Bucket+1, m.From, m.To); !errors.Is(err, ErrNotMoving) {
		t.Fatalf("bucket not moving: %v", err)
	}
	next, err := pub.CompleteMove(m.Bucket, m.From, m.To)
	if err != nil {
		t.Fatal(err)
	}
	if next.Version() != pub.Version()+1 || next.Owner(m.Bucket).ID != m.To || next.MovingCount() != 0 {
		t.Fatalf("v%d owner %s moving %v", next.Version(), next.Owner(m.Bucket).ID, next.Moving())
	}
	if _, err := next.CompleteMove(m.Bucket, m.From, m.To); !errors.Is(err, ErrNotMoving) {
		t.Fatalf("completed twice: %v", err)
	}
}

func TestSettledDropsEmptyOwners(t *testing.T) {
	n := Node{ID: "a"}
	tb := &Table{version: 4, bits: 1, owners: []int{0, 0}, nodes: []Node{n, {ID: "b"}}, moving: map[int]int{0: 1, 1: 1}}
	s := tb.Settled()
	if s.Version() != 5 || !slices.Equal(ids(s), []string{"b"}) || s.MovingCount() != 0 {
		t.Fatalf("settled %v nodes %v moving %v", s, ids(s), s.Moving())
	}
	if _, _, err := tb.Join(Node{ID: "c"}); !errors.Is(err, ErrMovesPending) {
		t.Fatalf("join with moves pending: %v", err)
	}
}

func TestJSONMoving(t *testing.T) {
	old := `{"version":3,"bits":1,"nodes":[{"id":"a","link_addr":"x"}],"owners":[0,0]}`
	var tb Table
	if err := json.Unmarshal([]byte(old), &tb); err != nil || tb.MovingCount() != 0 {
		t.Fatalf("old JSON: %v, moving %v", err, tb.Moving())
	}
	withMove := `{"version":3,"bits":1,"nodes":[{"id":"a","link_addr":"x"},{"id":"b","link_addr":"y"}],"owners":[0,0],"moving":{"1":"b"}}`
	if err := json.Unmarshal([]byte(withMove), &tb); err != nil {
		t.Fatal(err)
	}
	if !tb.IsMoving(1, "a", "b") || tb.MovingCount() != 1 {
		t.Fatalf("moving %v", tb.Moving())
	}
	raw, _ := json.Marshal(&tb)
	if string(raw) != withMove {
		t.Fatalf("re-encoded %s", raw)
	}
	for name, bad := range map[string]string{
		"to its owner":  `{"version":3,"bits":1,"nodes":[{"id":"a"},{"id":"b"}],"owners":[0,1],"moving":{"1":"b"}}`,
		"unknown node":  `{"version":3,"bits":1,"nodes":[{"id":"a"}],"owners":[0,0],"moving":{"1":"z"}}`,
		"bucket range":  `{"version":3,"bits":1,"nodes":[{"id":"a"},{"id":"b"}],"owners":[0,0],"moving":{"2":"b"}}`,
		"not a number":  `{"version":3,"bits":1,"nodes":[{"id":"a"},{"id":"b"}],"owners":[0,0],"moving":{"01":"b"}}`,
		"idle node":     `{"version":3,"bits":1,"nodes":[{"id":"a"},{"id":"b"}],"owners":[0,0]}`,
		"target listed": `{"version":3,"bits":1,"nodes":[{"id":"a"},{"id":"b"},{"id":"c"}],"owners":[0,1],"moving":{"1":"a"}}`,
	} {
		if err := json.Unmarshal([]byte(bad), new(Table)); err == nil {
			t.Errorf("%s: decoded %s", name, bad)
		}
	}
}

// TestSumWithoutMovesUnchanged: a table without moves keeps the sum it had
// before moves existed (members of older versions compare sums).
func TestSumWithoutMovesUnchanged(t *testing.T) {
	tb := &Table{version: 4, bits: 1, owners: []int{0, 1}, nodes: []Node{{ID: "a"}, {ID: "b"}}}
	moved := &Table{version: 4, bits: 1, owners: []int{0, 1}, nodes: []Node{{ID: "a"}, {ID: "b"}}, moving: map[int]int{0: 1}}
	if tb.Sum() == moved.Sum() {
		t.Fatal("a move does not change the sum")
	}
	if tb.Sum() != "99219e7318b11485" {
		t.Fatalf("sum of a table without moves changed: %s", tb.Sum())
	}
}

// TestHandedOff: a hand-off that happened is applied whether or not the
// table still marks it (a split or a new layout re-marked the bucket, or the
// move was given up while the report was on its way), as long as the old
// owner still owns the bucket and the new one is live; the bucket's mark
// goes with it. CompleteMoves, by contrast, takes only marked moves.
func TestHandedOff(t *testing.T) {
	a, b, c := Node{ID: "a", LinkAddr: "a:1"}, Node{ID: "b", LinkAddr: "b:1"}, Node{ID: "c", LinkAddr: "c:1"}
	tb := Single(a)
	layout, _, err := tb.Join(b)
	if err != nil {
		t.Fatal(err)
	}
	marked, _ := tb.Advance(layout, []Node{a, b}, 1, nil)
	moves := marked.Moving()
	if len(moves) != 1 {
		t.Fatalf("moves %v, want one", moves)
	}
	m := moves[0]
	// The layout changes before the report: the bucket is now marked for c.
	layout2, _, err := layout.Join(c)
	if err != nil {
		t.Fatal(err)
	}
	remarked, _ := marked.Advance(layout2, []Node{a, b, c}, 8, []int{m.Bucket})
	if _, errs := remarked.CompleteMoves([]Move{m}); errs[0] == nil {
		t.Fatalf("CompleteMoves took a move the table no longer marks: %v", remarked.Moving())
	}
	next, errs := remarked.HandedOff([]Move{m}, []Node{a, b, c})
	if errs[0] != nil {
		t.Fatalf("HandedOff: %v", errs[0])
	}
	if got := next.Owner(m.Bucket); got != b {
		t.Fatalf("bucket %d owned by %v, want %v", m.Bucket, got, b)
	}
	if _, ok := next.Target(m.Bucket); ok {
		t.Fatalf("bucket %d still marked moving after the hand-off", m.Bucket)
	}
	if next.Version() != remarked.Version()+1 {
		t.Fatalf("version %d, want %d", next.Version(), remarked.Version()+1)
	}
	if err := next.check(); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		m    Move
		live []Node
	}{
		"the reporter no longer owns it": {Move{Bucket: m.Bucket, From: "c", To: "b"}, []Node{a, b, c}},
		"the new owner is not live":      {m, []Node{a, c}},
		"a move to itself":               {Move{Bucket: m.Bucket, From: "a", To: "a"}, []Node{a, b, c}},
		"a bucket out of range":          {Move{Bucket: remarked.Buckets(), From: "a", To: "b"}, []Node{a, b, c}},
	} {
		if got, errs := remarked.HandedOff([]Move{tc.m}, tc.live); !errors.Is(errs[0], ErrNotMoving) || got != remarked {
			t.Errorf("%s: HandedOff applied %v (err %v)", name, tc.m, errs[0])
		}
	}
}
