package boss

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/imq-dev/imq/internal/bucket"
	"github.com/imq-dev/imq/internal/member"
)

func nodes(ids ...string) []bucket.Node {
	out := make([]bucket.Node, len(ids))
	for i, id := range ids {
		out[i] = bucket.Node{ID: id, LinkAddr: "10.0.0.1:" + id}
	}
	return out
}

// build joins the nodes one by one into an empty table.
func build(t *testing.T, ns []bucket.Node) *bucket.Table {
	t.Helper()
	tb := bucket.Empty()
	for _, n := range ns {
		next, _, err := tb.Join(n)
		if err != nil {
			t.Fatal(err)
		}
		tb = next
	}
	return tb
}

func jsonOf(t *testing.T, tb *bucket.Table) string {
	t.Helper()
	b, err := json.Marshal(tb)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestPlanTable(t *testing.T) {
	three := nodes("a", "b", "c")
	base := func(t *testing.T) *bucket.Table { return build(t, three) }
	for _, tc := range []struct {
		name                      string
		alive                     []bucket.Node
		joined, left, readdressed []string
		versionStep               uint64
		want                      func(t *testing.T, cur *bucket.Table) *bucket.Table
	}{
		{name: "unchanged", alive: three, versionStep: 0,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table { return cur }},
		{name: "one leaves", alive: nodes("a", "c"), left: []string{"b"}, versionStep: 1,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table {
				n, _, _ := cur.Leave("b")
				return n
			}},
		{name: "one joins", alive: nodes("a", "b", "c", "d"), joined: []string{"d"}, versionStep: 1,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table {
				n, _, _ := cur.Join(nodes("d")[0])
				return n
			}},
		{name: "leaves in id order, then joins in id order", alive: nodes("b", "e", "d"),
			left: []string{"a", "c"}, joined: []string{"d", "e"}, versionStep: 4,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table {
				n, _, _ := cur.Leave("a")
				n, _, _ = n.Leave("c")
				n, _, _ = n.Join(nodes("d")[0])
				n, _, _ = n.Join(nodes("e")[0])
				return n
			}},
		{name: "new link address is a readdress", alive: []bucket.Node{three[0], {ID: "b", LinkAddr: "10.0.0.9:1"}, three[2]},
			readdressed: []string{"b"}, versionStep: 1,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table {
				n, _ := cur.Readdress(bucket.Node{ID: "b", LinkAddr: "10.0.0.9:1"})
				return n
			}},
		{name: "all gone", alive: nil, left: []string{"a", "b", "c"}, versionStep: 3,
			want: func(t *testing.T, cur *bucket.Table) *bucket.Table {
				n, _, _ := cur.Leave("a")
				n, _, _ = n.Leave("b")
				n, _, _ = n.Leave("c")
				return n
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cur := base(t)
			alive := slices.Clone(tc.alive)
			slices.SortFunc(alive, func(a, b bucket.Node) int { return cmpID(a.ID, b.ID) })
			p := planTable(cur, alive)
			if !slices.Equal(p.joined, tc.joined) || !slices.Equal(p.left, tc.left) || !slices.Equal(p.readdressed, tc.readdressed) {
				t.Fatalf("joined %v left %v readdressed %v; want %v %v %v", p.joined, p.left, p.readdressed, tc.joined, tc.left, tc.readdressed)
			}
			if p.changed() != (tc.versionStep > 0) {
				t.Fatalf("changed = %v", p.changed())
			}
			if got := p.next.Version() - cur.Version(); got != tc.versionStep {
				t.Fatalf("version went up by %d, want %d", got, tc.versionStep)
			}
			if got, want := jsonOf(t, p.next), jsonOf(t, tc.want(t, cur)); got != want {
				t.Fatalf("next table\n%s\nwant\n%s", got, want)
			}
		})
	}
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

// TestPlanTableMovesOnlyNeeded checks the moves a plan reports against the
// owners: a leave moves exactly the leaver's buckets.
func TestPlanTableMovesOnlyNeeded(t *testing.T) {
	cur := build(t, nodes("a", "b", "c", "d"))
	p := planTable(cur, nodes("a", "b", "d"))
	moved := map[int]bool{}
	for _, m := range p.moves {
		if m.From != "c" {
			t.Fatalf("move %+v is not from the leaver", m)
		}
		moved[m.Bucket] = true
	}
	for b := range cur.Buckets() {
		was, now := cur.Owner(b).ID, p.next.Owner(b).ID
		if was == "c" != moved[b] || was != "c" && was != now {
			t.Fatalf("bucket %d: %s → %s (moved %v)", b, was, now, moved[b])
		}
	}
}

func TestLiveNodes(t *testing.T) {
	peer := func(name string, role member.Role, id, link string, started int64) member.Peer {
		return member.Peer{Name: name, Addr: "127.0.0.1:1", Meta: member.Meta{Role: role, ID: id, LinkAddr: link, Started: started}}
	}
	peers := []member.Peer{
		peer("boss/boss/1", member.RoleBoss, "boss", "", 1),
		peer("gateway/gw-1/1", member.RoleGateway, "gw-1", "", 1),
		peer("queuenode/qn-2/1", member.RoleQueueNode, "qn-2", "10.0.0.2:1", 5),
		peer("queuenode/qn-1/old", member.RoleQueueNode, "qn-1", "10.0.0.1:1", 1),
		peer("queuenode/qn-1/new", member.RoleQueueNode, "qn-1", "10.0.0.1:2", 9),
		peer("queuenode/qn-3/1", member.RoleQueueNode, "qn-3", "", 3), // no link: not routable
		peer("queuenode/qn-4/a", member.RoleQueueNode, "qn-4", "10.0.0.4:1", 7),
		peer("queuenode/qn-4/b", member.RoleQueueNode, "qn-4", "10.0.0.4:2", 7), // same start: greater name wins
	}
	got, winners := liveNodes(peers)
	want := []bucket.Node{{ID: "qn-1", LinkAddr: "10.0.0.1:2"}, {ID: "qn-2", LinkAddr: "10.0.0.2:1"}, {ID: "qn-4", LinkAddr: "10.0.0.4:2"}}
	if !slices.Equal(got, want) {
		t.Fatalf("live nodes %v, want %v", got, want)
	}
	if winners["qn-1"].Name != "queuenode/qn-1/new" || winners["qn-3"].Name != "queuenode/qn-3/1" || len(winners) != 4 {
		t.Fatalf("winners %v", winners)
	}
	// Order of the peers does not matter.
	slices.Reverse(peers)
	if got2, _ := liveNodes(peers); !slices.Equal(got2, want) {
		t.Fatalf("reversed: %v", got2)
	}
}
