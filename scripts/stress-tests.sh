#!/usr/bin/env bash
# Run the whole test suite several times in a row on a loaded machine, stopping at the first failure:
# a busy loop on every core, and with --pg-load also a writer keeping the suite's PostgreSQL busy.
#
#   ./scripts/stress-tests.sh [--runs N] [--pg-load] [pytest arguments...]     (default: 10 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=10
pg_load=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --pg-load) pg_load=1; shift ;;
        *) break ;;
    esac
done
source scripts/venv.sh requirements-dev.txt
burners=()
for _ in $(seq "$(nproc)"); do
    python3 -c 'while True: pass' &
    burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null || true' EXIT
export ZAPKEEP_TEST_PG_LOAD=$pg_load
for run in $(seq "$runs"); do
    started=$(date +%s)
    if ./scripts/test.sh -q -p no:cacheprovider "$@" > "/tmp/zapkeep-stress-$pg_load-$run.log" 2>&1; then
        echo "run $run/$runs: $(tail -1 "/tmp/zapkeep-stress-$pg_load-$run.log") ($(( $(date +%s) - started )) s)"
    else
        echo "run $run/$runs FAILED ($(( $(date +%s) - started )) s): log in /tmp/zapkeep-stress-$pg_load-$run.log"
        grep -E '^(FAILED|ERROR) tests/' "/tmp/zapkeep-stress-$pg_load-$run.log" || tail -20 "/tmp/zapkeep-stress-$pg_load-$run.log"
        exit 1
    fi
done
echo "all $runs runs passed (load: $(nproc) busy cores$([ "$pg_load" = 1 ] && echo ', PostgreSQL writes'))"
