#!/usr/bin/env bash
# Put each small bug of scripts/mutations.toml into a copy of the tree, one at a time, run the tests
# that should catch it, and print caught or missed with the test's name (docs/testing.md).
#
#   ./scripts/mutations.sh [--only TEXT]... [--no-baseline] [--check] [--keep] [--table FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-dev.txt
export HTTPS_PROXY=http://127.0.0.1:9
exec .venv/bin/python scripts/mutations.py "$@"
