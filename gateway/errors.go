package gateway

import (
	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// What clients are answered when routing cannot reach a queue's owner. All
// are UNAVAILABLE, hence retryable, and none of the requests had an effect.
var (
	// errNoTable: cluster mode before the first bucket table (or a table
	// without queue nodes).
	errNoTable = imqerr.New(imqpb.Code_UNAVAILABLE, "the gateway's bucket table has no queue nodes (none received from the boss yet, or every node left); try again")
	// errMoving: nodes kept answering MOVED until the attempts or the
	// request's time ran out. The client gets it with the last node's
	// MOVED message appended (routed.movedErr).
	errMoving = imqerr.New(imqpb.Code_UNAVAILABLE, "queue is moving between nodes; try again")
	// errSuperseded: a join or leave answered MOVED was overtaken by a later
	// join or leave of the same queue on the connection, which decides.
	errSuperseded = imqerr.New(imqpb.Code_UNAVAILABLE, "queue is moving between nodes and a later join or leave of it superseded this one, which had no effect")
	// errShuttingDown: the gateway stopped while a request waited to be
	// sent again.
	errShuttingDown = imqerr.New(imqpb.Code_UNAVAILABLE, "gateway is shutting down")
)
