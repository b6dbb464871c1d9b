package loadtest

import (
	"bytes"
	"slices"
	"sort"
)

// interval is one membership of a bot in its room, in offsets: the bot must
// have received every event with Lo < offset < Hi. Lo is the version of the
// bot's own state update right after it joined, Hi that of the one right
// before it left (or the end), which the bot waited to see come back.
type interval struct {
	Lo, Hi uint64
	// Want, if not 0, is the offset of the update the interval was meant
	// to end at, which did not come back in time: Hi was cut at what
	// arrived, and the offsets in [Hi, Want) are in flight.
	Want uint64
	// Got holds the chat offsets received during the membership, in order
	// of arrival.
	Got []uint64
}

// VerifyResult is the end-of-run exactly-once check: for each bot, the
// tracked publishes of its room whose offsets fall inside its membership
// intervals.
type VerifyResult struct {
	// Expected counts (receiver, message) pairs that had to be delivered.
	Expected int64 `json:"expected"`
	// Delivered counts those received exactly once.
	Delivered int64 `json:"delivered"`
	// Missing counts those not received although a later offset of the
	// same queue was: lost, since each queue's stream is ordered.
	Missing int64 `json:"missing"`
	// Duplicated counts those received more than once.
	Duplicated int64 `json:"duplicated"`
	// Untracked counts events received inside an interval that no tracked
	// publish explains: a publish whose reply was lost (outcome unknown),
	// past the tracking cap, or from a client outside this run.
	Untracked int64 `json:"untracked"`
	// Intervals counts the membership intervals checked.
	Intervals int64 `json:"intervals"`
	// InFlight counts (receiver, message) pairs published while the
	// receiver was joined that it had not received when it left or when
	// the drain ended, with nothing later received either: late or lost,
	// which nothing tells apart. They are not in Expected, and not
	// violations.
	InFlight int64 `json:"in_flight"`
	// Unconfirmed counts the intervals whose closing update did not come
	// back in time (SettleTimeout before a churning bot leaves, Drain at
	// the end of the run): those the in-flight messages belong to.
	Unconfirmed int64 `json:"unconfirmed"`
	// InWindow counts the chat events received inside the checked
	// intervals, extra copies included; Counters.Deliveries minus InWindow
	// were received outside them (see Report.WriteSummary).
	InWindow int64 `json:"in_window"`
	// RoomsLost counts rooms whose queue was lost during the run (its node
	// died or its bucket moved: the subscribers were told and rejoined a new
	// epoch). Their offsets restarted, so they are not checked; every other
	// room is.
	RoomsLost int64 `json:"rooms_lost,omitempty"`
	// LostRooms names those rooms' queues, so that a test that moved or
	// paused one node can tell the rooms it held from the others.
	LostRooms []string `json:"lost_rooms,omitempty"`
}

func (v *VerifyResult) add(o VerifyResult) {
	v.Expected += o.Expected
	v.Delivered += o.Delivered
	v.Missing += o.Missing
	v.Duplicated += o.Duplicated
	v.Untracked += o.Untracked
	v.Intervals += o.Intervals
	v.RoomsLost += o.RoomsLost
	v.LostRooms = append(v.LostRooms, o.LostRooms...)
	v.InFlight += o.InFlight
	v.Unconfirmed += o.Unconfirmed
	v.InWindow += o.InWindow
}

// verifyRoom checks one room: published holds every bot's tracked publish
// offsets, members every bot's intervals. It is pure.
func verifyRoom(published [][]uint64, members [][]interval) VerifyResult {
	pubs := slices.Concat(published...)
	slices.Sort(pubs)
	pubs = slices.Compact(pubs)
	var r VerifyResult
	// between returns how many tracked publishes lie in [from, to).
	between := func(from, to uint64) int64 {
		lo := sort.Search(len(pubs), func(i int) bool { return pubs[i] >= from })
		hi := sort.Search(len(pubs), func(i int) bool { return pubs[i] >= to })
		return int64(max(0, hi-lo))
	}
	for _, ivs := range members {
		for _, iv := range ivs {
			if iv.Want != 0 && iv.Lo != ^uint64(0) {
				r.Unconfirmed++
				r.InFlight += between(max(iv.Hi, iv.Lo+1), iv.Want)
			}
			if iv.Hi <= iv.Lo || iv.Hi-iv.Lo < 2 { // nothing can lie strictly between
				continue
			}
			r.Intervals++
			got := map[uint64]int{}
			for _, o := range iv.Got {
				if o > iv.Lo && o < iv.Hi {
					got[o]++
					r.InWindow++
				}
			}
			lo := sort.Search(len(pubs), func(i int) bool { return pubs[i] > iv.Lo })
			hi := sort.Search(len(pubs), func(i int) bool { return pubs[i] >= iv.Hi })
			for _, o := range pubs[lo:hi] {
				r.Expected++
				switch n := got[o]; {
				case n == 0:
					r.Missing++
				case n == 1:
					r.Delivered++
				default:
					r.Duplicated++
				}
				delete(got, o)
			}
			r.Untracked += int64(len(got))
		}
	}
	return r
}

// StateResult is the end-of-run convergence check of the scores mounts.
type StateResult struct {
	// Checked counts (bot, other bot) pairs compared.
	Checked int64 `json:"checked"`
	// Converged counts pairs where the bot's mirror held the other bot's
	// last value.
	Converged int64 `json:"converged"`
	// Diverged counts pairs where the mirror held another value although
	// the bot had received an offset at or past the other bot's last
	// version: the update was skipped or misapplied. A violation.
	Diverged int64 `json:"diverged"`
	// Behind counts pairs where the bot had not yet received anything at
	// or past the other bot's last version when the drain ended: the
	// update was in flight (late or lost). Not a violation.
	Behind int64 `json:"behind"`
	// Unknown counts pairs not compared because a state update of the
	// other bot had an unknown outcome (answered TIMEOUT, UNAVAILABLE or
	// INTERNAL, or no answer): it may or may not have been applied, so its
	// last value is not known. Not in Checked.
	Unknown int64 `json:"unknown,omitempty"`
}

// pairOutcome is how one bot's mirror compares with another bot's last
// value.
type pairOutcome int

const (
	pairConverged pairOutcome = iota
	pairBehind
	pairDiverged
)

// addPair counts one (bot, other bot) pair: have is the bot's mirror of
// the other's key, want the other's last confirmed value at version;
// reached is the highest offset the bot had received before reading have.
// A wrong value is behind (in flight) while reached is below version, and
// diverged once it is not: the update should have arrived, in order.
func (s *StateResult) addPair(have, want []byte, reached, version uint64) pairOutcome {
	s.Checked++
	switch {
	case bytes.Equal(have, want):
		s.Converged++
		return pairConverged
	case reached < version:
		s.Behind++
		return pairBehind
	}
	s.Diverged++
	return pairDiverged
}

func (s *StateResult) add(o StateResult) {
	s.Checked += o.Checked
	s.Converged += o.Converged
	s.Diverged += o.Diverged
	s.Behind += o.Behind
	s.Unknown += o.Unknown
}
