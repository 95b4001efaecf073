"""Benchmark: snapshot, save, load and restore of a realistic whatsmeow store.

    .venv/bin/python -m bench.bench_persistence [--rounds N]

Prints one table; run on demand (never part of the test suite). Each row is the median of
N rounds, so back-ends and steps compare side by side within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bot.persistence import snapshot_to_write
from bot.session_store import restore_snapshot, take_snapshot
from bot.store_worker import restore_store, snapshot_store
from database import Database, PostgresDatabase, SqliteDatabase
from tests.pg_cluster import PostgresCluster
from tests.synthetic import REALISTIC, StoreSize, create_paired_store

LARGE = StoreSize(pre_keys=800, sessions=2000, contacts=5000, sender_keys=400, app_state_keys=60, mutation_macs=3000)


def median_ms(action: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bench_store(label: str, size: StoreSize, databases: dict[str, Database], work: Path, rounds: int) -> list[str]:
    store = work / label / "whatsmeow.sqlite3"
    create_paired_store(store, size)
    snapshot = snapshot_store(store)
    rows = [
        f"{label:9} store file                      {store.stat().st_size / 1024:10.0f} KiB",
        f"{label:9} document ({snapshot.total_rows} rows)          {snapshot.size_bytes / 1024:10.0f} KiB",
        f"{label:9} snapshot in-process (encode)    {median_ms(lambda: take_snapshot(store), rounds):10.1f} ms",
        f"{label:9} snapshot via worker process     {median_ms(lambda: snapshot_store(store), rounds):10.1f} ms",
        f"{label:9} restore in-process              "
        f"{median_ms(lambda: restore_snapshot(take_snapshot(store), work / label / 'r1' / 's.sqlite3'), rounds):10.1f} ms*",
        f"{label:9} restore via worker process      "
        f"{median_ms(lambda: restore_store(snapshot.text, work / label / 'r2' / 's.sqlite3'), rounds):10.1f} ms",
    ]
    for name, db in databases.items():
        counter = iter(range(10**6))

        def save_changed() -> None:
            # a distinct checksum each round, so every save really writes
            write = snapshot_to_write(label, snapshot)
            db.save_session(write.__class__(**{**write.__dict__, "checksum": f"{write.checksum}-{next(counter)}"}))

        rows.append(f"{label:9} save to {name:10}              {median_ms(save_changed, rounds):10.1f} ms")
        rows.append(
            f"{label:9} save unchanged {name:10}       "
            f"{median_ms(lambda: db.save_session(snapshot_to_write(label, snapshot)), rounds):10.1f} ms"
        )
        rows.append(
            f"{label:9} load from {name:10}            {median_ms(lambda: db.load_session(label), rounds):10.1f} ms"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            databases: dict[str, Database] = {
                "postgresql": PostgresDatabase(cluster.create_database()),
                "sqlite": SqliteDatabase(work / "zapkeep.sqlite3"),
            }
            for db in databases.values():
                db.open()
            print(f"{'store':9} {'step':31} {'median':>10}  ({args.rounds} rounds; * includes an in-process snapshot)")
            for label, size in (("realistic", REALISTIC), ("large", LARGE)):
                for row in bench_store(label, size, databases, work, args.rounds):
                    print(row)
            for db in databases.values():
                db.close()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
