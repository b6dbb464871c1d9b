// Package php holds IMQ's PHP integration, for game backends written in PHP:
// ImqClient.php (a dependency-free client of the gateways' admin RPC),
// backend.php (a call-out and auth backend for `php -S`), demo.php (a tour of
// the client against `imq dev`) and README.md. It has no Go code of its own:
// php_test.go runs the real PHP against an in-process cluster
// (launch.StartDev), so `make test` checks the PHP side of the contract
// against the Go side. The tests need php-cli and php-curl; .ci/run installs
// them.
package php
