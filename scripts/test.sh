#!/usr/bin/env bash
# Set up (first time) and run the test suite. It starts its own throw-away PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-dev.txt
# Any real WhatsApp client a test starts dials a closed loopback port: nothing leaves the machine.
export HTTPS_PROXY=http://127.0.0.1:9
exec .venv/bin/python -m pytest "$@"
