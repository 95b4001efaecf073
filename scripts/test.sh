#!/usr/bin/env bash
# Set up (first time) and run the test suite. It starts its own throw-away PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-dev.txt
# The web console's browser tests drive Debian's Chromium (Playwright never downloads a browser here);
# without it they fail (a skip would let the suite pass with the console unchecked).
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing Debian's chromium for the browser tests..." >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; }; then
            echo "error: chromium could not be installed; tests/test_web_console.py will fail" >&2
        fi
    else
        echo "error: no Chromium at ${CHROMIUM:-/usr/bin/chromium} (apt-get install chromium as root, or set" \
            "CHROMIUM); tests/test_web_console.py will fail" >&2
    fi
fi
# Any real WhatsApp client a test starts dials a closed loopback port: nothing leaves the machine.
export HTTPS_PROXY=http://127.0.0.1:9
exec .venv/bin/python -m pytest "$@"
