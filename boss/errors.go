package boss

import "errors"

// ErrBadState reports a state file in Config.DataDir that cannot be read
// back. The boss refuses to start rather than overwrite it: move it away to
// start from the members' tables instead.
var ErrBadState = errors.New("boss: unreadable state file")

// errPersist is what /healthz reports while the last write of the state
// failed.
var errPersist = errors.New("the bucket table could not be persisted; see the logs")
