#!/usr/bin/env bash
# Installs php-cli and php-curl from Debian's packages when either is
# missing: the PHP examples' tests (examples/php) run the real PHP. `make
# test` runs this first. Idempotent: nothing happens when both are there.
set -euo pipefail
if ! command -v php >/dev/null 2>&1 || ! php -r 'exit(extension_loaded("curl") ? 0 : 1);' >/dev/null 2>&1; then
	echo "installing php-cli and php-curl (apt-get)"
	sudo=()
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null 2>&1 || { echo "php is missing and installing it needs root (or sudo): apt-get install php-cli php-curl" >&2; exit 1; }
		sudo=(sudo)
	fi
	export DEBIAN_FRONTEND=noninteractive
	"${sudo[@]}" apt-get update -qq
	"${sudo[@]}" apt-get install -y -qq --no-install-recommends php-cli php-curl >/dev/null
fi
php -r 'echo "php ", PHP_VERSION, " (curl ", curl_version()["version"], ")\n";'
