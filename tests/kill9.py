"""kill -9 a process in the middle of its backups, at random moments, and check what it left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bot import session_store
from bot.store_worker import restore_store
from database import PostgresDatabase

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KillReport:
    iterations: int
    backups_before_kill: list[int]
    restored_rows: int


def kill_during_backups(store: Path, database_url: str, scratch: Path, iterations: int, seed: int = 0) -> KillReport:
    rng = random.Random(seed)
    db = PostgresDatabase(database_url)
    db.open()
    counts = []
    rows = 0
    try:
        for iteration in range(iterations):
            victim = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "backup_loop.py"), str(store), database_url],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            first = victim.stdout.readline()  # at least one backup finished: the kill lands mid-loop
            assert first.strip(), "the backup loop produced nothing"
            time.sleep(rng.uniform(0.0, 0.6))
            victim.send_signal(signal.SIGKILL)
            rest, _ = victim.communicate(timeout=30)
            counts.append(1 + len(rest.split()))

            record = db.load_session("default")
            assert record is not None, f"iteration {iteration}: the stored row vanished"
            document = session_store.parse_document(record.session_data)
            decoded = session_store.validate_document(document)  # raises on a torn document
            assert decoded.checksum == record.checksum, f"iteration {iteration}: row and document disagree"
            assert db.list_history("default")[0].checksum == record.checksum
            rows = restore_store(record.session_data, scratch / f"restore-{iteration}" / "whatsmeow.sqlite3").rows
    finally:
        db.close()
    return KillReport(iterations, counts, rows)
