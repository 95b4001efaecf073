"""Benchmark: how long a write takes when it goes through the session's owner as a command.

    .venv/bin/python -m bench.bench_commands [--requests 50]

Two daemons' assemblies (``bot.host.Host`` behind waitress on loopback, the fake WhatsApp) on one
database, with the production timings (SQLite: the owner polls for commands every 0.5 s;
PostgreSQL: LISTEN/NOTIFY): daemon a owns session ``vendas`` (paired), daemon b hosts another
session only. ``POST /api/sessions/vendas/start`` on the connected session (200, left alone) is
timed asked of a itself, then asked of b, which stores it as a command that a executes and answers.
Both back-ends; prints one table. Run on demand.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bot.host import Host
from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES, Config
from bot.session.state import State
from database import Database, PostgresDatabase, SqliteDatabase
from session_api import create_app, execute_command
from session_api.server import ApiServer
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.pg_cluster import PostgresCluster

TOKEN = "bench-token-0123456789abcdef"
PATH = "/api/sessions/vendas/start"


def timed_post(port: int) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", PATH, headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    response.read()
    seconds = time.perf_counter() - started
    conn.close()
    return seconds, response.status


def serve(config: Config, db: Database, network: FakeWhatsApp, owner_id: str) -> tuple[Host, ApiServer]:
    rules = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0)
    host = Host(config, db, network.factory, rules, owner_id=owner_id)
    app = create_app(host, db)
    host.command_handler = lambda command: execute_command(app, command)
    server = ApiServer(app, "127.0.0.1", 0, threads=8)
    server.start()
    host.start()
    return host, server


def measure(open_db: Callable[[], Database], work: Path, template: Path, requests: int) -> dict[str, list[float]]:
    """Each daemon with its own connection pool (and its own listener), as two processes have."""
    network = FakeWhatsApp(schema_template=template)
    env = {"API_TOKEN": TOKEN, "BACKUP_INTERVAL_SECONDS": "3600"}
    db_a, db_b = open_db(), open_db()
    a, a_server = serve(Config.from_env({"DATA_DIR": str(work / "a"), **env}), db_a, network, "bench-a")
    b = b_server = None
    try:
        a.create_session("vendas")
        runtime = a.services("vendas").runtime  # type: ignore[union-attr]
        wait_until(lambda: runtime.state is State.QR, timeout=60, message="qr")
        network.current(session_id="vendas").scan_qr()
        wait_until(lambda: runtime.state is State.CONNECTED, timeout=60, message="connected")
        config_b = Config.from_env({"DATA_DIR": str(work / "b"), "SESSION_ID": "suporte", **env})
        b, b_server = serve(config_b, db_b, network, "bench-b")
        times: dict[str, list[float]] = {"asked of the owner": [], "through the owner (command)": []}
        for label, port in (("asked of the owner", a_server.port), ("through the owner (command)", b_server.port)):
            for _ in range(requests):
                seconds, status = timed_post(port)
                if status != 200:
                    raise SystemExit(f"{label}: {PATH} answered {status}")
                times[label].append(seconds)
        return times
    finally:
        for server, host in ((b_server, b), (a_server, a)):
            if server is not None:
                server.stop()
            if host is not None:
                host.stop()
        db_a.close()
        db_b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="zapkeep-bench-commands-"))
    from tests.synthetic import neonize

    template = work / "template" / "whatsmeow.sqlite3"
    template.parent.mkdir()
    neonize("create", template)
    cluster = PostgresCluster().start()
    results: list[tuple[str, str, list[float]]] = []
    try:
        for backend in ("postgresql", "sqlite"):
            url = cluster.create_database()
            (work / backend).mkdir()

            def open_db(backend: str = backend, url: str = url) -> Database:
                db: Database = (
                    PostgresDatabase(url)
                    if backend == "postgresql"
                    else SqliteDatabase(work / backend / "zapkeep.sqlite3")
                )
                db.open()
                return db

            for label, times in measure(open_db, work / backend, template, args.requests).items():
                results.append((backend, label, times))
    finally:
        cluster.stop()
    print(f"POST {PATH} on a connected session, {args.requests} requests each, loopback")
    print(f"{'database':<10} | {'asked':<28} | {'median':>8} | {'p95':>8} | {'max':>8}")
    print(f"{'-' * 10}-+-{'-' * 28}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}")
    for backend, label, times in results:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        cells = [f"{statistics.median(ordered) * 1000:6.1f}ms", f"{p95 * 1000:6.1f}ms", f"{ordered[-1] * 1000:6.1f}ms"]
        print(f"{backend:<10} | {label:<28} | {cells[0]:>8} | {cells[1]:>8} | {cells[2]:>8}")


if __name__ == "__main__":
    main()
