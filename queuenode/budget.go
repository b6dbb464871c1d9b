package queuenode

import (
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// The node's memory budget (Config.MaxNodeBytes) and the per-user limit on
// queue creation (Config.MaxQueueCreates).
//
// Server.nodeBytes is the sum of every held queue's Bytes (each queue's
// share is its accounted field, brought up to date by settleLocked under
// its shard lock after every operation) plus the reservations of writes in
// flight. A write reserves, with a compare-and-swap and no lock, an upper
// bound of what it adds before it runs, and settles the difference after:
// so the total never exceeds the budget, and the hot path takes no global
// lock. A reservation that does not fit runs evictOldest first, with no
// shard lock held (evictMu lets one eviction run at a time), which walks
// the shards twice: once to learn the ages of all retained events, once to
// evict the oldest across the node, down to 7/8 of the budget so that a
// flood does not walk the node for every write.

// minNodeBytes is the smallest Config.MaxNodeBytes.
const minNodeBytes = 1 << 20

// evictBucketMs groups events by age for evictOldest: all events of one
// such slice of time count as equally old.
const evictBucketMs = 100

// Reasons a write or queue creation is refused with LIMIT_EXCEEDED, the
// reason label of imq_queuenode_refused_total.
const (
	refusedNodeBytes    = "node_bytes"
	refusedQueueCreates = "queue_creates"
	refusedMaxQueues    = "max_queues"
)

// tryReserve takes n bytes of the budget if they fit.
func (s *Server) tryReserve(n int64) bool {
	for {
		cur := s.nodeBytes.Load()
		if cur+n > s.cfg.MaxNodeBytes {
			return false
		}
		if s.nodeBytes.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

// reserve takes n bytes of the budget, evicting the oldest history across
// the node when they do not fit; LIMIT_EXCEEDED when that is not enough.
// The caller holds no shard lock.
func (s *Server) reserve(n int64) error {
	if s.tryReserve(n) {
		return nil
	}
	s.evictMu.Lock()
	ok := s.tryReserve(n) // an eviction that just ended may have made room
	if !ok {
		s.evictOldest(n)
		ok = s.tryReserve(n)
	}
	s.evictMu.Unlock()
	if !ok {
		return s.budgetFull()
	}
	return nil
}

func (s *Server) budgetFull() error {
	s.m.refused.WithLabelValues(refusedNodeBytes).Inc()
	return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s is at its memory budget (%d bytes, --max-node-bytes) and has no more history to evict",
		s.cfg.NodeID, s.cfg.MaxNodeBytes)
}

// lockWithRoom locks sh and reserves need() bytes (need runs under the
// lock: what the write adds at most, given what the queue holds). When
// they do not fit it unlocks, reserves with eviction, locks again and
// checks need once more. It returns with sh locked in every case, and the
// bytes reserved, which the caller settles (settleLocked) or gives back.
func (s *Server) lockWithRoom(sh *shard, need func() int64) (reserved int64, err error) {
	sh.mu.Lock()
	n := need()
	if n <= 0 || s.tryReserve(n) {
		return max(n, 0), nil
	}
	sh.mu.Unlock()
	err = s.reserve(n)
	sh.mu.Lock()
	if err != nil {
		return 0, err
	}
	if n2 := need(); n2 > n { // the queue went away meanwhile
		if !s.tryReserve(n2 - n) {
			s.nodeBytes.Add(-n)
			return 0, s.budgetFull()
		}
		n = n2
	}
	return n, nil
}

// settleLocked brings q's share of the node's total up to date, releases
// reserved (the caller's reservation, 0 if none) and counts q's
// evictions. q may be nil (the write created nothing). The caller holds
// q's shard lock.
func (s *Server) settleLocked(q *Queue, reserved int64) {
	var d int64
	if q != nil {
		b := q.Bytes()
		d, q.accounted = b-q.accounted, b
		for r, e := range q.TakeEvictions() {
			if e.Events > 0 {
				s.m.evictedEvents.WithLabelValues(EvictReason(r).String()).Add(float64(e.Events))
				s.m.evictedBytes.WithLabelValues(EvictReason(r).String()).Add(float64(e.Bytes))
			}
		}
	}
	if d != reserved {
		s.nodeBytes.Add(d - reserved)
	}
}

// needLocked is what a write to mount of queue name in sh adds at most
// beside its own bytes: the empty queue and mount it may create. It is 0
// for a queue this node does not serve (the write is refused MOVED).
func (s *Server) needLocked(sh *shard, name string, mounts ...string) int64 {
	if s.checkOwnerLocked(name) != nil {
		return 0
	}
	var n int64
	q := sh.queues[name]
	if q == nil {
		n += QueueBytes(name)
	}
	for _, m := range mounts {
		if q == nil || q.mounts[m] == nil {
			n += MountBytes(m)
		}
	}
	return n
}

// removeQueueLocked drops q from sh and its bytes from the node's total.
func (s *Server) removeQueueLocked(sh *shard, q *Queue) {
	s.settleLocked(q, 0) // count what it evicted
	delete(sh.queues, q.Name())
	s.queueCount.Add(-1)
	s.nodeBytes.Add(-q.accounted)
	q.accounted = 0
}

// evictOldest evicts the oldest history across the node until the total
// leaves room for n more bytes below 7/8 of the budget, or no history is
// left. The caller holds evictMu and no shard lock.
func (s *Server) evictOldest(n int64) {
	low := s.cfg.MaxNodeBytes - s.cfg.MaxNodeBytes/8
	toFree := s.nodeBytes.Load() + n - low
	if toFree <= 0 {
		return
	}
	s.m.evictionRuns.Inc()
	// Pass 1: the bytes retained per slice of time.
	ages := make(map[int64]int64)
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			q.ForEachEvent(func(timeMs int64, bytes int) { ages[timeMs/evictBucketMs] += int64(bytes) })
		}
		sh.mu.Unlock()
	}
	// The slice where the oldest toFree bytes end, and how much of it goes.
	cut, partial := int64(-1), int64(0)
	var sum int64
	for _, k := range slices.Sorted(maps.Keys(ages)) {
		if sum+ages[k] >= toFree {
			cut, partial = k, toFree-sum
			break
		}
		sum += ages[k]
	}
	evictAll := cut < 0 // not enough history: evict it all
	// Pass 2: evict. Events published since pass 1 are newer than cut.
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			q.EvictOldest(func(timeMs int64, bytes int) bool {
				switch k := timeMs / evictBucketMs; {
				case evictAll || k < cut:
					return true
				case k == cut && partial > 0:
					partial -= int64(bytes)
					return true
				}
				return false
			})
			s.settleLocked(q, 0)
			s.dropIfDisposableLocked(sh, q)
		}
		sh.mu.Unlock()
	}
}

