package client

import "time"

// backoff returns how long to wait before attempt n (from 0): a uniform draw
// from [0, min(hi, lo·2ⁿ)], "full jitter" (AWS Architecture Blog,
// "Exponential Backoff And Jitter"). rnd(n) returns a value in [0, n), as
// rand.Int64N does.
func backoff(lo, hi time.Duration, attempt int, rnd func(int64) int64) time.Duration {
	ceil := lo
	for range attempt {
		if ceil >= hi/2 {
			ceil = hi
			break
		}
		ceil *= 2
	}
	return time.Duration(rnd(int64(min(ceil, hi)) + 1))
}
