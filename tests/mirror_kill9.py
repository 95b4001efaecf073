"""kill -9 a mirroring process at random moments while the store keeps changing, and check what it left.

Used by the suite (a few kills) and by bench/soak_mirror_kill9.py (many).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.session import document as session_document
from bot.session.persistence import export_document, sync_session
from database import PostgresDatabase
from tests.fake_whatsapp import wait_until
from tests.synthetic import DEVICE_JID, create_paired_store

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_TRANSACTION = 10
PREFIX = "55419"


@dataclass
class KillReport:
    kills: int = 0
    stored_prefixes: list[int] = field(default_factory=list)  # contacts stored at each kill
    lag_seconds: list[float] = field(default_factory=list)  # age of the oldest change missing at each kill
    # transactions each victim's own batches stored (beyond its start-up comparison) before its kill
    stored_by_batches: list[int] = field(default_factory=list)
    transactions_written: int = 0


class Writer(threading.Thread):
    """whatsmeow's stand-in: one transaction of ROWS_PER_TRANSACTION new contacts every few ms."""

    def __init__(self, store: Path) -> None:
        super().__init__(name="writer", daemon=True)
        self.store = store
        self.committed_at: list[float] = []  # monotonic commit time of transaction n
        self.stop = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.store, timeout=10)
        while not self.stop.is_set():
            n = len(self.committed_at)
            rows = range(n * ROWS_PER_TRANSACTION, (n + 1) * ROWS_PER_TRANSACTION)
            with conn:
                conn.executemany(
                    "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
                    [(DEVICE_JID, f"{PREFIX}{i:08d}@s.whatsapp.net", f"Contato {i}") for i in rows],
                )
            self.committed_at.append(time.monotonic())
            time.sleep(0.005)
        conn.close()


def stored_contacts(db: PostgresDatabase) -> list[int]:
    with db.transaction() as tx:
        keys = tx.execute(
            "SELECT row_key FROM whatsapp_session_rows WHERE session_id = 'default' AND table_name = 'whatsmeow_contacts'"
        ).fetchall()
    marker = f"'{PREFIX}"
    return sorted(
        int(k["row_key"].split(",")[1][len(marker) : len(marker) + 8]) for k in keys if marker in k["row_key"]
    )


def kill_during_writes(scratch: Path, database_url: str, kills: int, seed: int = 0) -> KillReport:
    rng = random.Random(seed)
    store = scratch / "store" / "whatsmeow.sqlite3"
    create_paired_store(store)
    db = PostgresDatabase(database_url)
    db.open()
    report = KillReport()
    writer = Writer(store)
    try:
        sync_session(db, "default", store)
        writer.start()
        for _ in range(kills):
            victim = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "mirror_victim.py"), str(store), database_url],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert victim.stdout.readline().strip() == "ready", "the victim never caught up"
            # Its start-up comparison stored the store as it was; what comes after only its batches
            # can store. Kill it once they have (a mirror that never writes them is caught here),
            # at a random moment of the burst that follows.
            at_ready = len(stored_contacts(db))
            wait_until(
                lambda: len(stored_contacts(db)) > at_ready,
                timeout=30,
                message=f"kill {report.kills + 1}: the victim's mirror storing a batch of the writes",
            )
            time.sleep(rng.uniform(0.0, 1.0))
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait(timeout=10)
            victim.stdout.close()
            stored = stored_contacts(db)
            committed = list(writer.committed_at)
            report.kills += 1
            report.stored_prefixes.append(len(stored))
            report.stored_by_batches.append((len(stored) - at_ready) // ROWS_PER_TRANSACTION)
            assert stored == list(range(len(stored))), "the database holds a gap: not a committed prefix"
            first_missing = len(stored) // ROWS_PER_TRANSACTION
            missing_since = committed[first_missing] if first_missing < len(committed) else killed_at
            report.lag_seconds.append(round(max(0.0, killed_at - missing_since), 3))
            with db.transaction() as tx:  # the crashed owner's lease runs out
                tx.execute("UPDATE whatsapp_session_leases SET expires_at = 0")
        _, text = export_document(db, "default")
        session_document.validate_document(json.loads(text))  # what is stored still restores
    finally:
        writer.stop.set()
        writer.join(timeout=10)
        report.transactions_written = len(writer.committed_at)
        db.close()
    return report
