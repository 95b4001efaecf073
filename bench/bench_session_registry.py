"""Benchmark: what many sessions cost the database, per call, on both back-ends.

    .venv/bin/python -m bench.bench_session_registry [--sessions 100] [--rounds 200]

For N sessions (registered, stored, leased, each with a published live state and a history of
finished commands): ``session_overview`` (``GET /api/sessions``), ``session_ids``, one owner's idle
``claim_commands`` poll over all N fences (what an owner pays per poll when nothing waits),
``publish_live`` (what each state change costs), and on PostgreSQL the time from an
``enqueue_command`` by another instance to the owner's ``wait_for_commands`` returning (median of
``--rounds`` wake-ups). Run on demand; it prints one table (medians, milliseconds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from database import CommandRequest, Database, HeadWrite, LiveState, PostgresDatabase, SqliteDatabase
from tests.pg_cluster import PostgresCluster

JID = "5511:1@s.whatsapp.net"
REQUEST = CommandRequest("POST", "/api/session/stop", "", None, b"")


def populate(db: Database, sessions: int) -> list:
    fences = []
    for i in range(sessions):
        sid = f"s{i:03d}"
        db.register_session(sid)
        db.replace_session(HeadWrite(sid, '{"head": 1}', "sha256:" + "0" * 64, 100, JID, "Loja", "l"), [], 1)
        fences.append(db.acquire_lease(sid, "owner", ttl_seconds=3600))
        db.publish_live(LiveState(sid, "owner", "connected", True, "5511", "Loja", None))
    for fence in fences[:10]:  # a history of finished commands
        for _ in range(20):
            db.enqueue_command(fence.session_id, REQUEST)
    for command in db.claim_commands("owner", fences):
        db.finish_command(command.id, 200, {"ok": True})
    return fences


def median_ms(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def wake_ms(owner: PostgresDatabase, requester: PostgresDatabase, rounds: int) -> float:
    owner.wait_for_commands(0)  # (listening)
    times = []
    for _ in range(rounds):
        heard = threading.Event()
        waiter = threading.Thread(target=lambda: owner.wait_for_commands(30) and heard.set())
        waiter.start()
        while not owner._listener_lock.locked():
            time.sleep(0.001)
        start = time.perf_counter()
        requester.enqueue_command("s000", REQUEST)
        heard.wait(30)
        times.append(time.perf_counter() - start)
        waiter.join()
    return statistics.median(times) * 1000


def measure(db: Database, sessions: int, rounds: int) -> dict[str, float]:
    fences = populate(db, sessions)
    live = LiveState("s000", "owner", "connected", True, "5511", "Loja", None)
    return {
        "session_overview": median_ms(db.session_overview, rounds),
        "session_ids": median_ms(db.session_ids, rounds),
        f"claim_commands, {sessions} fences, none waiting": median_ms(
            lambda: db.claim_commands("owner", fences), rounds
        ),
        "publish_live": median_ms(lambda: db.publish_live(live), rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database()
        pg, other = PostgresDatabase(url), PostgresDatabase(url)
        pg.open()
        other.open()
        results = {"postgresql": measure(pg, args.sessions, args.rounds)}
        results["postgresql"]["enqueue -> owner woken (NOTIFY)"] = wake_ms(pg, other, args.rounds)
        other.close()
        pg.close()
        with tempfile.TemporaryDirectory() as tmp:
            lite = SqliteDatabase(Path(tmp) / "bench.sqlite3")
            lite.open()
            results["sqlite"] = measure(lite, args.sessions, args.rounds)
    finally:
        cluster.stop()

    print(f"\n{args.sessions} sessions, median of {args.rounds} calls, ms\n")
    print("| call | PostgreSQL | SQLite |")
    print("|---|---:|---:|")
    for name in results["postgresql"]:
        lite_value = results["sqlite"].get(name)
        lite_text = "polls" if lite_value is None else f"{lite_value:.2f}"
        print(f"| {name} | {results['postgresql'][name]:.2f} | {lite_text} |")


if __name__ == "__main__":
    main()
