"""Benchmark: webhook delivery throughput and latency, PostgreSQL and SQLite side by side.

    .venv/bin/python -m bench.bench_webhooks [--burst 2000] [--rate 50] [--seconds 20] [--compare main]
    .venv/bin/python -m bench.bench_webhooks --broken [--window 30] [--compare main]

A ``bot.messages.webhooks.Dispatcher`` delivers to a receiver on loopback (Python's threading HTTP server,
answering 200 at once). Events are written as the chatbot writes them (one transaction each,
spread over 50 chats):

- burst: ``--burst`` events already stored when delivery starts: events/s until all are taken;
- steady: ``--rate`` events a second for ``--seconds``: latency from the event's commit to the
  receiver having the body (p50, p99, max), which includes the dispatcher's 200 ms poll.

With ``--broken``: a hostile or broken receiver (``tests.test_webhooks.BrokenReceiver``) answers
the events of one chat with garbage, a 70 KB header line, 150 headers, a 200 with a broken chunked
body, or a 200 whose headers trickle in one line every 5 s; 10 other chats' events follow. For
each, over ``--window`` seconds (SQLite; the database plays no part in it): the attempts at the
broken chat's event and the waits between them, the failed attempts the endpoint's status counts,
the WARNING lines logged, the other chats' events delivered, how long the trickled attempt was
held open, and how long ``Dispatcher.stop()`` then takes. ``--compare REV`` runs the same with
``bot/messages/webhooks.py`` as it is at the git revision REV, side by side.

Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import bot.messages.webhooks
from database import Database, PostgresDatabase, SqliteDatabase
from tests.pg_cluster import PostgresCluster
from tests.test_webhooks import BROKEN_ANSWERS, BrokenReceiver, Receiver

SESSION = "default"
CHATS = 50


def write_event(db: Database, n: int) -> None:
    chat = f"55119{n % CHATS:08d}@s.whatsapp.net"
    payload = {"id": n, "chat": chat, "direction": "in", "type": "text", "text": f"mensagem {n} " + "x" * 80}
    db.record_event(SESSION, "message.received", chat, payload)


def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the receiver did not get every event")
        time.sleep(0.005)


def measure(
    db: Database, args: argparse.Namespace, module: types.ModuleType = bot.messages.webhooks
) -> dict[str, float]:
    receiver = Receiver()
    owning = threading.Event()  # set once the burst is written: delivery starts then
    dispatcher = module.Dispatcher(
        db, SESSION, receiver.url, "bench-secret", event_types=("message.received",), owns_session=owning.is_set
    )
    dispatcher.start()  # registered: it takes every event from now on
    try:
        for n in range(args.burst):
            write_event(db, n)
        first = db.last_event_id(SESSION) - args.burst + 1
        began = time.monotonic()
        owning.set()
        wait_for(lambda: len(receiver.arrivals) >= args.burst, 600)
        burst_seconds = max(receiver.arrivals[i] for i in range(first, first + args.burst)) - began

        committed: dict[int, float] = {}
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        for n in range(args.burst, args.burst + int(args.rate * args.seconds)):
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            write_event(db, n)
            committed[db.last_event_id(SESSION)] = time.monotonic()
        wait_for(lambda: all(i in receiver.arrivals for i in committed), 120)
    finally:
        dispatcher.stop()
        receiver.close()
    latencies = sorted((receiver.arrivals[i] - t) * 1000 for i, t in committed.items())
    return {
        "burst_rate": args.burst / burst_seconds,
        "p50": statistics.median(latencies),
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1],
        "delivered": dispatcher.status.delivered,
    }


POISONED = "5511900000000@s.whatsapp.net"


def webhooks_at(revision: str) -> types.ModuleType:
    """``bot/messages/webhooks.py`` as it is at a git revision, loaded beside the current one (a
    revision from after the regroup of issue 24: older ones import modules that have moved)."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:bot/messages/webhooks.py"], check=True, capture_output=True, text=True
    )
    module = types.ModuleType(f"bot.messages.webhooks@{revision}")
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    exec(compile(shown.stdout, f"{revision}:bot/messages/webhooks.py", "exec"), module.__dict__)
    return module


class Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def broken(module: types.ModuleType, kind: str, window: float, scratch: Path) -> dict[str, object]:
    """One broken receiver against one version of the dispatcher, with its shipped timings."""
    db = SqliteDatabase(scratch / f"{module.__name__}-{kind}.sqlite3".replace(" ", "-"))
    db.open()
    receiver = BrokenReceiver(kind, poisoned=POISONED, trickle_seconds=5.0)
    warnings = Counting()
    logger = module.log  # (its logger by the name it gives itself)
    logger.addHandler(warnings)
    dispatcher = module.Dispatcher(
        db, SESSION, receiver.url, "bench-secret", event_types=("message.received",), owns_session=lambda: True
    )
    try:
        dispatcher.start()
        db.record_event(SESSION, "message.received", POISONED, {"chat": POISONED, "text": "oi"})
        for n in range(1, 11):
            write_event(db, n)
        time.sleep(window)
        began = time.monotonic()
        dispatcher.stop()
        stop_seconds = time.monotonic() - began
    finally:
        logger.removeHandler(warnings)
        receiver.close()
        db.close()
    came = next(iter(receiver.attempts.values()), [])
    waits = [b - a for a, b in itertools.pairwise(came)]
    held = receiver.held[0] if receiver.held else (window if came else 0.0)
    return {
        "attempts": len(came),
        "waits": ", ".join(f"{w:.1f}" for w in waits[:4]) + (" ..." if len(waits) > 4 else "") or "-",
        "counted": dispatcher.status.failed_attempts,
        "warnings": warnings.count,
        "others": len(receiver.accepted),
        "held": f"{held:.1f} s" + ("" if receiver.held or not came else " (still open)") if kind == "trickle" else "-",
        "stop": stop_seconds,
    }


def main_broken(args: argparse.Namespace) -> None:
    versions = [("this tree", bot.messages.webhooks)]
    if args.compare:
        versions.insert(0, (args.compare, webhooks_at(args.compare)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="zapkeep-bench-webhooks-") as scratch:
        for kind in [*BROKEN_ANSWERS, "trickle"]:
            for name, module in versions:
                rows.append((kind, name, broken(module, kind, args.window, Path(scratch))))
    print(f"\nA broken receiver for one chat's event, then 10 other chats' events; {args.window:.0f} s each\n")
    print(
        "| receiver answers | code | attempts | waits between (s) | failed attempts counted | WARNINGs | "
        "other chats delivered | trickled attempt held | stop() took |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, name, r in rows:
        print(
            f"| {kind} | {name} | {r['attempts']} | {r['waits']} | {r['counted']} | {r['warnings']} | "
            f"{r['others']} of 10 | {r['held']} | {r['stop']:.1f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--broken", action="store_true", help="broken receivers instead of throughput")
    parser.add_argument("--window", type=float, default=30.0, help="seconds each broken receiver is watched")
    parser.add_argument(
        "--compare", metavar="REV", help="also run bot/messages/webhooks.py as it is at this git revision"
    )
    args = parser.parse_args()
    if args.broken:
        main_broken(args)
        return
    versions = [("this tree", bot.messages.webhooks)]
    if args.compare:
        versions.insert(0, (args.compare, webhooks_at(args.compare)))
    cluster = PostgresCluster(durable=True).start()
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="zapkeep-bench-webhooks-") as scratch:
            for backend in ("postgresql", "sqlite"):
                for version, module in versions:
                    if backend == "postgresql":
                        db: Database = PostgresDatabase(cluster.create_database())
                    else:
                        db = SqliteDatabase(Path(scratch) / f"bench-{len(results)}.sqlite3")
                    db.open()
                    try:
                        results[(backend, version)] = measure(db, args, module)
                    finally:
                        db.close()
    finally:
        cluster.stop()
    print(f"\nWebhook deliveries to a receiver on loopback ({CHATS} chats; one dispatcher, one endpoint)\n")
    print(
        f"| back-end | code | burst of {args.burst:,}: events/s | steady {args.rate:.0f}/s: p50 | p99 | max | delivered |"
    )
    print("|---|---|---|---|---|---|---|")
    for (backend, version), r in results.items():
        print(
            f"| {backend} | {version} | {r['burst_rate']:,.0f} | {r['p50']:.0f} ms | {r['p99']:.0f} ms | "
            f"{r['max']:.0f} ms | {r['delivered']:,} |"
        )


if __name__ == "__main__":
    main()
