"""The door to the storage layer: opens a database and names what callers use.

Two back-ends share every query: PostgreSQL (``DATABASE_URL`` set; psycopg 3 pool) and an
embedded SQLite file (the default). Queries are written once with ``%s`` placeholders and
every value is bound, never formatted into the text. Session documents are JSONB on
PostgreSQL and JSON text on SQLite; they travel through here as already-serialised text so
that a multi-megabyte document is never encoded twice. The queries live in ``storage/``, one
module per concern; callers import from here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.composed import Database
from storage.core import Reachability, Transaction
from storage.postgres import (
    _EVENTS_LOCK_SPACE,
    _LEASE_LOCK_SPACE,
    _MIGRATION_LOCK_ID,
    AWAY_WAIT_SECONDS,
    COMMANDS_CHANNEL,
    RECONNECT_DELAY_CAP_SECONDS,
    WAIT_SLICE_SECONDS,
    PostgresDatabase,
)
from storage.records import (
    BACKUP_FAILED,
    CHAT_HANDOFF,
    CHAT_RELEASED,
    EVENT_TYPES,
    MESSAGE_RECEIVED,
    MESSAGE_SENT,
    MESSAGE_STATUS,
    SESSION_CORRUPT,
    SESSION_STATE,
    LOGGED_MESSAGE_COLUMNS,
    ChatState,
    ChatSummary,
    ClearPayloads,
    Command,
    CommandRequest,
    DatabaseError,
    Delivery,
    Fence,
    FencedOut,
    HeadWrite,
    HistoryEntry,
    Inbound,
    InboundOutcome,
    InboundResult,
    InstanceInfo,
    KeyMoved,
    LeaseInfo,
    LiveState,
    LoggedMessage,
    MediaRef,
    MirrorBatch,
    OutgoingFile,
    OutgoingMessage,
    PayloadSealer,
    RegisteredSession,
    ResealCount,
    RowChange,
    SchemaTooNewError,
    SessionMissing,
    SessionOverview,
    SessionRecord,
    SessionSummary,
    SessionWrite,
    StoredEvent,
    StoredForm,
    StoredRow,
    history_context,
    media_context,
    row_context,
)
from storage.sessions import HISTORY_KEEP
from storage.sqlite import SqliteDatabase
from storage.upgrades import SCHEMA_VERSION, STEPS

__all__ = [
    "AWAY_WAIT_SECONDS",
    "BACKUP_FAILED",
    "CHAT_HANDOFF",
    "CHAT_RELEASED",
    "COMMANDS_CHANNEL",
    "EVENT_TYPES",
    "HISTORY_KEEP",
    "LOGGED_MESSAGE_COLUMNS",
    "MESSAGE_RECEIVED",
    "MESSAGE_SENT",
    "MESSAGE_STATUS",
    "RECONNECT_DELAY_CAP_SECONDS",
    "SCHEMA_VERSION",
    "SESSION_CORRUPT",
    "SESSION_STATE",
    "STEPS",
    "WAIT_SLICE_SECONDS",
    "_EVENTS_LOCK_SPACE",
    "_LEASE_LOCK_SPACE",
    "_MIGRATION_LOCK_ID",
    "ChatState",
    "ChatSummary",
    "ClearPayloads",
    "Command",
    "CommandRequest",
    "Database",
    "DatabaseError",
    "Delivery",
    "Fence",
    "FencedOut",
    "HeadWrite",
    "HistoryEntry",
    "Inbound",
    "InboundOutcome",
    "InboundResult",
    "InstanceInfo",
    "KeyMoved",
    "LeaseInfo",
    "LiveState",
    "LoggedMessage",
    "MediaRef",
    "MirrorBatch",
    "OutgoingFile",
    "OutgoingMessage",
    "PayloadSealer",
    "PostgresDatabase",
    "Reachability",
    "RegisteredSession",
    "ResealCount",
    "RowChange",
    "SchemaTooNewError",
    "SessionMissing",
    "SessionOverview",
    "SessionRecord",
    "SessionSummary",
    "SessionWrite",
    "SqliteDatabase",
    "StoredEvent",
    "StoredForm",
    "StoredRow",
    "Transaction",
    "history_context",
    "is_unavailable",
    "media_context",
    "open_database",
    "row_context",
]


def is_unavailable(exc: BaseException) -> bool:
    """The database is away or busy (worth retrying the same work later), as opposed to refusing
    this particular data (retrying it would fail forever)."""
    from psycopg import OperationalError as PostgresUnavailable
    from psycopg_pool import PoolTimeout

    if isinstance(exc, PoolTimeout | PostgresUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(word in text for word in ("locked", "busy", "unable to open", "disk i/o"))
    return False


def open_database(database_url: str | None, embedded_path: Path, sealer: PayloadSealer | None = None) -> Database:
    """Connect to PostgreSQL when a URL is given, else to the embedded SQLite file; migrate."""
    database: Database = (
        PostgresDatabase(database_url, sealer=sealer) if database_url else SqliteDatabase(embedded_path, sealer=sealer)
    )
    database.open()
    return database
