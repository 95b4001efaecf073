#!/usr/bin/env bash
# Set up (first time) and run the daemon: python -m bot, reading .env if present.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements.txt
exec .venv/bin/python -m bot "$@"
