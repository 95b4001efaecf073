"""Reproduction: one flipped ciphertext byte in ``whatsapp_session_rows`` (issue 23, item 3), and
what checking that stored rows open costs the reconciliation.

    .venv/bin/python -m bench.bench_tampered_row [--size medium] [--interval 5]

Three parts, one throw-away PostgreSQL cluster, real daemons (``python -m tests.fake_daemon``:
the daemon with the loopback WhatsApp), every key in the environment:

1. the new host: an owner mirrors 20 contacts after its last history snapshot, a byte of another
   row is flipped, the owner is killed (SIGKILL) before any reconciliation, a daemon boots on a new
   host. Before the fix it restored the snapshot and dropped the 20 rows, saying nothing. Printed:
   rows dropped, its state, /readyz, the event, and the operator's restore of the snapshot;
2. the owner: a byte flipped while it runs (BACKUP_INTERVAL_SECONDS=--interval). Printed: the
   time until its reconciliation found and repaired it, and what the status and metric say;
3. the cost: listing the stored hashes (the reconciliation before) against opening and hashing
   the stored rows (now: every row at the mirror's first pass, then only the rows whose stored
   form is new since the last pass), on a synthetic store of --size, sealed and in clear;
   beside them the reconciliation's other half, the scan of the local store (here a child process
   started for it, as ``python -m bot backup`` does; the mirror keeps its child running).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bot.session.persistence import current_document, sync_session
from bot.session.stored import check_stored_rows
from bot.session.sealing import Sealer
from bot.session.store_worker import scan_store
from database import Database, PostgresDatabase, SqliteDatabase
from tests.fake_network import FakeServer
from tests.fake_whatsapp import wait_until
from tests.pg_cluster import PostgresCluster
from tests.redeploy import TOKEN, Daemon
from tests.synthetic import DEVICE_JID, LARGE, MEDIUM, SMALL, create_paired_store
from tests.tamper import contacts_stored, corrupt_events, flip_a_ciphertext_byte

SIZES = {"small": SMALL, "medium": MEDIUM, "large": LARGE}
KEY = os.urandom(32)


def call(daemon: Daemon, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def write_contacts(store: Path, count: int) -> None:
    conn = sqlite3.connect(store, timeout=30)
    with conn:
        conn.executemany(
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
            [(DEVICE_JID, f"55318{n:08d}@s.whatsapp.net", f"Contato {n}") for n in range(count)],
        )
    conn.close()


def daemon(scratch: Path, name: str, url: str, server: FakeServer, **env: str) -> Daemon:
    command = [sys.executable, "-m", "tests.fake_daemon", server.address]
    environment = {"SESSION_ENCRYPTION_KEY": base64.b64encode(KEY).decode(), **env}
    return Daemon(scratch / name, url, command=command, env=environment)


def new_host(url: str, scratch: Path, ending: str) -> None:
    """``ending``: "operator" restores the history snapshot on host2; "old host": host2 is stopped and
    host1 comes back with its local store."""
    db = PostgresDatabase(url, sealer=Sealer(KEY))
    db.open()
    server = FakeServer()
    first = daemon(scratch / ending, "host1", url, server, BACKUP_INTERVAL_SECONDS="3600")
    second = daemon(scratch / ending, "host2", url, server)
    try:
        create_paired_store(first.store)
        first.start()
        wait_until(lambda: first.status()["state"] == "connected", timeout=60, message="host1 connected")
        code, backup = call(first, "POST", "/api/session/backup", {"session_id": "default"})
        assert code == 200, backup
        write_contacts(first.store, 20)
        wait_until(lambda: contacts_stored(db, "55318") == 20, timeout=30, message="20 contacts mirrored")
        flip_a_ciphertext_byte(db)
        first.kill()  # SIGKILL: no reconciliation ran after the flip
        stored_before = contacts_stored(db, "55318")
        started = time.monotonic()
        second.start()
        wait_until(lambda: second.status()["state"] == "restore_needed", timeout=60, message="host2 refused")
        refused_after = time.monotonic() - started
        status = second.status()
        ready_code, ready = call(second, "GET", "/readyz")
        dropped = stored_before - contacts_stored(db, "55318")
        events = corrupt_events(db)
        print(
            f"1. new host boots over a tampered row (owner killed with -9, 20 rows after the last snapshot): {ending}"
        )
        print(f"   rows dropped:          {dropped} (of {stored_before} mirrored after the snapshot)")
        print(f"   host2 state:           {status['state']} after {refused_after:.1f} s (host1's lease ran out first)")
        print(f"   /readyz:               {ready_code} {ready.get('reason')}")
        print(f"   status boot_error:     {status['boot_error']}")
        print(f"   session.corrupt:       {events}")
        print(f"   host2 dials:           {status['reconnect_count']}, connected_since {status['connected_since']}")
        if ending == "old host":
            second.terminate()  # SIGTERM: the lease is handed back
            started = time.monotonic()
            first.start()
            wait_until(lambda: first.status()["state"] == "connected", timeout=60, message="host1 back")
            wait_until(lambda: first.status()["unreadable_rows"] > 0, timeout=60, message="host1 repaired")
            status = first.status()
            current_document(db, "default")  # raises if it still does not open
            print(
                f"   host1 back with its local store: connected and repaired after {time.monotonic() - started:.1f} s"
                f" ({status['last_reconcile_result']}); contacts stored {contacts_stored(db, '55318')}"
            )
            return
        version = status["history"][0]["version"]
        started = time.monotonic()
        code, _ = call(second, "POST", "/api/session/restore", {"session_id": "default", "version": version})
        wait_until(lambda: second.status()["state"] == "connected", timeout=60, message="host2 connected")
        print(
            f"   operator restores v{version}: {code}, connected after {time.monotonic() - started:.1f} s;"
            f" contacts stored now {contacts_stored(db, '55318')} (the snapshot's, on purpose)"
        )
    finally:
        for each in (first, second):
            each.stop_if_running()
        server.close()
        db.close()


def owner_repairs(url: str, scratch: Path, interval: int) -> None:
    db = PostgresDatabase(url, sealer=Sealer(KEY))
    db.open()
    server = FakeServer()
    owner = daemon(scratch, "owner", url, server, BACKUP_INTERVAL_SECONDS=str(interval))
    try:
        create_paired_store(owner.store)
        owner.start()
        wait_until(lambda: owner.status()["state"] == "connected", timeout=60, message="the owner connected")
        rows = []
        for _ in range(3):
            wait_until(lambda: owner.status()["last_reconcile_at"] is not None, timeout=60, message="a reconciliation")
            found_before = owner.status()["unreadable_rows"]
            flip_a_ciphertext_byte(db)
            flipped = time.monotonic()
            wait_until(
                lambda: owner.status()["unreadable_rows"] > found_before, timeout=interval * 3 + 30, message="found"
            )
            found = time.monotonic() - flipped
            current_document(db, "default")  # raises if it still does not open
            rows.append(found)
        flip_a_ciphertext_byte(db)
        started = time.monotonic()
        code, backup = call(owner, "POST", "/api/session/backup", {"session_id": "default"})
        asked = time.monotonic() - started
        status = owner.status()
        request = urllib.request.Request(
            f"http://127.0.0.1:{owner.port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            lines = response.read().decode().splitlines()
            metric = [line for line in lines if line.startswith("zapkeep_stored_rows_unreadable_total")]
        print(f"2. the owner, BACKUP_INTERVAL_SECONDS={interval}: a byte flipped while it runs, 3 times")
        print(f"   found and repaired after: {', '.join(f'{s:.1f} s' for s in rows)} (the next reconciliation)")
        print(f"   POST /api/session/backup right after a 4th flip: {code}, written_rows {backup.get('written_rows')},")
        print(f"     {asked * 1000:.0f} ms; last_reconcile_result: {status['last_reconcile_result']!r}")
        print(f"   metric: {metric[0] if metric else 'missing'}; session.corrupt events: {len(corrupt_events(db))}")
    finally:
        owner.stop_if_running()
        server.close()
        db.close()


def cost(cluster: PostgresCluster, scratch: Path, size_name: str, repeats: int = 5) -> None:
    store = scratch / "cost" / "whatsmeow.sqlite3"
    create_paired_store(store, SIZES[size_name])
    print(f"3. cost of one pass over what is stored ({size_name} store), median of {repeats}, ms")
    print(
        f"   {'back-end':<10} {'sealed':<7} {'rows':>6} {'hashes listed (before)':>23}"
        f" {'all opened (first pass)':>24} {'next passes (none new)':>23} {'100 rows new':>13} {'store scan':>11}"
    )
    for backend in ("postgresql", "sqlite"):
        for sealed in (True, False):
            sealer = Sealer(KEY) if sealed else None
            if backend == "postgresql":
                db: Database = PostgresDatabase(cluster.create_database(), sealer=sealer)
            else:
                db = SqliteDatabase(scratch / f"cost-{int(sealed)}.sqlite3", sealer=sealer)
            db.open()
            try:
                sync_session(db, "default", store)
                listed, first, opened, fresh, scanned = [], [], [], [], []
                for _ in range(repeats):
                    verified: dict[tuple[str, str], int] = {}
                    began = time.perf_counter()
                    check_stored_rows(db, "default", verified)
                    first.append((time.perf_counter() - began) * 1000)
                    began = time.perf_counter()
                    check = check_stored_rows(db, "default", verified)
                    opened.append((time.perf_counter() - began) * 1000)
                    for where in list(verified)[:100]:  # as if the mirror had written 100 rows since
                        verified[where] = 0
                    began = time.perf_counter()
                    check_stored_rows(db, "default", verified)
                    fresh.append((time.perf_counter() - began) * 1000)
                    began = time.perf_counter()
                    hashes = db.row_hashes("default")
                    listed.append((time.perf_counter() - began) * 1000)
                    began = time.perf_counter()
                    scan_store(store, 0, hashes)
                    scanned.append((time.perf_counter() - began) * 1000)
                assert not check.unreadable
                rows = sum(len(r) for r in hashes.values())
                print(
                    f"   {backend:<10} {'yes' if sealed else 'no':<7} {rows:>6}"
                    f" {statistics.median(listed):>23.0f} {statistics.median(first):>24.0f}"
                    f" {statistics.median(opened):>23.0f} {statistics.median(fresh):>13.0f}"
                    f" {statistics.median(scanned):>11.0f}"
                )
            finally:
                db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for ending in ("operator", "old host"):
                new_host(cluster.create_database(), Path(scratch), ending)
            owner_repairs(cluster.create_database(), Path(scratch), args.interval)
            cost(cluster, Path(scratch), args.size)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
