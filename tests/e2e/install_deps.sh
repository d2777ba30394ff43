#!/usr/bin/env bash
# Installs what the end-to-end suite needs beyond the venv: Node's `ws` (into tests/e2e/node, which
# the suite owns) and Debian's headless Chromium. Idempotent, quiet, and fast when already installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi

# Node's ws@8, pinned by tests/e2e/node/package.json. tank-websocket.js is not on the npm
# registry, so tests/e2e/node/tank_client_replay.js reproduces its 2.0.3 behaviour (PROTOCOL.md).
if [ ! -f "$here/node/node_modules/ws/package.json" ]; then
    npm install --prefix "$here/node" --no-package-lock --no-audit --no-fund --loglevel=error >/dev/null
fi

# Debian's chromium, for the browser test.
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
