// Package launch starts IMQ services for development and tests, never for a
// production deployment (each service runs there as its own `imq` process
// under the operator's supervisor).
//
// StartDev composes a boss, a queue node and a gateway in one process (`imq
// dev`, and tests), with one metrics registry. StartCluster runs a local
// cluster of separate imq processes on free ports (`imq cluster`, the
// end-to-end tests): it starts the boss, then the queue nodes and gateways
// joined to it, learns each process's addresses from the ready file it
// writes once it serves (--ready-file: <dir>/<name>.ready, see Ready), and
// passes secrets (the gossip key, the gateways' JWT secret and API keys)
// in the processes' environment, never on their command lines. Supervise
// restarts a process that exits, on the addresses it had, with a backoff
// that doubles while it keeps failing (SuperviseConfig); Stop stops the
// gateways first, then the queue nodes, then the boss. StartProcess runs
// one imq process on its own (a standalone queue node, a gateway wired to
// it, imq dev) and learns its addresses the same way.
//
// The cluster's operations (operations.go) change a running cluster's shape
// as an operator does, through the boss's API: Drain and Undrain a queue
// node (with the operator key), wait until it holds no bucket or its share
// again (WaitDrained, WaitServing, read from the boss's table, moves
// included), replace a queue node or a gateway by a new process with the
// same id and addresses (RollQueueNode, RollGateway), and Pause and Resume
// a process (SIGSTOP, SIGCONT).
//
// # Imports
//
// launch sits above the services: it imports boss/, gateway/, queuenode/
// and internal/ (member, obs, bucket, cluster), and only cmd/imq and the tests import it.
// No service imports it. Tests start a Dev through launch/launchtest, which
// also holds the rest of the support code the tests share.
//
// # Concurrency
//
// StartDev runs each service's Run in a goroutine of its own, ending at
// Dev.Shutdown; their errors arrive on Dev.Err (buffered, one per
// service). Each Process started by a Cluster has one goroutine that copies
// its stderr to its log file (and ClusterConfig.Output), ending when the
// process exits; Process is safe for
// concurrent use. Supervise runs one goroutine per process, all ending when
// its ctx ends and no restart is under way: call Stop after Supervise
// returns, never during it. Cluster's other methods (AddQueueNode,
// AddGateway, Restart, the operations) are for one goroutine at a time,
// not during Supervise.
package launch
