"""Benchmark: a customer's reply, and /healthz, while slow number checks run (issue 23).

    .venv/bin/python -m bench.bench_stalls [--checks 8] [--check-seconds 30]

Real daemons (``tests.fake_daemon``: ``python -m bot run`` whose client process talks to the
loopback WhatsApp of ``tests.fake_network``; embedded SQLite). WhatsApp's servers take
``--check-seconds`` to answer a number check. A customer writes first with nothing else running;
then ``--checks`` ``POST /api/contacts/check`` start at once, and a second customer writes while
they run. Side by side: the daemon as it was before issue 23 (one lane of 4 workers in the client
process for replies, receipts, typing and checks; no cap on checks; 8 server threads:
``ZAPKEEP_BENCH_SHARED_LANE=1``; a check that times out answers 504 there, where the old code
answered 500) and as it is (a lane of its own for checks, 2 at once, 429 beyond). Printed: the
time from each customer's message to our reply reaching WhatsApp, how long ``/healthz`` took
meanwhile, and what the checks answered. Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.fake_network import FakeServer
from tests.fake_whatsapp import wait_until
from tests.redeploy import TOKEN, Daemon
from tests.synthetic import create_paired_store

HTTP_TIMEOUT = 300.0


@dataclass(frozen=True)
class Run:
    reply_alone: float  # seconds from the customer's message to our reply at the server, nothing else running
    reply_beside_checks: float  # the same while the checks run
    healthz: float  # seconds /healthz took while the checks run
    answers: Counter[int]  # the checks' HTTP statuses
    slowest_check: float


def customer(server: FakeServer, n: int) -> float:
    """A new customer writes "oi"; seconds until our reply reached the server."""
    chat = f"55119876{n:05d}@s.whatsapp.net"
    started = time.monotonic()
    server.customer_sends(
        {
            "message_id": f"3EB0BENCH{n:05d}",
            "chat": chat,
            "sender": chat,
            "push_name": "Cliente",
            "text": "oi",
            "from_me": False,
            "is_group": False,
            "timestamp": int(time.time()),
            "kind": "text",
        }
    )
    wait_until(lambda: any(s.to == chat for s in server.sent), timeout=HTTP_TIMEOUT, message="the reply")
    return time.monotonic() - started


def call(port: int, method: str, path: str, body: object = None) -> tuple[int, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        status = conn.getresponse().status
    except OSError:
        status = 0  # no answer at all
    finally:
        conn.close()
    return status, time.monotonic() - started


def run(workdir: Path, checks: int, check_seconds: float, before: bool) -> Run:
    server = FakeServer()
    command = [sys.executable, "-m", "tests.fake_daemon", server.address]
    env = {"ZAPKEEP_BENCH_SHARED_LANE": "1"} if before else {}
    daemon = Daemon(workdir / ("before" if before else "now"), "", command=command, env=env)
    create_paired_store(daemon.store)
    try:
        daemon.start()
        wait_until(lambda: daemon.status()["state"] == "connected", timeout=60, message="connected")
        reply_alone = customer(server, 1)
        server.check_seconds = check_seconds
        answers: list[tuple[int, float]] = []
        body = {"numbers": ["5511912345678"]}
        threads = [
            threading.Thread(target=lambda: answers.append(call(daemon.port, "POST", "/api/contacts/check", body)))
            for _ in range(checks)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: server.checks_asked >= 2, timeout=60, message="checks at WhatsApp")
        time.sleep(0.5)  # every check has reached the daemon by now
        healthz: list[float] = []
        probe = threading.Thread(target=lambda: healthz.append(call(daemon.port, "GET", "/healthz")[1]))
        probe.start()
        reply_beside_checks = customer(server, 2)
        probe.join()
        for thread in threads:
            thread.join()
        return Run(
            reply_alone,
            reply_beside_checks,
            healthz[0],
            Counter(status for status, _ in answers),
            max(seconds for _, seconds in answers),
        )
    finally:
        daemon.stop_if_running()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=8, help="concurrent POST /api/contacts/check")
    parser.add_argument("--check-seconds", type=float, default=30.0, help="WhatsApp's time to answer a check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        before = run(Path(scratch), args.checks, args.check_seconds, before=True)
        now = run(Path(scratch), args.checks, args.check_seconds, before=False)
    print(f"{args.checks} number checks at once, each answered by WhatsApp after {args.check_seconds:.0f} s")
    print(f"{'':34} | {'before (one shared lane)':>24} | {'now (lanes, 2 checks)':>22}")
    print(f"{'-' * 34}-+-{'-' * 24}-+-{'-' * 22}")
    rows = [
        ("customer's reply, nothing running", lambda r: f"{r.reply_alone:.1f} s"),
        ("customer's reply beside the checks", lambda r: f"{r.reply_beside_checks:.1f} s"),
        ("/healthz beside the checks", lambda r: f"{r.healthz:.2f} s"),
        ("checks answered (HTTP status: n)", lambda r: ", ".join(f"{s}: {n}" for s, n in sorted(r.answers.items()))),
        ("slowest check's answer", lambda r: f"{r.slowest_check:.1f} s"),
    ]
    for name, cell in rows:
        print(f"{name:34} | {cell(before):>24} | {cell(now):>22}")


if __name__ == "__main__":
    main()
