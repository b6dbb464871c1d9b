// Package loadtest runs bots against an IMQ cluster before real players
// arrive (a "dark launch") and reports what they saw: `imq loadtest`.
//
// Each bot is a real client built on the public SDK (client/): it connects
// with its own user id, joins its room queue (a "chat" MESSAGE mount and a
// "scores" STATE mount), chats at a Poisson rate, sets its own key in the
// scores mount, and leaves and rejoins at a churn rate. Bots check what they
// receive as it arrives (per-queue order, no duplicates, no gaps) and, at the
// end, that every message published while they were joined arrived exactly
// once and that every other bot's key in their state mirror holds its last
// value. Membership intervals are measured in queue offsets, not clocks: a
// bot sets its own key right after joining and right before leaving, and the
// versions the server returns bound the offsets it must have received.
// When the load stops the bots keep receiving for a bounded drain; what a
// later offset proves skipped is a violation, what has not arrived by then
// with nothing later either is reported as in flight (late or lost).
//
// Run drives one scenario, in process or split by room over worker
// processes (the same binary re-executed in worker mode, see RunWorker),
// prints a progress line each second, stops early past the abort
// thresholds, and returns a Report that WriteSummary, WriteJSON and
// WriteHTML render.
//
// The package imports client/ and internal/sysx; nothing in IMQ imports it
// except cmd/imq. It keeps no package-level mutable state. Run and
// RunWorker may be called concurrently; each call owns its bots, whose
// goroutines all end before it returns.
package loadtest
