"""The one place that talks SQL: connection pool, versioned schema, named queries.

Two back-ends share every query: PostgreSQL (``DATABASE_URL`` set; psycopg 3 pool) and an
embedded SQLite file (the default). Queries are written once with ``%s`` placeholders and
every value is bound, never formatted into the text. Session documents are JSONB on
PostgreSQL and JSON text on SQLite; they travel through here as already-serialised text so
that a multi-megabyte document is never encoded twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

SCHEMA_VERSION = 1
HISTORY_KEEP = 5
_MIGRATION_LOCK_ID = 7_266_133_001  # any constant: serialises concurrent boots on PostgreSQL

T = TypeVar("T")


class DatabaseError(Exception):
    """The database is unreachable, or in a state this code cannot work with."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer zapkeep than this one."""


@dataclass(frozen=True)
class SessionWrite:
    """One snapshot of a session, ready to store."""

    session_id: str
    document_text: str
    checksum: str
    device_jid: str | None
    push_name: str | None

    @property
    def size_bytes(self) -> int:
        return len(self.document_text.encode())


@dataclass(frozen=True)
class SaveResult:
    written: bool  # False: the stored checksum was already this one, nothing was written
    version: int


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    version: int
    checksum: str
    size_bytes: int
    device_jid: str | None
    push_name: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    version: int
    checksum: str
    size_bytes: int
    device_jid: str | None
    push_name: str | None
    updated_at: datetime
    session_data: str  # the document as JSON text


@dataclass(frozen=True)
class HistoryEntry:
    session_id: str
    version: int
    checksum: str
    size_bytes: int
    device_jid: str | None
    taken_at: datetime


# --- schema ---------------------------------------------------------------------------
# Each list is ordered: entry N brings the schema from version N to N+1. The first entry
# creates the whole current schema on a fresh database (and, on PostgreSQL, adopts the
# seed's pre-existing whatsapp_sessions table by adding the columns it lacks).

POSTGRES_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS whatsapp_sessions (
            id SERIAL PRIMARY KEY,
            session_id VARCHAR(100) DEFAULT 'default' UNIQUE,
            session_data JSONB NOT NULL,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        )""",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS version INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS checksum TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS size_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS device_jid TEXT",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS push_name TEXT",
        """CREATE TABLE whatsapp_session_history (
            id SERIAL PRIMARY KEY,
            session_id VARCHAR(100) NOT NULL,
            version INTEGER NOT NULL,
            session_data JSONB NOT NULL,
            checksum TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            device_jid TEXT,
            taken_at TIMESTAMP NOT NULL,
            UNIQUE (session_id, version)
        )""",
    ],
]

SQLITE_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE whatsapp_sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id VARCHAR(100) DEFAULT 'default' UNIQUE,
            session_data JSONB NOT NULL,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            version INTEGER NOT NULL DEFAULT 0,
            checksum TEXT NOT NULL DEFAULT '',
            size_bytes INTEGER NOT NULL DEFAULT 0,
            device_jid TEXT,
            push_name TEXT
        )""",
        """CREATE TABLE whatsapp_session_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id VARCHAR(100) NOT NULL,
            version INTEGER NOT NULL,
            session_data JSONB NOT NULL,
            checksum TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            device_jid TEXT,
            taken_at TIMESTAMP NOT NULL,
            UNIQUE (session_id, version)
        )""",
    ],
]

CREATE_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS zapkeep_schema (version INTEGER NOT NULL)"
SELECT_SCHEMA_VERSION = "SELECT version FROM zapkeep_schema"
INSERT_SCHEMA_VERSION = "INSERT INTO zapkeep_schema (version) VALUES (%s)"
UPDATE_SCHEMA_VERSION = "UPDATE zapkeep_schema SET version = %s"


class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


