"""kill -9 a process in the middle of its mirroring, at random moments, and check what it left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bot.session import document as session_document
from bot.process.errors import NotFoundError
from bot.session.persistence import export_document
from bot.session.store_worker import restore_store
from database import PostgresDatabase
from tests.backup_loop import push_name
from tests.fake_whatsapp import wait_until
from tests.synthetic import table_rows

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KillReport:
    iterations: int
    backups_before_kill: list[int]  # syncs each victim committed (and reported) before it was killed
    restored_rows: int
    kills_inside_writes: int = 0  # kills after a database write had started and before it was reported done


def kill_during_backups(store: Path, database_url: str, scratch: Path, iterations: int, seed: int = 0) -> KillReport:
    """Every other kill waits for a database write to start and lands within about as long as the
    previous write took; the others land anywhere in the loop; every fourth is pinned inside a write
    (``_kill_pinned_inside_a_write``). After each kill the stored session
    must export to a complete document that validates, agrees with the stored head, holds what the
    last reported sync (or the one after it) wrote, and restores."""
    rng = random.Random(seed)
    db = PostgresDatabase(database_url)
    db.open()
    counts = []
    rows = 0
    inside = 0
    store_rows = sum(len(r) for r in table_rows(store).values())  # the victim rewrites rows, never adds any
    try:
        for iteration in range(iterations):
            name = f"kill9-victim-{os.getpid()}-{iteration}"  # its connections' application_name (libpq)
            victim = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "backup_loop.py"), str(store), database_url],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PGAPPNAME": name},
            )
            lines = _read_until(victim, "done")  # at least one sync committed: the kill lands mid-loop
            assert _backends(db, name) > 0, "the victim's connections do not carry its application_name"
            if iteration % 4 == 3:
                _kill_pinned_inside_a_write(victim, db, database_url, name)
            else:
                if iteration % 2:
                    lines += _read_until(victim, "wrote")  # how long one round's write takes
                    took = float(lines[-1].split()[2])
                    lines += _read_until(victim, "write")
                    time.sleep(rng.uniform(0.0, 1.25 * took))
                else:
                    time.sleep(rng.uniform(0.0, 0.6))
                victim.send_signal(signal.SIGKILL)
            rest, _ = victim.communicate(timeout=30)
            lines += rest.splitlines()
            reported = [int(line.split()[1]) for line in lines if line.startswith("done ")]
            counts.append(len(reported))
            inside += lines[-1].startswith("write ")

            # A COMMIT the victim sent before it died still runs in its server process: what the
            # kill left is known once that process is gone (else it may land in the next iteration).
            wait_until(
                lambda: _backends(db, name) == 0,
                timeout=60,
                message=f"iteration {iteration}: the victim's backends gone",
            )
            try:  # the head and its rows read as of one moment (one REPEATABLE READ transaction)
                record, text = export_document(db, "default")
            except NotFoundError:
                raise AssertionError(f"iteration {iteration}: the stored session vanished") from None
            decoded = session_document.validate_document(session_document.parse_document(text))  # raises when torn
            assert decoded.checksum == record.checksum, f"iteration {iteration}: head and rows disagree"
            assert decoded.row_count == store_rows, f"iteration {iteration}: rows missing"
            # The last reported sync committed; the next one may have committed just before the kill.
            allowed = {push_name(reported[-1]), push_name(reported[-1] + 1)}
            assert decoded.device_field("push_name") == record.push_name, f"iteration {iteration}"
            assert record.push_name in allowed, f"iteration {iteration}: {record.push_name!r} not in {allowed}"
            target = scratch / f"restore-{iteration}" / "whatsmeow.sqlite3"
            summary = restore_store(text, target, lineage=record.lineage, sequence=record.mirror_sequence)
            assert summary.checksum == record.checksum
            rows = summary.rows
    finally:
        db.close()
    return KillReport(iterations, counts, rows, inside)


def _kill_pinned_inside_a_write(
    victim: subprocess.Popen[str], db: PostgresDatabase, database_url: str, application_name: str
) -> None:
    """Every round rewrites the device's row: with that row locked, the victim's next write stops
    there, its head and some rows written and not committed, and is killed while it waits. (The
    lock is let go after the kill: the dead client's transaction then never commits.)"""
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT 1 FROM whatsapp_session_rows WHERE session_id = 'default' AND table_name = 'whatsmeow_device'"
            " FOR UPDATE"
        )
        wait_until(
            lambda: _waiting_for_a_lock(db, application_name),
            timeout=60,
            message="the victim's write waiting for the device's row",
        )
        victim.send_signal(signal.SIGKILL)


def _waiting_for_a_lock(db: PostgresDatabase, application_name: str) -> bool:
    with db.transaction() as tx:
        query = "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
        return int(tx.scalar(query, (application_name,))) > 0


def _backends(db: PostgresDatabase, application_name: str) -> int:
    """The server processes still serving the victim's connections."""
    with db.transaction() as tx:
        query = "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s"
        return int(tx.scalar(query, (application_name,)))


def _read_until(victim: subprocess.Popen[str], word: str) -> list[str]:
    """The victim's lines up to and including the next one that starts with ``word``."""
    lines = []
    while True:
        line = victim.stdout.readline()
        assert line, f"the sync loop ended before printing {word!r}"
        lines.append(line.strip())
        if line.startswith(f"{word} "):
            return lines
