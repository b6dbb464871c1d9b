package cluster

import "errors"

var (
	// errNoInstall: Start needs the service's install hook.
	errNoInstall = errors.New("cluster: no install hook")
	// errNotBoss: an answer to a long poll that the boss would not give.
	errNotBoss = errors.New("the boss URL does not long-poll like the boss")
)
