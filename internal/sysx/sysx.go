// Package sysx holds the few operating-system details IMQ depends on: the
// open-file limit and recognising its exhaustion. It imports no IMQ package.
package sysx

import (
	"errors"
	"syscall"
)

// RaiseFileLimit raises the soft open-file limit to the hard limit and
// returns the resulting soft limit.
func RaiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	if lim.Cur < lim.Max {
		want := lim
		want.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return lim.Cur, err
		}
		lim = want
	}
	return lim.Cur, nil
}

// FileLimit returns the current soft open-file limit.
func FileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	return lim.Cur
}

// IsResourceExhausted reports whether err means the process or system ran out
// of file descriptors (or memory for sockets), the accept errors that pass.
func IsResourceExhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}
