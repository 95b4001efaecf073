"""Benchmark: how soon after a PostgreSQL outage ends the daemon's database is usable again.

    .venv/bin/python -m bench.bench_db_outage [--outage 60]

One throw-away cluster. The server is stopped (``pg_ctl stop -m fast``) while three callers keep
using the pool (as the lease keeper, the mirror and the outbox do), then started again. Printed:
the pool's connection attempts during the outage, the longest gap between two of them in its
second half (how long a server that is back may wait for the next attempt: the worst case of the
recovery), and the time from the server accepting connections to the first query that succeeds
(one sample: it depends on where the attempts happen to fall). Side by side in one run:
psycopg_pool's own retry series (a doubling delay: 1, 2, 4, 8... s) and zapkeep's (the same,
capped at ``database.RECONNECT_DELAY_CAP_SECONDS``). Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from database import RECONNECT_DELAY_CAP_SECONDS, PostgresDatabase
from tests.pg_cluster import PostgresCluster


def usable(db: PostgresDatabase) -> bool:
    try:
        with db.transaction() as tx:
            tx.execute("SELECT 1")
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class Outage:
    attempts: int
    longest_gap_late: float  # between two connection attempts, in the outage's second half
    usable_after: float  # from the server being back to the first successful query


class Attempts(logging.Handler):
    """psycopg_pool logs each failed connection attempt ("error connecting in ...")."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("error connecting"):
            self.times.append(time.monotonic())


def outage(cluster: PostgresCluster, url: str, seconds: float, delay_cap: float | None) -> Outage:
    db = PostgresDatabase(url, connect_timeout=2, wait_timeout=2, reconnect_delay_cap=delay_cap)
    db.open()
    stopping = threading.Event()
    attempts = Attempts()
    pool_log = logging.getLogger("psycopg.pool")
    pool_log.addHandler(attempts)

    def caller(every: float) -> None:
        while not stopping.is_set():
            usable(db)
            stopping.wait(every)

    callers = [threading.Thread(target=caller, args=(every,), daemon=True) for every in (0.2, 1.0, 2.0)]
    try:
        for thread in callers:
            thread.start()
        time.sleep(1)
        cluster.stop_server()
        down = time.monotonic()
        time.sleep(seconds)
        cluster.start_server()  # returns once the server accepts connections
        back = time.monotonic()
        while not usable(db):
            time.sleep(0.05)
        usable_after = time.monotonic() - back
    finally:
        stopping.set()
        for thread in callers:
            thread.join()
        pool_log.removeHandler(attempts)
        db.close()
    late = [t for t in attempts.times if t >= down + seconds / 2] + [back]
    gaps = [b - a for a, b in itertools.pairwise(late)]
    return Outage(len(attempts.times), max(gaps, default=seconds / 2), usable_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the server is away")
    seconds = parser.parse_args().outage
    logging.getLogger("psycopg.pool").propagate = False  # one line per attempt: counted, not printed
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database()
        default = outage(cluster, url, seconds, None)
        ours = outage(cluster, url, seconds, RECONNECT_DELAY_CAP_SECONDS)
    finally:
        cluster.stop()
    print(f"PostgreSQL away for {seconds:.0f} s, three callers using the pool")
    print(f"{'retry series':<30} | attempts | longest gap, 2nd half | usable again after")
    print(f"{'-' * 30}-+----------+-----------------------+-------------------")
    for name, result in (
        ("psycopg_pool's doubling delay", default),
        (f"zapkeep (capped at {RECONNECT_DELAY_CAP_SECONDS:.0f} s)", ours),
    ):
        print(
            f"{name:<30} | {result.attempts:>8} | {result.longest_gap_late:>19.1f} s | {result.usable_after:>15.1f} s"
        )
    print(f"longest gap: {default.longest_gap_late / max(ours.longest_gap_late, 0.01):.1f}x shorter")


if __name__ == "__main__":
    main()
