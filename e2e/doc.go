// Package e2e holds the end-to-end tests: they build the imq binary and run
// gateways and queue nodes as separate processes on 127.0.0.1, then drive
// them with the Go client and raw WebSockets. It has no non-test code.
package e2e
