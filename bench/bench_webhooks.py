"""Benchmark: webhook delivery throughput and latency, PostgreSQL and SQLite side by side.

    .venv/bin/python -m bench.bench_webhooks [--burst 2000] [--rate 50] [--seconds 20]

A ``bot.webhooks.Dispatcher`` delivers to a receiver on loopback (Python's threading HTTP server,
answering 200 at once). Events are written as the chatbot writes them (one transaction each,
spread over 50 chats):

- burst: ``--burst`` events already stored when delivery starts: events/s until all are taken;
- steady: ``--rate`` events a second for ``--seconds``: latency from the event's commit to the
  receiver having the body (p50, p99, max), which includes the dispatcher's 200 ms poll.

Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bot.webhooks import Dispatcher
from database import Database, PostgresDatabase, SqliteDatabase
from tests.pg_cluster import PostgresCluster
from tests.test_webhooks import Receiver

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


def measure(db: Database, args: argparse.Namespace) -> dict[str, float]:
    receiver = Receiver()
    owning = threading.Event()  # set once the burst is written: delivery starts then
    dispatcher = Dispatcher(
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    cluster = PostgresCluster(durable=True).start()
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="zapkeep-bench-webhooks-") as scratch:
            for name, db in (
                ("postgresql", PostgresDatabase(cluster.create_database())),
                ("sqlite", SqliteDatabase(Path(scratch) / "bench.sqlite3")),
            ):
                db.open()
                try:
                    results[name] = measure(db, args)
                finally:
                    db.close()
    finally:
        cluster.stop()
    print(f"\nWebhook deliveries to a receiver on loopback ({CHATS} chats; one dispatcher, one endpoint)\n")
    print(f"| back-end | burst of {args.burst:,}: events/s | steady {args.rate:.0f}/s: p50 | p99 | max | delivered |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['burst_rate']:,.0f} | {r['p50']:.0f} ms | {r['p99']:.0f} ms | {r['max']:.0f} ms | {r['delivered']:,} |"
        )


if __name__ == "__main__":
    main()
