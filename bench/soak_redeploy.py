"""Soak: N overlapping redeploys of real daemons on one PostgreSQL, then a kill -9 take-over.

    .venv/bin/python -m bench.soak_redeploy [--iterations 20]

Every iteration asserts what the test suite asserts (standby never touches the store, the
old owner exits 0 after releasing, the new one restores the same store); prints the
hand-over times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tests.pg_cluster import PostgresCluster
from tests.redeploy import LEASE, crash_takeover, overlapping_redeploys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            report = overlapping_redeploys(cluster.create_database(), Path(scratch), args.iterations)
            crash = crash_takeover(cluster.create_database(), Path(scratch))
    finally:
        cluster.stop()
    times = sorted(report.handover_seconds)
    # overlapping_redeploys raises at the first misbehaving iteration: reaching here means all passed.
    print(f"{'redeploys':>9} {'handover min':>13} {'median':>7} {'max':>6}   (SIGTERM of the old -> new owns)")
    print(f"{report.iterations:>9} {times[0]:>12.2f}s {statistics.median(times):>6.2f}s {times[-1]:>5.2f}s")
    print(f"kill -9 take-over: {crash:.2f} s with LEASE_TTL_SECONDS={LEASE['LEASE_TTL_SECONDS']}")


if __name__ == "__main__":
    main()
