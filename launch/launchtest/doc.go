// Package launchtest is the support code that composes IMQ's services for
// tests: starting an in-process cluster (StartDev), building the imq binary
// (Binary), and running imq processes alone (StartProcess) or as a local
// cluster (StartCluster), each learning its addresses from its ready file,
// and stopped and checked for data races when the test ends. One copy of
// each, so that the tests of every package start a cluster the same way
// (like net/http/httptest for net/http). The generic helpers (WaitFor,
// SyncBuffer, ...) are in internal/testutil.
//
// # Imports
//
// launchtest is imported only by tests. It sits above the services, beside
// launch, and imports launch. So the in-package tests of a package that
// launch imports (boss, gateway, queuenode: package boss, not boss_test)
// cannot import it, which Go refuses as an import cycle; their external
// tests (package gateway_test) can.
//
// # Concurrency
//
// The helpers are called from the test's goroutine. SyncBuffer is safe for
// concurrent use.
package launchtest
