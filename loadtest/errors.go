package loadtest

import "errors"

// ErrRemoteTarget is returned for a non-loopback target without AllowRemote.
var ErrRemoteTarget = errors.New("target is not a loopback address (127.0.0.0/8, ::1, localhost); pass --allow-remote to load a remote cluster")

// Errors Report.Err wraps: why a run failed.
var (
	// ErrAborted: an abort threshold stopped the run.
	ErrAborted = errors.New("load test aborted")
	// ErrConnect: no bot, or more than --abort-errors of them, could connect.
	ErrConnect = errors.New("load test: bots could not connect")
	// ErrRequests: more of the run's requests failed than --abort-errors
	// allows (with it off, more than half).
	ErrRequests = errors.New("load test: requests failed")
	// ErrViolations: the bots saw protocol violations.
	ErrViolations = errors.New("load test saw protocol violations")
)
