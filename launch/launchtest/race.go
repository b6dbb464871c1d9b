//go:build race

package launchtest

// raceEnabled: the test runs under the race detector, so the imq binary
// Binary builds does too.
const raceEnabled = true
