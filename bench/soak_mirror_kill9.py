"""Soak: kill -9 a mirroring process at random moments while the store takes a write burst, N times.

Each time the database must hold a committed prefix of whole store transactions, missing at most
the changes of the last second; what is stored must still export and validate at the end.

    .venv/bin/python -m bench.soak_mirror_kill9 [--kills 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.mirror_kill9 import kill_during_writes
from tests.pg_cluster import PostgresCluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cluster = PostgresCluster(durable=True).start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            report = kill_during_writes(Path(scratch), cluster.create_database(), args.kills, args.seed)
            elapsed = time.perf_counter() - started
    finally:
        cluster.stop()
    lags = report.lag_seconds
    print(f"kills                          {report.kills}")
    print(f"store transactions written     {report.transactions_written} (10 rows each)")
    print(f"stored at each kill: prefixes  all whole transactions: {all(p % 10 == 0 for p in report.stored_prefixes)}")
    print(f"missing at a kill, oldest (s)  median {statistics.median(lags):.3f}, max {max(lags):.3f} (goal <= 1 s)")
    print(f"wall time                      {elapsed:.0f} s")


if __name__ == "__main__":
    main()
