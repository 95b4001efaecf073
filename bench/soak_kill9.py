"""Soak: kill -9 a process that changes a store and mirrors it, at random moments, N times; the
stored session must always export to a document that validates and restores.

    .venv/bin/python -m bench.soak_kill9 [--iterations 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.kill9 import kill_during_backups
from tests.pg_cluster import PostgresCluster
from tests.synthetic import REALISTIC, create_paired_store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            store = Path(scratch) / "whatsmeow.sqlite3"
            create_paired_store(store, REALISTIC)
            started = time.perf_counter()
            report = kill_during_backups(store, cluster.create_database(), Path(scratch), args.iterations, args.seed)
            elapsed = time.perf_counter() - started
    finally:
        cluster.stop()
    # kill_during_backups raises on the first missing, torn or unrestorable session: reaching here means none.
    print(f"{'kills':>6} {'inside writes':>14} {'syncs completed':>16} {'rows restored each time':>24} {'seconds':>8}")
    print(
        f"{report.iterations:>6} {report.kills_inside_writes:>14} {sum(report.backups_before_kill):>16}"
        f" {report.restored_rows:>24} {elapsed:>8.1f}"
    )


if __name__ == "__main__":
    main()
