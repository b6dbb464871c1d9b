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
// flight; Server.historyBytes, settled beside it, is the part of it that
// retained events make up, what eviction can free. A write reserves, with a
// compare-and-swap and no lock, an upper bound of what it adds before it
// runs, and settles the difference after: so the total never exceeds the
// budget, and the hot path takes no global lock.
//
// A reservation that does not fit is refused at once, without looking at
// any queue, when the node's history cannot cover the shortfall (state is
// never evicted). Otherwise it runs evictOldest, with no shard lock held
// (evictMu lets one eviction run at a time), which walks the shards twice:
// once to learn the ages of all retained events, once to evict the oldest
// across the node. It evicts down to 7/8 of the budget, so that a flood
// does not walk the node for every write; when state holds so much that
// history cannot get there, it evicts what the write needs plus
// evictSlackDiv of the budget, never all history for one write. A run
// that leaves the write still not fitting (the count raced ahead of the
// queues) makes the node refuse writes that need eviction for evictRest.

// minNodeBytes is the smallest Config.MaxNodeBytes.
const minNodeBytes = 1 << 20

// evictBucketMs groups events by age for evictOldest: all events of one
// such slice of time count as equally old. When the events retained span
// more than maxAgeBuckets such slices (a long --history-age), evictOldest
// doubles the slice until they fit, so its walk allocates a bounded map.
const (
	evictBucketMs = 100
	maxAgeBuckets = 4096
)

// evictSlackDiv: an eviction that cannot reach 7/8 of the budget frees
// what the write needs plus MaxNodeBytes/evictSlackDiv (when there is that
// much history), so that the next writes fit without walking the node.
const evictSlackDiv = 64

// evictRest is how long writes that need eviction are refused after an
// eviction run that did not make room.
const evictRest = time.Second

// retainedByAge walks the shards and returns the bytes of the events
// retained per slice of time: ages[k] holds those with
// (TimeMs/evictBucketMs)>>shift == k. It doubles the slices until there
// are at most maxAgeBuckets of them.
func (s *Server) retainedByAge() (ages map[int64]int64, shift uint) {
	ages = make(map[int64]int64)
	add := func(timeMs int64, bytes int) {
		ages[(timeMs/evictBucketMs)>>shift] += int64(bytes)
		if len(ages) > maxAgeBuckets {
			coarser := make(map[int64]int64, len(ages)/2+1)
			for k, b := range ages {
				coarser[k>>1] += b
			}
			ages, shift = coarser, shift+1
		}
	}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			if q.HistoryBytes() > 0 {
				q.ForEachEvent(add)
			}
		}
		sh.mu.Unlock()
	}
	return ages, shift
}

