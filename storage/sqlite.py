"""The embedded SQLite back-end (the default): one file, WAL mode."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from storage.composed import Database
from storage.core import SQLITE, Transaction
from storage.records import ClearPayloads, PayloadSealer


class SqliteDatabase(Database):
    """The embedded default: one file, WAL mode, a short-lived connection per transaction."""

    backend = "sqlite"
    dialect = SQLITE
    NOW = "SELECT (julianday('now') - 2440587.5) * 86400.0"

    def __init__(self, path: Path, *, sealer: PayloadSealer | None = None) -> None:
        self.sealer = sealer or ClearPayloads()
        self.path = path
        self._closing = threading.Event()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        self.path.chmod(0o600)

    def close(self) -> None:
        """Nothing stays open between transactions; a wait for commands ends."""
        self._closing.set()

    def wait_for_commands(self, timeout: float) -> bool:
        """No notifications here: the owner polls, every ``timeout`` (after ``close``: at once)."""
        self._closing.wait(timeout)
        return True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, detect_types=sqlite3.PARSE_DECLTYPES)
        conn.row_factory = _dict_row
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        conn = self._connect()
        try:
            # IMMEDIATE takes the write lock up front: no deadlock when a reader upgrades.
            conn.execute("BEGIN IMMEDIATE")
            yield Transaction(
                lambda query, params: conn.execute(query.replace("%s", "?"), params),
                lambda query, params: conn.executemany(query.replace("%s", "?"), params),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def json_param(self, text: str) -> Any:
        return text

    def _hold_off_take_overs(self, tx: Transaction, session_id: str) -> float:
        return tx.scalar(self.NOW)  # every transaction here holds the one write lock (BEGIN IMMEDIATE)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _parse_timestamp(raw: bytes) -> datetime:
    return datetime.fromisoformat(raw.decode())


sqlite3.register_adapter(datetime, lambda value: value.isoformat(sep=" "))
sqlite3.register_converter("TIMESTAMP", _parse_timestamp)
