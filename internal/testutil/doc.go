// Package testutil is the generic support code IMQ's tests share: waiting
// for a condition, a context bounded by the test, an address where nothing
// listens, and an output buffer (or a logger writing into one) that a test
// may read while a server writes it. One copy of each, so that every
// package's tests wait and capture logs the same way (like nats-server's
// test/test.go).
//
// # Imports
//
// testutil imports only the standard library and is imported only by
// tests. Being a leaf, it serves the in-package tests of every package,
// services included (package boss, not boss_test), which cannot import
// launch/launchtest: launch imports the services, so that would be an import
// cycle. What composes services (starting a Dev, imq processes, a cluster)
// lives in launch/launchtest instead.
//
// # Concurrency
//
// The helpers are called from the test's goroutine. SyncBuffer is safe for
// concurrent use.
package testutil
