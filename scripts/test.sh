#!/usr/bin/env bash
# Set up (first time) and run the test suite. It starts its own throw-away PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
