"""Benchmark: what the API answers, and how soon, while PostgreSQL is away.

    .venv/bin/python -m bench.bench_status_outage [--outage 60]

One daemon's assembly (runtime, chatbot, outbox, waitress) on a throw-away cluster with the
production pool settings (10 s connect and wait timeouts) and the default lease (30 s, renewed every
10 s), paired with the fake WhatsApp. The server is stopped (``pg_ctl stop -m fast``); every few
seconds of the outage ``GET /api/session/status``, ``/readyz``, ``/metrics`` and ``/api/chats`` are
timed, with what they answered; then the server is started again and the time until the session
is connected again is printed. Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES, Config
from bot.wiring import build_services
from bot.session.state import State
from database import PostgresDatabase
from session_api import create_app
from session_api.server import ApiServer
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.pg_cluster import PostgresCluster

TOKEN = "bench-token-0123456789abcdef"
PATHS = ("/api/session/status", "/readyz", "/metrics", "/api/chats")


def timed_get(port: int, path: str) -> tuple[float, int, str]:
    """(seconds, status, what it said in short)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    body = response.read()
    seconds = time.perf_counter() - started
    conn.close()
    said = ""
    if path == "/readyz":
        said = json.loads(body).get("reason") or "connected"
    elif path == "/api/session/status" and response.status == 200:
        said = str(json.loads(body)["sessions"][0].get("database", "(no database field)"))
    elif path == "/metrics":
        up = [line for line in body.decode().splitlines() if line.startswith("zapkeep_database_up")]
        said = up[0] if up else ""
    elif response.status != 200:
        said = json.loads(body).get("message", "")
    return seconds, response.status, said[:70]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the server is away")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between two rounds of requests")
    args = parser.parse_args()
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    cluster = PostgresCluster().start()
    work = Path(tempfile.mkdtemp(prefix="zapkeep-bench-outage-"))
    db = PostgresDatabase(cluster.create_database())  # production's pool settings
    db.open()
    rows: list[tuple[float, str, float, int, str]] = []
    reconnected_after = float("nan")
    try:
        from tests.synthetic import neonize

        template = work / "template" / "whatsmeow.sqlite3"
        template.parent.mkdir()
        neonize("create", template)
        config = Config.from_env({"DATA_DIR": str(work / "data"), "API_TOKEN": TOKEN})
        network = FakeWhatsApp(schema_template=template)
        rules = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0)
        services = build_services(config, db, network.factory, rules)
        app = create_app(services.runtime, db, outbox=services.outbox)
        server = ApiServer(app, "127.0.0.1", 0, threads=8)
        server.start()
        services.start()
        runtime = services.runtime
        try:
            wait_until(lambda: runtime.state is State.QR, timeout=60, message="qr")
            network.current().scan_qr()
            wait_until(lambda: runtime.state is State.CONNECTED, timeout=60, message="connected")
            wait_until(lambda: db.list_history("default") != [], timeout=60, message="first snapshot")
            for path in PATHS:
                seconds, status, said = timed_get(server.port, path)
                rows.append((-1.0, path, seconds, status, said))
            cluster.stop_server()
            down = time.monotonic()
            next_round = down
            while next_round - down < args.outage:
                time.sleep(max(0.0, next_round - time.monotonic()))
                at = time.monotonic() - down
                for path in PATHS:
                    seconds, status, said = timed_get(server.port, path)
                    rows.append((at, path, seconds, status, said))
                next_round += args.every
            time.sleep(max(0.0, down + args.outage - time.monotonic()))
            cluster.start_server()
            back = time.monotonic()
            wait_until(lambda: runtime.state is State.CONNECTED, timeout=120, message="connected again")
            reconnected_after = time.monotonic() - back
        finally:
            server.stop()
            services.stop()
    finally:
        db.close()
        cluster.stop()
    print(f"PostgreSQL away for {args.outage:.0f} s (pool: 10 s timeouts; lease 30 s, renewed every 10 s)")
    print(f"{'at':>6} | {'request':<20} | {'took':>7} | code | answer")
    print(f"{'-' * 6}-+-{'-' * 20}-+-{'-' * 7}-+------+-{'-' * 40}")
    for at, path, seconds, status, said in rows:
        when = "before" if at < 0 else f"{at:5.1f}s"
        print(f"{when:>6} | {path:<20} | {seconds:>6.2f}s | {status:>4} | {said}")
    print(f"connected again {reconnected_after:.1f} s after the server was back")


if __name__ == "__main__":
    main()
