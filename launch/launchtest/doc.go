// Package launchtest is the support code that IMQ's tests share: starting
// an in-process cluster, waiting for a condition, an output buffer a test
// may read while a server writes it, and an address where nothing listens.
// One copy of each, so that the tests of every package start a cluster and
// wait the same way (like net/http/httptest for net/http).
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
