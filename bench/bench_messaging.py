"""Benchmark: customer messages through rules + message log + outbox, PostgreSQL and SQLite side by side.

    .venv/bin/python -m bench.bench_messaging [--messages 2000] [--chats 200]

"handle" is the decision path a message takes on the events thread (log it, decide, queue the
reply, in one transaction); "flush" sends the queued replies through a fake client that
answers at once. Prints one table; run on demand.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bot.connection import events
from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES
from bot.messages.chatbot import Chatbot
from bot.messages.outbox import Channel, Outbox
from database import Database, PostgresDatabase, SqliteDatabase
from tests.pg_cluster import PostgresCluster

TEXTS = ["oi", "1", "2", "qual o preço?", "aceita pix?", "obrigado", "cadê meu pedido?", "xyz", "menu", "3"]


def run(db: Database, messages: int, chats: int) -> dict[str, float]:
    rules = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0, mark_read=False)
    ids = itertools.count(1)
    channel = Channel(lambda chat, text: f"OUT{next(ids)}", lambda: True, lambda chat, seconds: None)
    open_hours = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
    sent_at = int(open_hours.timestamp())
    outbox = Outbox(db, "bench", channel, clock=lambda: open_hours)
    bot = Chatbot(db, "bench", rules, outbox, clock=lambda: open_hours)
    latencies = []
    started = time.perf_counter()
    for n in range(messages):
        chat = f"55119{n % chats:08d}@s.whatsapp.net"
        message = events.IncomingMessage(f"IN{n}", chat, chat, "Cliente", TEXTS[n % len(TEXTS)], False, False, sent_at)
        t0 = time.perf_counter()
        bot.handle(message)
        latencies.append((time.perf_counter() - t0) * 1000)
    handled = time.perf_counter()
    sent = 0
    while (batch := outbox.flush()) > 0:
        sent += batch
    finished = time.perf_counter()
    t0 = time.perf_counter()
    for n in range(200):  # redeliveries: recognised and dropped
        bot.handle(events.IncomingMessage(f"IN{n}", "x@s.whatsapp.net", "x", "", "oi", False, False, sent_at))
    duplicate_ms = (time.perf_counter() - t0) * 1000 / 200
    latencies.sort()
    return {
        "messages/s end to end": messages / (finished - started),
        "handle p50 ms": statistics.median(latencies),
        "handle p99 ms": latencies[int(len(latencies) * 0.99) - 1],
        "flush ms per reply": (finished - handled) * 1000 / max(sent, 1),
        "duplicate ms": duplicate_ms,
        "replies sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--chats", type=int, default=200)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            results = {}
            for name, db in (
                ("postgresql", PostgresDatabase(cluster.create_database())),
                ("sqlite", SqliteDatabase(Path(scratch) / "bench.sqlite3")),
            ):
                db.open()
                results[name] = run(db, args.messages, args.chats)
                db.close()
    finally:
        cluster.stop()
    print(f"{args.messages} messages over {args.chats} chats, shipped rules, fake client")
    print(f"{'metric':24} {'postgresql':>12} {'sqlite':>12} {'pg/sqlite':>10}")
    for metric in results["postgresql"]:
        pg, lite = results["postgresql"][metric], results["sqlite"][metric]
        print(f"{metric:24} {pg:>12.2f} {lite:>12.2f} {pg / lite if lite else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
