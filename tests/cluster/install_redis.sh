#!/usr/bin/env bash
# Installs Debian's redis-server for tests/cluster when it is missing. Idempotent, quiet, and
# instant when already installed. The suite starts its own instances on free loopback ports
# (tests/cluster/conftest.py); a system service the package may start is not used.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]