// Reasons a write or queue creation is refused with LIMIT_EXCEEDED, the
// reason label of imq_queuenode_refused_total.
const (
	refusedNodeBytes    = "node_bytes"
	refusedQueueCreates = "queue_creates"
	refusedCreators     = "creators"
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

// shortfall is how many bytes must be freed for n more to fit.
func (s *Server) shortfall(n int64) int64 {
	return s.nodeBytes.Load() + n - s.cfg.MaxNodeBytes
}

// reserve takes n bytes of the budget, evicting the oldest history across
// the node when they do not fit; LIMIT_EXCEEDED when that is not enough.
// The caller holds no shard lock.
func (s *Server) reserve(n int64) error {
	if s.tryReserve(n) {
		return nil
	}
	if s.historyBytes.Load() < s.shortfall(n) {
		return s.budgetFull() // nothing to walk the node for
	}
	s.evictMu.Lock()
	ok := s.tryReserve(n) // an eviction that just ended may have made room
	if !ok && s.historyBytes.Load() >= s.shortfall(n) && !s.cfg.Now().Before(s.evictRestUntil) {
		s.evictOldest(n)
		if ok = s.tryReserve(n); !ok {
			s.evictRestUntil = s.cfg.Now().Add(evictRest)
			s.m.evictionsFutile.Inc()
		}
	}
	s.evictMu.Unlock()
	if !ok {
		return s.budgetFull()
	}
	return nil
}

func (s *Server) budgetFull() error {
	s.m.refusedNodeBytes.Inc()
	return imqerr.New(imqpb.Code_LIMIT_EXCEEDED, "queue node %s is at its memory budget (%d bytes, --max-node-bytes) and has no more history to evict",
		s.cfg.NodeID, s.cfg.MaxNodeBytes)
}

// lockWithRoom locks sh and, if this node serves queue (MOVED otherwise,
// with nothing reserved), reserves need() bytes (need runs under the lock:
// what the write adds at most, given what the queue holds). When they do
// not fit it unlocks, reserves with eviction, locks again and checks the
// owner and need once more. It returns with sh locked in every case, and
// the bytes reserved, which the caller settles (settleLocked) or gives
// back.
func (s *Server) lockWithRoom(sh *shard, queue string, need func() int64) (reserved int64, err error) {
	sh.mu.Lock()
	if err := s.checkOwnerLocked(queue); err != nil {
		return 0, err
	}
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
	if err := s.checkOwnerLocked(queue); err != nil { // the table changed meanwhile
		s.nodeBytes.Add(-n)
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

// settleLocked brings q's shares of the node's totals up to date, releases
// reserved (the caller's reservation, 0 if none) and counts q's
// evictions. q may be nil (the write created nothing). The caller holds
// q's shard lock.
func (s *Server) settleLocked(q *Queue, reserved int64) {
	var d int64
	if q != nil {
		b := q.Bytes()
		d, q.accounted = b-q.accounted, b
		if h := q.HistoryBytes(); h != q.accountedHistory {
			s.historyBytes.Add(h - q.accountedHistory)
			q.accountedHistory = h
		}
		if ev, ok := q.TakeEvictions(); ok {
			for r, e := range ev {
				if e.Events > 0 {
					s.m.evictedEventsBy[r].Add(float64(e.Events))
					s.m.evictedBytesBy[r].Add(float64(e.Bytes))
				}
			}
		}
	}
	if d != reserved {
		s.nodeBytes.Add(d - reserved)
	}
}

// needLocked is what a write to mount of queue name in sh adds at most
// beside its own bytes: the empty queue and mount it may create.
func (s *Server) needLocked(sh *shard, name string, mounts ...string) int64 {
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

// removeQueueLocked drops q from sh and its bytes from the node's totals.
func (s *Server) removeQueueLocked(sh *shard, q *Queue) {
	s.settleLocked(q, 0) // count what it evicted
	delete(sh.queues, q.Name())
	s.queueCount.Add(-1)
	s.nodeBytes.Add(-q.accounted)
	s.historyBytes.Add(-q.accountedHistory)
	q.accounted, q.accountedHistory = 0, 0
}

// evictOldest evicts the oldest history across the node until the total
// leaves room for n more bytes below 7/8 of the budget; when history is
// too small for that, what n needs plus 1/evictSlackDiv of the budget.
// Queues it empties stay (the idle sweep drops them), so that a resume
// from their head does not report missed. The caller holds evictMu and no
// shard lock.
func (s *Server) evictOldest(n int64) {
	low := s.cfg.MaxNodeBytes - s.cfg.MaxNodeBytes/8
	toFree := s.nodeBytes.Load() + n - low
	if toFree <= 0 {
		return
	}
	if h := s.historyBytes.Load(); h < toFree {
		toFree = min(h, s.shortfall(n)+s.cfg.MaxNodeBytes/evictSlackDiv)
	}
	s.m.evictionRuns.Inc()
	ages, shift := s.retainedByAge() // pass 1
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
	evictAll := cut < 0 // pass 1 found less than the count said (a race): evict it all
	// Pass 2: evict. Events published since pass 1 are newer than cut.
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, q := range sh.queues {
			if q.HistoryBytes() == 0 {
				continue
			}
			q.EvictOldest(func(timeMs int64, bytes int) bool {
				switch k := (timeMs / evictBucketMs) >> shift; {
				case evictAll || k < cut:
					return true
				case k == cut && partial > 0:
					partial -= int64(bytes)
					return true
				}
				return false
			})
			s.settleLocked(q, 0)
		}
		sh.mu.Unlock()
	}
}

// createLimiter bounds the queues each user may create per minute: a token
// bucket per user, MaxQueueCreates deep, refilled at MaxQueueCreates a
// minute. Users whose bucket is full are forgotten by sweep, so it holds
// only users who created queues within the last minute or so; and each
// shard holds at most maxUsers of them. When a shard is full it forgets
// its full buckets at once; when none is, a user it does not hold is
// refused (fail closed: the limit is what stops a script creating queues,
// and a shard fills only when some ten thousand users create queues within
// seconds).
type createLimiter struct {
	perMinute float64
	maxUsers  int // per shard
	shards    [64]limiterShard
}

// limiterShardUsers is createLimiter.maxUsers: 64 × 1024 users, some
// 10 MB of Go heap at most.
const limiterShardUsers = 1024

type limiterShard struct {
	mu    sync.Mutex
	users map[string]*tokens // Guarded by mu.
}

type tokens struct {
	n    float64
	last time.Time
}

func newCreateLimiter(perMinute, maxUsers int) *createLimiter {
	c := &createLimiter{perMinute: float64(perMinute), maxUsers: maxUsers}
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

// allow takes one of user's tokens at now, if it has one; full says it
// was refused because the limiter holds as many users as it may.
func (c *createLimiter) allow(user string, now time.Time) (ok, full bool) {
	sh := &c.shards[xxhash.Sum64String(user)%uint64(len(c.shards))]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	t := sh.users[user]
	if t == nil {
		if len(sh.users) >= c.maxUsers {
			c.sweepLocked(sh, now)
			if len(sh.users) >= c.maxUsers {
				return false, true
			}
		}
		t = &tokens{n: c.perMinute, last: now}
		sh.users[user] = t
	}
	c.refill(t, now)
	if t.n < 1 {
		return false, false
	}
	t.n--
	return true, false
}

// sweep forgets the users whose bucket is full again at now.
func (c *createLimiter) sweep(now time.Time) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		c.sweepLocked(sh, now)
		sh.mu.Unlock()
	}
}

func (c *createLimiter) sweepLocked(sh *limiterShard, now time.Time) {
	for u, t := range sh.users {
		if c.refill(t, now); t.n >= c.perMinute {
			delete(sh.users, u)
		}
	}
}
