package loadtest

import (
	"math"
	"math/rand/v2"
	"time"
)

// poisson draws the waits between the events of a Poisson process of a
// given rate. A zero rate never fires.
type poisson struct {
	rng  *rand.Rand
	rate float64 // events per second
}

// maxWaitFactor bounds one wait at this many mean intervals, so that a
// single unlucky draw cannot stall a bot for the whole run (the tail beyond
// it has probability e^-20).
const maxWaitFactor = 20

// never is the wait of a process with rate 0: longer than any run.
const never = time.Duration(math.MaxInt64)

// next returns the wait before the next event: exponentially distributed
// with mean 1/rate, at least 1µs and at most maxWaitFactor/rate.
func (p poisson) next() time.Duration {
	if p.rate <= 0 {
		return never
	}
	u := 1 - p.rng.Float64() // (0, 1]
	secs := min(-math.Log(u)/p.rate, maxWaitFactor/p.rate)
	return max(time.Microsecond, time.Duration(secs*float64(time.Second)))
}

// maxActions bounds how many actions one bot may take in a run of duration
// d: four times the expected count, plus slack. Every bot loop stops at the
// first of its deadline and this count.
func maxActions(s Scenario, d time.Duration) int {
	perSec := s.ChatRate + s.StateRate + s.ChurnRate/60
	return int(4*perSec*d.Seconds()) + 100
}