class Transaction:
    """One open transaction; rows come back as dicts (mapped to dataclasses by the caller)."""

    def __init__(self, execute: Any) -> None:
        self._execute = execute

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        return self._execute(query, params)

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(query, params).fetchone()
        return None if row is None else next(iter(row.values()))

    def one(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> T | None:
        row = self.execute(query, params).fetchone()
        return None if row is None else cls(**row)

    def all(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> list[T]:
        return [cls(**row) for row in self.execute(query, params).fetchall()]


class Database:
    """The session tables, over whichever back-end the configuration chose."""

    backend = "abstract"
    migrations: list[list[str]] = []

    def open(self) -> None:
        """Connect and bring the schema up to date (idempotent)."""
        self._open()
        self.migrate()

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        raise NotImplementedError
        yield

    def json_param(self, text: str) -> Any:
        """Bind an already-serialised JSON document as this back-end's JSON type."""
        raise NotImplementedError

    def _lock_for_migration(self, tx: Transaction) -> None:
        """Make concurrent boots migrate one at a time."""

    # --- schema ---

    def schema_version(self) -> int:
        with self.transaction() as tx:
            tx.execute(CREATE_SCHEMA_TABLE)
            return tx.scalar(SELECT_SCHEMA_VERSION) or 0

    def migrate(self) -> None:
        with self.transaction() as tx:
            self._lock_for_migration(tx)
            tx.execute(CREATE_SCHEMA_TABLE)
            current = tx.scalar(SELECT_SCHEMA_VERSION)
            if current is None:
                tx.execute(INSERT_SCHEMA_VERSION, (0,))
                current = 0
            if current > SCHEMA_VERSION:
                raise SchemaTooNewError(
                    f"the database schema is version {current}, newer than this zapkeep's {SCHEMA_VERSION}\n"
                    "Deploy the zapkeep version that migrated it (or newer)."
                )
            for step in self.migrations[current:]:
                for statement in step:
                    tx.execute(statement)
            tx.execute(UPDATE_SCHEMA_VERSION, (SCHEMA_VERSION,))

    # --- sessions ---

    SELECT_STORED_CHECKSUM = "SELECT checksum, version FROM whatsapp_sessions WHERE session_id = %s"
    NEXT_HISTORY_VERSION = (
        "SELECT COALESCE(MAX(version), 0) + 1 FROM whatsapp_session_history WHERE session_id = %s"
    )
    UPSERT_SESSION_IF_CHANGED = """
        INSERT INTO whatsapp_sessions
            (session_id, session_data, version, checksum, size_bytes, device_jid, push_name, created_at, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET
            session_data = excluded.session_data,
            version = excluded.version,
            checksum = excluded.checksum,
            size_bytes = excluded.size_bytes,
            device_jid = excluded.device_jid,
            push_name = excluded.push_name,
            updated_at = excluded.updated_at
        WHERE whatsapp_sessions.checksum <> excluded.checksum
        RETURNING version
    """
    INSERT_HISTORY = """
        INSERT INTO whatsapp_session_history
            (session_id, version, session_data, checksum, size_bytes, device_jid, taken_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
    """
    PRUNE_HISTORY = "DELETE FROM whatsapp_session_history WHERE session_id = %s AND version <= %s"

    def save_session(self, write: SessionWrite) -> SaveResult:
        """Store a snapshot unless the stored one has the same checksum; keep the last few in history."""
        now = _utcnow()
        with self.transaction() as tx:
            stored = tx.execute(self.SELECT_STORED_CHECKSUM, (write.session_id,)).fetchone()
            if stored is not None and stored["checksum"] == write.checksum:
                # Unchanged: decided before shipping megabytes of JSON just to compare a checksum.
                return SaveResult(written=False, version=stored["version"])
            version = tx.scalar(self.NEXT_HISTORY_VERSION, (write.session_id,))
            data = self.json_param(write.document_text)
            written = tx.scalar(
                self.UPSERT_SESSION_IF_CHANGED,
                (write.session_id, data, version, write.checksum, write.size_bytes,
                 write.device_jid, write.push_name, now, now),
            )
            if written is None:  # a concurrent writer stored this very checksum first
                return SaveResult(written=False, version=tx.scalar(self.SELECT_SESSION_VERSION, (write.session_id,)))
            tx.execute(
                self.INSERT_HISTORY,
                (write.session_id, version, data, write.checksum, write.size_bytes, write.device_jid, now),
            )
            tx.execute(self.PRUNE_HISTORY, (write.session_id, version - HISTORY_KEEP))
        return SaveResult(written=True, version=version)

    SELECT_SESSION_VERSION = "SELECT version FROM whatsapp_sessions WHERE session_id = %s"
    SELECT_SESSION = """
        SELECT session_id, version, checksum, size_bytes, device_jid, push_name, updated_at,
               CAST(session_data AS TEXT) AS session_data
        FROM whatsapp_sessions WHERE session_id = %s
    """

    def load_session(self, session_id: str) -> SessionRecord | None:
        with self.transaction() as tx:
            return tx.one(SessionRecord, self.SELECT_SESSION, (session_id,))

    SELECT_HISTORY_VERSION = """
        SELECT h.session_id, h.version, h.checksum, h.size_bytes, h.device_jid,
               s.push_name, h.taken_at AS updated_at, CAST(h.session_data AS TEXT) AS session_data
        FROM whatsapp_session_history h
        LEFT JOIN whatsapp_sessions s ON s.session_id = h.session_id
        WHERE h.session_id = %s AND h.version = %s
    """

    def load_history_version(self, session_id: str, version: int) -> SessionRecord | None:
        with self.transaction() as tx:
            return tx.one(SessionRecord, self.SELECT_HISTORY_VERSION, (session_id, version))

    SELECT_HISTORY = """
        SELECT session_id, version, checksum, size_bytes, device_jid, taken_at
        FROM whatsapp_session_history WHERE session_id = %s ORDER BY version DESC
    """

    def list_history(self, session_id: str) -> list[HistoryEntry]:
        with self.transaction() as tx:
            return tx.all(HistoryEntry, self.SELECT_HISTORY, (session_id,))

    DELETE_SESSION = "DELETE FROM whatsapp_sessions WHERE session_id = %s"
    DELETE_HISTORY = "DELETE FROM whatsapp_session_history WHERE session_id = %s"

    def delete_session(self, session_id: str, *, keep_history: bool = True) -> bool:
        """Delete the stored session; its history stays unless asked, so an admin can roll back."""
        with self.transaction() as tx:
            deleted = tx.execute(self.DELETE_SESSION, (session_id,)).rowcount > 0
            if not keep_history:
                deleted = tx.execute(self.DELETE_HISTORY, (session_id,)).rowcount > 0 or deleted
        return deleted

    SELECT_SESSIONS = """
        SELECT session_id, version, checksum, size_bytes, device_jid, push_name, created_at, updated_at
        FROM whatsapp_sessions ORDER BY session_id
    """

    def list_sessions(self) -> list[SessionSummary]:
        with self.transaction() as tx:
            return tx.all(SessionSummary, self.SELECT_SESSIONS)


class PostgresDatabase(Database):
    backend = "postgresql"
    migrations = POSTGRES_MIGRATIONS

    def __init__(self, url: str, *, max_size: int = 8, connect_timeout: float = 10.0) -> None:
        from psycopg_pool import ConnectionPool

        self._url = url
        self._connect_timeout = connect_timeout
        self.pool = ConnectionPool(
            url,
            open=False,
            min_size=1,
            max_size=max_size,
            check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(connect_timeout))},
            name="zapkeep",
        )

    def _open(self) -> None:
        from psycopg_pool import PoolTimeout

        self.pool.open()
        try:
            self.pool.wait(timeout=self._connect_timeout)
        except PoolTimeout as exc:
            self.pool.close()
            raise DatabaseError(
                f"cannot connect to PostgreSQL within {self._connect_timeout:.0f} s\n"
                "Check DATABASE_URL and that the database is running."
            ) from exc

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        from psycopg.rows import dict_row

        with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            yield Transaction(cursor.execute)

    def json_param(self, text: str) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(text, dumps=_already_json)

    def _lock_for_migration(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))


class SqliteDatabase(Database):
    """The embedded default: one file, WAL mode, a short-lived connection per transaction."""

    backend = "sqlite"
    migrations = SQLITE_MIGRATIONS

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        self.path.chmod(0o600)

    def close(self) -> None:
        """Nothing stays open between transactions."""

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
            yield Transaction(lambda query, params: conn.execute(query.replace("%s", "?"), params))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def json_param(self, text: str) -> Any:
        return text


def open_database(database_url: str | None, embedded_path: Path) -> Database:
    """Connect to PostgreSQL when a URL is given, else to the embedded SQLite file; migrate."""
    database: Database = PostgresDatabase(database_url) if database_url else SqliteDatabase(embedded_path)
    database.open()
    return database


def _already_json(text: str) -> str:
    return text


def _utcnow() -> datetime:
    # Stored naive, in UTC, to fit the seed's TIMESTAMP columns on both back-ends.
    return datetime.now(UTC).replace(tzinfo=None)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _parse_timestamp(raw: bytes) -> datetime:
    return datetime.fromisoformat(raw.decode())


sqlite3.register_adapter(datetime, lambda value: value.isoformat(sep=" "))
sqlite3.register_converter("TIMESTAMP", _parse_timestamp)