// createLimiter bounds the queues each user may create per minute: a token
// bucket per user, MaxQueueCreates deep, refilled at MaxQueueCreates a
// minute. Users whose bucket is full are forgotten by sweep, so it holds
// only users who created queues within the last minute or so.
type createLimiter struct {
	perMinute float64
	shards    [64]limiterShard
}

type limiterShard struct {
	mu    sync.Mutex
	users map[string]*tokens // Guarded by mu.
}

type tokens struct {
	n    float64
	last time.Time
}

func newCreateLimiter(perMinute int) *createLimiter {
	c := &createLimiter{perMinute: float64(perMinute)}
	for i := range c.shards {
		c.shards[i].users = make(map[string]*tokens)
	}
	return c
}

func (c *createLimiter) refill(t *tokens, now time.Time) {
	if d := now.Sub(t.last); d > 0 {
		t.n = min(c.perMinute, t.n+d.Minutes()*c.perMinute)
		t.last = now
	}
}

// allow takes one of user's tokens at now, if it has one.
func (c *createLimiter) allow(user string, now time.Time) bool {
	sh := &c.shards[xxhash.Sum64String(user)%uint64(len(c.shards))]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	t := sh.users[user]
	if t == nil {
		t = &tokens{n: c.perMinute, last: now}
		sh.users[user] = t
	}
	c.refill(t, now)
	if t.n < 1 {
		return false
	}
	t.n--
	return true
}

// sweep forgets the users whose bucket is full again at now.
func (c *createLimiter) sweep(now time.Time) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		for u, t := range sh.users {
			if c.refill(t, now); t.n >= c.perMinute {
				delete(sh.users, u)
			}
		}
		sh.mu.Unlock()
	}
}
