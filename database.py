"""The one place that talks SQL: connection pool, versioned schema, named queries.

Two back-ends share every query: PostgreSQL (``DATABASE_URL`` set; psycopg 3 pool) and an
embedded SQLite file (the default). Queries are written once with ``%s`` placeholders and
every value is bound, never formatted into the text. Session documents are JSONB on
PostgreSQL and JSON text on SQLite; they travel through here as already-serialised text so
that a multi-megabyte document is never encoded twice.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

SCHEMA_VERSION = 8
HISTORY_KEEP = 5
_MIGRATION_LOCK_ID = 7_266_133_001  # any constant: serialises concurrent boots on PostgreSQL
_LEASE_LOCK_SPACE = 72_661_330  # any constant: the first key of the sessions' advisory locks
_EVENTS_LOCK_SPACE = 72_661_331  # ... and of the locks that make a session's events commit in id order

T = TypeVar("T")
log = logging.getLogger(__name__)


class DatabaseError(Exception):
    """The database is unreachable, or in a state this code cannot work with."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer zapkeep than this one."""


class FencedOut(DatabaseError):
    """A write carried a fencing token that is no longer the session's: another owner took over."""


class KeyMoved(FencedOut):
    """The stored session was moved to a key this process does not hold (``python -m bot rekey``
    beside it): it must not go on writing under its own key, which would be left behind."""


class SessionMissing(DatabaseError):
    """Rows were mirrored for a session that is not stored (an admin deleted it): sync it whole."""


class PayloadSealer(Protocol):
    """Encrypts credential payloads (mirrored rows, history snapshots) on their way into the
    database and decrypts them on their way out (``bot.session.sealing``). ``context`` names where a
    payload belongs, so that a ciphertext moved to another session or row does not decrypt."""

    @property
    def key_id(self) -> str | None:
        """The key new payloads are sealed with; None: they are stored as they come."""
        ...

    def knows(self, key_id: str) -> bool: ...

    def seal(self, text: str, context: tuple[str, ...]) -> str: ...

    def open(self, stored: str, key_id: str | None, context: tuple[str, ...]) -> str: ...


class ClearPayloads:
    """No encryption at rest: payloads are stored as they come, and a sealed one is refused."""

    key_id = None

    def knows(self, key_id: str) -> bool:
        return False

    def seal(self, text: str, context: tuple[str, ...]) -> str:
        return text

    def open(self, stored: str, key_id: str | None, context: tuple[str, ...]) -> str:
        if key_id is not None:
            raise DatabaseError(f"a stored payload is encrypted (key {key_id}) and no key was given to read it")
        return stored


def row_context(session_id: str, table: str, key: str) -> tuple[str, ...]:
    return ("row", session_id, table, key)


def history_context(session_id: str, version: int) -> tuple[str, ...]:
    return ("history", session_id, str(version))


def media_context(session_id: str, whatsapp_id: str | None) -> tuple[str, ...]:
    return ("media", session_id, whatsapp_id or "")


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
class HeadWrite:
    """The document head of a session (its definitions, checksums and metadata, no rows)."""

    session_id: str
    head_text: str
    checksum: str
    size_bytes: int  # of the whole document the head and the rows make; 0: unknown, keep the stored one
    device_jid: str | None
    push_name: str | None
    lineage: str | None


@dataclass(frozen=True)
class RowChange:
    """One mirrored row: its new content, or None when it was deleted."""

    table: str
    key: str
    row_text: str | None
    row_hash: str | None


@dataclass(frozen=True)
class MirrorBatch:
    session_id: str
    sequence: int  # the store's change sequence this batch brings the database up to
    changes: list[RowChange]
    head: HeadWrite | None = None  # with a new head (definitions changed, a reconciliation)
    checksum: str | None = None  # without a head: the document checksum after this batch


@dataclass(frozen=True)
class StoredRow:
    table: str
    row_text: str
    row_hash: str


@dataclass(frozen=True)
class StoredForm:
    """A stored row as it is stored (sealed or not): what a check of what is stored opens."""

    table: str
    key: str
    stored_text: str
    key_id: str | None
    row_hash: str


@dataclass(frozen=True)
class StoredEvent:
    """Something that happened, written in the same transaction as its cause (webhooks, /api/events)."""

    id: int
    session_id: str
    event_type: str
    chat_jid: str | None  # events of one chat are delivered in order; None: the session's own
    payload: str  # JSON text
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    """A webhook endpoint's record of one event: attempts so far and when to try again."""

    event_id: int
    attempts: int
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class ResealCount:
    """What a re-encryption pass changed: rows and history snapshots now under the current key,
    and payloads left as they were because they do not open (altered, or moved: a restore refuses them)."""

    rows: int
    snapshots: int
    unreadable: int = 0
    media: int = 0  # references to received files (their media keys)


@dataclass(frozen=True)
class Fence:
    """Proof of ownership: every write of a session made under a lease carries it."""

    session_id: str
    owner_id: str
    token: int


@dataclass(frozen=True)
class LeaseInfo:
    session_id: str
    owner_id: str | None  # None: released
    fencing_token: int
    expires_in_seconds: float  # by the database's clock; <= 0: expired


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    version: int  # of the latest full snapshot in history
    checksum: str
    size_bytes: int
    device_jid: str | None
    push_name: str | None
    created_at: datetime
    updated_at: datetime  # moves with every mirrored batch
    format_version: int
    mirror_sequence: int


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    version: int
    checksum: str
    size_bytes: int
    device_jid: str | None
    push_name: str | None
    updated_at: datetime
    session_data: str  # format 2: the document head (rows apart); format 1 and history: the whole document
    format_version: int = 2
    lineage: str | None = None
    mirror_sequence: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    session_id: str
    version: int
    checksum: str
    size_bytes: int
    device_jid: str | None
    taken_at: datetime


@dataclass(frozen=True)
class ChatState:
    chat_jid: str
    last_incoming_at: datetime | None
    paused_until: datetime | None
    pause_reason: str | None
    last_reply_reason: str | None = None
    last_reply_at: datetime | None = None
    phone_jid: str | None = None


@dataclass(frozen=True)
class Inbound:
    """A customer's message, as it is logged."""

    session_id: str
    chat_jid: str
    sender: str
    message_id: str
    text: str
    received_at: datetime
    message_type: str = "text"
    mimetype: str | None = None
    size: int | None = None
    file_name: str | None = None
    media: str | None = None  # whatsmeow's reference to download the file (sealed when stored)
    chat_phone: str | None = None  # a LID chat's phone JID, where WhatsApp or whatsmeow's LID map tells it


@dataclass(frozen=True)
class OutgoingFile:
    """A file to send (an image, document, audio or video), kept with its message until it is sent."""

    kind: str
    data: bytes
    mimetype: str
    file_name: str | None = None


@dataclass(frozen=True)
class MediaRef:
    mimetype: str | None
    file_name: str | None
    size: int | None
    media: str  # opened


@dataclass(frozen=True)
class InboundOutcome:
    """What the chatbot decided for one inbound message; stored with it in one transaction."""

    status: str  # replied | paused | ignored
    reason: str
    reply_text: str | None = None
    reply_expires_at: datetime | None = None
    paused_until: datetime | None = None
    pause_reason: str | None = None


@dataclass(frozen=True)
class InboundResult:
    duplicate: bool  # this message id was recorded before: nothing was done again
    reply_id: int | None


@dataclass(frozen=True)
class OutgoingMessage:
    id: int
    chat_jid: str
    text: str
    attempts: int
    next_attempt_at: datetime | None
    expires_at: datetime | None
    message_type: str = "text"


# (a fixed list, for every query that reads LoggedMessage rows)
LOGGED_MESSAGE_COLUMNS = (
    "id, chat_jid, sender, message_id, direction, text, status, reason, created_at, sent_at,"
    " attempts, last_error, message_type, mimetype, media_size, file_name"
)


@dataclass(frozen=True)
class ChatSummary:
    chat_jid: str
    unanswered: int  # customer messages since our last one
    last_text: str
    last_direction: str
    last_type: str
    last_at: datetime
    paused_until: datetime | None  # the bot is quiet in this chat until then (a hand-off)
    pause_reason: str | None
    phone_jid: str | None = None  # a LID chat's phone JID, once known


@dataclass(frozen=True)
class LoggedMessage:
    id: int
    chat_jid: str
    sender: str | None
    message_id: str | None
    direction: str
    text: str
    status: str
    reason: str | None
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    message_type: str = "text"
    mimetype: str | None = None
    media_size: int | None = None
    file_name: str | None = None


# --- schema ---------------------------------------------------------------------------


def _tables_beside_sessions(serial_key: str) -> list[str]:
    """History, leases, messages, chats: the same on both back-ends but for the serial key."""
    return [
        f"""CREATE TABLE whatsapp_session_history (
            id {serial_key},
            session_id VARCHAR(100) NOT NULL,
            version INTEGER NOT NULL,
            session_data JSONB NOT NULL,
            checksum TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            device_jid TEXT,
            taken_at TIMESTAMP NOT NULL,
            UNIQUE (session_id, version)
        )""",
        """CREATE TABLE whatsapp_session_leases (
            session_id VARCHAR(100) PRIMARY KEY,
            owner_id TEXT,
            fencing_token BIGINT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL,
            renewed_at DOUBLE PRECISION NOT NULL
        )""",
        f"""CREATE TABLE whatsapp_messages (
            id {serial_key},
            session_id VARCHAR(100) NOT NULL,
            chat_jid TEXT NOT NULL,
            sender TEXT,
            message_id TEXT,
            dedupe_key TEXT,
            direction VARCHAR(3) NOT NULL,
            text TEXT NOT NULL,
            status VARCHAR(16) NOT NULL,
            reason TEXT,
            created_at TIMESTAMP NOT NULL,
            sent_at TIMESTAMP,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TIMESTAMP,
            expires_at TIMESTAMP,
            last_error TEXT,
            UNIQUE (session_id, dedupe_key)
        )""",
        "CREATE INDEX whatsapp_messages_by_status ON whatsapp_messages (session_id, status, id)",
        "CREATE INDEX whatsapp_messages_by_chat ON whatsapp_messages (session_id, chat_jid, id)",
        """CREATE TABLE whatsapp_chats (
            session_id VARCHAR(100) NOT NULL,
            chat_jid TEXT NOT NULL,
            last_incoming_at TIMESTAMP,
            paused_until TIMESTAMP,
            pause_reason TEXT,
            PRIMARY KEY (session_id, chat_jid)
        )""",
    ]


# Each list is ordered: entry N brings the schema from version N to N+1. The first entry
# creates the whole current schema on a fresh database (and, on PostgreSQL, adopts the
# seed's pre-existing whatsapp_sessions table by adding the columns it lacks).


def _rows_table() -> list[str]:
    """Persistence v2: every row of every session's whatsmeow store, mirrored one by one."""
    return [
        """CREATE TABLE whatsapp_session_rows (
            session_id VARCHAR(100) NOT NULL,
            table_name TEXT NOT NULL,
            row_key TEXT NOT NULL,
            row_data JSONB NOT NULL,
            row_hash TEXT NOT NULL,
            PRIMARY KEY (session_id, table_name, row_key)
        )""",
    ]


def _message_kinds() -> list[str]:
    """What kind each logged message is (text, audio, reaction...), and each chat's last reply."""
    return [
        "ALTER TABLE whatsapp_messages ADD COLUMN message_type VARCHAR(16) NOT NULL DEFAULT 'text'",
        "ALTER TABLE whatsapp_chats ADD COLUMN last_reply_reason TEXT",
        "ALTER TABLE whatsapp_chats ADD COLUMN last_reply_at TIMESTAMP",
    ]


def _bot_settings_and_receipts() -> list[str]:
    """Switches an operator flips for the whole session (the bot's replies paused, logging on),
    and messages found by WhatsApp's id (receipts, our own messages coming back)."""
    return [
        """CREATE TABLE whatsapp_bot_settings (
            session_id VARCHAR(100) PRIMARY KEY,
            replies_paused BOOLEAN NOT NULL DEFAULT FALSE,
            changed_at TIMESTAMP NOT NULL
        )""",
        "CREATE INDEX whatsapp_messages_by_whatsapp_id ON whatsapp_messages (session_id, message_id)",
    ]


def _key_ids() -> list[str]:
    """Encryption at rest: which key each credential payload is sealed with (NULL: in clear)."""
    return [
        "ALTER TABLE whatsapp_session_rows ADD COLUMN key_id TEXT",
        "ALTER TABLE whatsapp_session_history ADD COLUMN key_id TEXT",
    ]


def _events(serial_key: str) -> list[str]:
    """Events for webhooks and the event stream, and what each webhook endpoint has received."""
    return [
        f"""CREATE TABLE whatsapp_events (
            id {serial_key},
            session_id VARCHAR(100) NOT NULL,
            event_type VARCHAR(32) NOT NULL,
            chat_jid TEXT,
            payload JSONB NOT NULL,
            created_at TIMESTAMP NOT NULL
        )""",
        "CREATE INDEX whatsapp_events_by_session ON whatsapp_events (session_id, id)",
        """CREATE TABLE whatsapp_webhook_deliveries (
            endpoint VARCHAR(32) NOT NULL,
            event_id BIGINT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TIMESTAMP,
            last_error TEXT,
            delivered_at TIMESTAMP,
            given_up_at TIMESTAMP,
            PRIMARY KEY (endpoint, event_id)
        )""",
        """CREATE TABLE whatsapp_webhook_endpoints (
            endpoint VARCHAR(32) NOT NULL,
            session_id VARCHAR(100) NOT NULL,
            settled_through BIGINT NOT NULL,
            PRIMARY KEY (endpoint, session_id)
        )""",
    ]


def _media(blob: str) -> list[str]:
    """Files: what a received one is and how to download it; the bytes of one waiting to be sent."""
    return [
        "ALTER TABLE whatsapp_messages ADD COLUMN mimetype TEXT",
        "ALTER TABLE whatsapp_messages ADD COLUMN media_size BIGINT",
        "ALTER TABLE whatsapp_messages ADD COLUMN file_name TEXT",
        "ALTER TABLE whatsapp_messages ADD COLUMN media_ref TEXT",
        "ALTER TABLE whatsapp_messages ADD COLUMN media_key_id TEXT",
        f"""CREATE TABLE whatsapp_outgoing_files (
            message_id BIGINT PRIMARY KEY,
            data {blob} NOT NULL,
            mimetype TEXT NOT NULL,
            file_name TEXT
        )""",
    ]


def _lid_chats() -> list[str]:
    """A chat WhatsApp addresses by LID ("<lid>@lid") stays that chat; its phone JID, once known, beside it."""
    return ["ALTER TABLE whatsapp_chats ADD COLUMN phone_jid TEXT"]


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
        *_tables_beside_sessions("SERIAL PRIMARY KEY"),
    ],
    [
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS format_version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS lineage TEXT",
        "ALTER TABLE whatsapp_sessions ADD COLUMN IF NOT EXISTS mirror_sequence BIGINT NOT NULL DEFAULT 0",
        *_rows_table(),
    ],
    _message_kinds(),
    _bot_settings_and_receipts(),
    _key_ids(),
    _events("BIGSERIAL PRIMARY KEY"),
    _media("BYTEA"),
    _lid_chats(),
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
        *_tables_beside_sessions("INTEGER PRIMARY KEY AUTOINCREMENT"),
    ],
    [
        "ALTER TABLE whatsapp_sessions ADD COLUMN format_version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE whatsapp_sessions ADD COLUMN lineage TEXT",
        "ALTER TABLE whatsapp_sessions ADD COLUMN mirror_sequence BIGINT NOT NULL DEFAULT 0",
        *_rows_table(),
    ],
    _message_kinds(),
    _bot_settings_and_receipts(),
    _key_ids(),
    _events("INTEGER PRIMARY KEY AUTOINCREMENT"),
    _media("BLOB"),
    _lid_chats(),
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

    def __init__(self, execute: Any, executemany: Any) -> None:
        self._execute = execute
        self._executemany = executemany

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        return self._execute(query, params)

    def executemany(self, query: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self._executemany(query, params)

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(query, params).fetchone()
        return None if row is None else next(iter(row.values()))

    def one(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> T | None:
        row = self.execute(query, params).fetchone()
        return None if row is None else cls(**row)

    def all(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> list[T]:
        return [cls(**row) for row in self.execute(query, params).fetchall()]


class Reachability:
    """Whether the database answers: unreachable from the first call (or connection attempt) that
    could not reach it until the next one that did. Callers that meet a database known to be away
    fail at once instead of waiting out the pool's timeout each."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._since: datetime | None = None
        self._on_lost = on_lost

    @property
    def unreachable_since(self) -> datetime | None:
        return self._since

    def lost(self) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = datetime.now(UTC)
        log.warning("the database is unreachable; callers fail at once until it answers again")
        if self._on_lost is not None:
            self._on_lost()

    def reached(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            away = (datetime.now(UTC) - since).total_seconds()
            log.info("the database answers again after %.1f s", away)


class Database:
    """The session tables, over whichever back-end the configuration chose."""

    backend = "abstract"
    migrations: list[list[str]] = []
    sealer: PayloadSealer = ClearPayloads()
    NOW = ""  # the database's clock in unix seconds; leases never trust a host's clock

    @property
    def unreachable_since(self) -> datetime | None:
        """Since when the database has been found unreachable; None while it answers (the
        embedded SQLite file is never "away": a busy one is waited for)."""
        return None

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

    # "%s OR EXISTS (...)": the first parameter is True for an unfenced (admin) write.
    FENCE_HOLDS = """(%s OR EXISTS (SELECT 1 FROM whatsapp_session_leases
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s AND expires_at > %s))"""
    SELECT_FENCE_HOLDS = f"SELECT {FENCE_HOLDS} AS holds"

    def _fence_params(self, tx: Transaction, session_id: str, fence: Fence | None) -> tuple[Any, ...]:
        """Hold off take-overs of the session until this write has committed (so the token that
        FENCE_HOLDS checks cannot change under the write); the parameters of FENCE_HOLDS."""
        if fence is None:
            return (True, session_id, "", 0, 0.0)
        if fence.session_id != session_id:
            raise FencedOut(f"a fence for session {fence.session_id} cannot write session {session_id}")
        return (False, session_id, fence.owner_id, fence.token, self._hold_off_take_overs(tx, session_id))

    def _hold_off_take_overs(self, tx: Transaction, session_id: str) -> float:
        """Returns the database's clock; the back-end makes a concurrent take-over wait."""
        raise NotImplementedError

    def _lock_for_take_over(self, tx: Transaction, session_id: str) -> None:
        """A take-over waits for every fenced write in flight (see ``_hold_off_take_overs``)."""

    def _lock_events(self, tx: Transaction, session_id: str) -> None:
        """Until this transaction ends, no other takes an event id of the session: ids then commit
        in order, so a reader that has seen id N never sees an N-1 appear later (SQLite's
        transactions are serial already)."""

    def _require_fence(self, tx: Transaction, fence: Fence | None, params: tuple[Any, ...]) -> None:
        if fence is not None and not tx.scalar(self.SELECT_FENCE_HOLDS, params):
            raise self._fenced_out(fence)

    @staticmethod
    def _fenced_out(fence: Fence) -> FencedOut:
        return FencedOut(
            f"session {fence.session_id}: fencing token {fence.token} is no longer valid; "
            "another instance owns the session"
        )

    UPSERT_HEAD = f"""
        INSERT INTO whatsapp_sessions
            (session_id, session_data, version, checksum, size_bytes, device_jid, push_name, created_at, updated_at,
             format_version, lineage, mirror_sequence)
        SELECT %s, %s, 0, %s, %s, %s, %s, %s, %s, 2, %s, %s
        WHERE {FENCE_HOLDS}
        ON CONFLICT (session_id) DO UPDATE SET
            session_data = excluded.session_data,
            checksum = excluded.checksum,
            size_bytes = CASE WHEN excluded.size_bytes > 0 THEN excluded.size_bytes ELSE whatsapp_sessions.size_bytes END,
            device_jid = excluded.device_jid,
            push_name = excluded.push_name,
            updated_at = excluded.updated_at,
            format_version = 2,
            lineage = excluded.lineage,
            mirror_sequence = excluded.mirror_sequence
        WHERE {FENCE_HOLDS}
        RETURNING version
    """
    # A batch without a new head moves only these two small columns: the head itself is not rewritten.
    ADVANCE_SEQUENCE = f"""
        UPDATE whatsapp_sessions SET mirror_sequence = %s, updated_at = %s, checksum = COALESCE(%s, checksum)
        WHERE session_id = %s AND {FENCE_HOLDS}
    """
    UPSERT_ROW = """
        INSERT INTO whatsapp_session_rows (session_id, table_name, row_key, row_data, row_hash, key_id)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id, table_name, row_key) DO UPDATE SET
            row_data = excluded.row_data,
            row_hash = excluded.row_hash,
            key_id = excluded.key_id
    """
    DELETE_ROW = "DELETE FROM whatsapp_session_rows WHERE session_id = %s AND table_name = %s AND row_key = %s"
    DELETE_ROWS = "DELETE FROM whatsapp_session_rows WHERE session_id = %s"

    def _upsert_head(self, tx: Transaction, head: HeadWrite, sequence: int, fence_params: tuple[Any, ...]) -> bool:
        now = _utcnow()
        params = (
            head.session_id,
            self.json_param(head.head_text),
            head.checksum,
            head.size_bytes,
            head.device_jid,
            head.push_name,
            now,
            now,
            head.lineage,
            sequence,
        )
        return tx.scalar(self.UPSERT_HEAD, (*params, *fence_params, *fence_params)) is not None

    # The device row is the session's key marker: a rekey moves it first (under a row lock), and
    # every write that seals with this process's key reads it in its own transaction (FOR SHARE on
    # PostgreSQL: a write either commits before the rekey moved it or sees where it went).
    SELECT_KEY_MARKER = (
        "SELECT key_id FROM whatsapp_session_rows WHERE session_id = %s AND table_name = 'whatsmeow_device'"
    )

    def _require_key_held(self, tx: Transaction, session_id: str) -> None:
        for row in tx.execute(self.SELECT_KEY_MARKER, (session_id,)).fetchall():
            key_id = row["key_id"]
            if key_id is not None and key_id != self.sealer.key_id and not self.sealer.knows(key_id):
                raise KeyMoved(
                    f"session {session_id}: the stored session was moved to key {key_id} (a rekey), which this "
                    "process does not hold; it writes nothing more under its own key\n"
                    "Redeploy every daemon with the new SESSION_ENCRYPTION_KEY."
                )

    def write_batch(self, batch: MirrorBatch, fence: Fence | None = None) -> None:
        """Mirror one batch of row changes in one transaction, fenced like every session write.

        Raises FencedOut (nothing written) when the lease is no longer ours, and SessionMissing
        when there is no stored session to add rows to (deleted meanwhile) and the batch has no head.
        """
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, batch.session_id, fence)
            self._require_key_held(tx, batch.session_id)
            if batch.head is not None:
                written = self._upsert_head(tx, batch.head, batch.sequence, fence_params)
            else:
                params = (batch.sequence, _utcnow(), batch.checksum, batch.session_id, *fence_params)
                written = tx.execute(self.ADVANCE_SEQUENCE, params).rowcount == 1
            if not written:
                self._require_fence(tx, fence, fence_params)
                raise SessionMissing(f"session {batch.session_id} is not stored (deleted?); it needs a full sync")
            self._write_rows(tx, batch.session_id, batch.changes)

    def _write_rows(self, tx: Transaction, session_id: str, changes: Sequence[RowChange]) -> None:
        seal, key_id = self.sealer.seal, self.sealer.key_id
        upserts = [
            (
                session_id,
                c.table,
                c.key,
                self.json_param(seal(c.row_text, row_context(session_id, c.table, c.key))),
                c.row_hash,
                key_id,
            )
            for c in changes
            if c.row_text is not None
        ]
        deletes = [(session_id, c.table, c.key) for c in changes if c.row_text is None]
        tx.executemany(self.DELETE_ROW, deletes)
        tx.executemany(self.UPSERT_ROW, upserts)

    def replace_session(
        self, head: HeadWrite, rows: Sequence[RowChange], sequence: int, fence: Fence | None = None
    ) -> None:
        """Make a whole document the stored session (import, restore, roll-back): one transaction."""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, head.session_id, fence)
            self._require_key_held(tx, head.session_id)
            if not self._upsert_head(tx, head, sequence, fence_params):
                raise self._fenced_out(fence) if fence is not None else DatabaseError("session head not written")
            tx.execute(self.DELETE_ROWS, (head.session_id,))
            self._write_rows(tx, head.session_id, rows)

    SET_LINEAGE = f"""
        UPDATE whatsapp_sessions SET lineage = %s, mirror_sequence = %s
        WHERE session_id = %s AND {FENCE_HOLDS}
    """

    def set_lineage(self, session_id: str, lineage: str, sequence: int, fence: Fence | None = None) -> None:
        """A store rebuilt from the database starts a new lineage: only it may push over what is stored."""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, session_id, fence)
            if tx.execute(self.SET_LINEAGE, (lineage, sequence, session_id, *fence_params)).rowcount != 1:
                self._require_fence(tx, fence, fence_params)

    SELECT_SESSION = """
        SELECT session_id, version, checksum, size_bytes, device_jid, push_name, updated_at,
               CAST(session_data AS TEXT) AS session_data, format_version, lineage, mirror_sequence
        FROM whatsapp_sessions WHERE session_id = %s
    """

    def load_session(self, session_id: str) -> SessionRecord | None:
        """The stored session's row: for format 2 its head, the rows apart (``load_rows``)."""
        with self.transaction() as tx:
            return tx.one(SessionRecord, self.SELECT_SESSION, (session_id,))

    SELECT_ROWS = """
        SELECT table_name, row_key, CAST(row_data AS TEXT) AS row_text, row_hash, key_id
        FROM whatsapp_session_rows WHERE session_id = %s ORDER BY table_name, row_key
    """
    SELECT_ROW_HASHES = "SELECT table_name, row_key, row_hash FROM whatsapp_session_rows WHERE session_id = %s"

    def load_rows(self, session_id: str) -> list[StoredRow]:
        with self.transaction() as tx:
            return self._select_rows(tx, session_id)

    def _select_rows(self, tx: Transaction, session_id: str) -> list[StoredRow]:
        open_ = self.sealer.open
        return [
            StoredRow(
                row["table_name"],
                open_(row["row_text"], row["key_id"], row_context(session_id, row["table_name"], row["row_key"])),
                row["row_hash"],
            )
            for row in tx.execute(self.SELECT_ROWS, (session_id,)).fetchall()
        ]

    def stored_forms(self, session_id: str) -> list[StoredForm]:
        """Every stored row of the session as it is stored: a reconciliation opens and checks them."""
        with self.transaction() as tx:
            found = tx.execute(self.SELECT_ROWS, (session_id,)).fetchall()
        return [StoredForm(r["table_name"], r["row_key"], r["row_text"], r["key_id"], r["row_hash"]) for r in found]

    def load_session_and_rows(self, session_id: str) -> tuple[SessionRecord, list[StoredRow]] | None:
        """The head and the rows as of one moment (the mirror may be writing meanwhile)."""
        with self.transaction() as tx:
            self._one_snapshot(tx)
            record = tx.one(SessionRecord, self.SELECT_SESSION, (session_id,))
            if record is None:
                return None
            return record, self._select_rows(tx, session_id)

    def _one_snapshot(self, tx: Transaction) -> None:
        """Make every statement of this (read) transaction see the same committed state."""

    def row_hashes(self, session_id: str) -> dict[str, dict[str, str]]:
        """table -> row key -> hash of every mirrored row: what a reconciliation compares."""
        hashes: dict[str, dict[str, str]] = {}
        with self.transaction() as tx:
            for row in tx.execute(self.SELECT_ROW_HASHES, (session_id,)).fetchall():
                hashes.setdefault(row["table_name"], {})[row["row_key"]] = row["row_hash"]
        return hashes

    NEXT_HISTORY_VERSION = "SELECT COALESCE(MAX(version), 0) + 1 FROM whatsapp_session_history WHERE session_id = %s"
    INSERT_HISTORY = f"""
        INSERT INTO whatsapp_session_history
            (session_id, version, session_data, checksum, size_bytes, device_jid, taken_at, key_id)
        SELECT %s, %s, %s, %s, %s, %s, %s, %s
        WHERE {FENCE_HOLDS}
    """
    PRUNE_HISTORY = "DELETE FROM whatsapp_session_history WHERE session_id = %s AND version <= %s"
    SET_SESSION_VERSION = "UPDATE whatsapp_sessions SET version = %s, size_bytes = %s WHERE session_id = %s"

    def save_history(self, write: SessionWrite, fence: Fence | None = None) -> int:
        """Keep a full snapshot (the last few stay); the stored session takes its version number."""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, write.session_id, fence)
            self._require_key_held(tx, write.session_id)
            version = tx.scalar(self.NEXT_HISTORY_VERSION, (write.session_id,))
            params = (
                write.session_id,
                version,
                self.json_param(self.sealer.seal(write.document_text, history_context(write.session_id, version))),
                write.checksum,
                write.size_bytes,
                write.device_jid,
                _utcnow(),
                self.sealer.key_id,
            )
            if tx.execute(self.INSERT_HISTORY, (*params, *fence_params)).rowcount != 1:
                raise self._fenced_out(fence) if fence is not None else DatabaseError("history not written")
            tx.execute(self.PRUNE_HISTORY, (write.session_id, version - HISTORY_KEEP))
            tx.execute(self.SET_SESSION_VERSION, (version, write.size_bytes, write.session_id))
        return version

    SELECT_HISTORY_VERSION = """
        SELECT h.session_id, h.version, h.checksum, h.size_bytes, h.device_jid,
               s.push_name, h.taken_at AS updated_at, CAST(h.session_data AS TEXT) AS session_data,
               0 AS format_version, h.key_id
        FROM whatsapp_session_history h
        LEFT JOIN whatsapp_sessions s ON s.session_id = h.session_id
        WHERE h.session_id = %s AND h.version = %s
    """

    def load_history_version(self, session_id: str, version: int) -> SessionRecord | None:
        """A historical snapshot: always a whole document (format_version 0: read it from the document)."""
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_HISTORY_VERSION, (session_id, version)).fetchone()
        if row is None:
            return None
        key_id = row.pop("key_id")
        row["session_data"] = self.sealer.open(row["session_data"], key_id, history_context(session_id, version))
        return SessionRecord(**row)

    SELECT_HISTORY = """
        SELECT session_id, version, checksum, size_bytes, device_jid, taken_at
        FROM whatsapp_session_history WHERE session_id = %s ORDER BY version DESC
    """

    def list_history(self, session_id: str) -> list[HistoryEntry]:
        with self.transaction() as tx:
            return tx.all(HistoryEntry, self.SELECT_HISTORY, (session_id,))

    # --- encryption at rest: which keys are in use, and moving everything to the current one ---

    SELECT_KEY_IDS = """
        SELECT DISTINCT key_id FROM whatsapp_session_rows WHERE session_id = %s
        UNION SELECT DISTINCT key_id FROM whatsapp_session_history WHERE session_id = %s
        UNION SELECT DISTINCT media_key_id FROM whatsapp_messages WHERE session_id = %s AND media_ref IS NOT NULL
    """

    def key_ids(self, session_id: str) -> set[str | None]:
        """The keys the session's stored credentials are sealed with (None: some are in clear)."""
        with self.transaction() as tx:
            found = tx.execute(self.SELECT_KEY_IDS, (session_id, session_id, session_id)).fetchall()
            return {row["key_id"] for row in found}

    RESEAL_BATCH = 500
    # COALESCE: in clear is key '' here, so one query serves "encrypt", "rotate" and "decrypt".
    SELECT_ROWS_TO_RESEAL = """
        SELECT table_name, row_key, CAST(row_data AS TEXT) AS row_text, row_hash, key_id
        FROM whatsapp_session_rows
        WHERE session_id = %s AND (table_name, row_key) > (%s, %s) AND COALESCE(key_id, '') <> %s
        ORDER BY table_name, row_key LIMIT %s
    """
    # Compare-and-set on the row's hash: a row the mirror changed meanwhile is left as the mirror wrote it.
    RESEAL_ROW = f"""
        UPDATE whatsapp_session_rows SET row_data = %s, key_id = %s
        WHERE session_id = %s AND table_name = %s AND row_key = %s AND row_hash = %s AND {FENCE_HOLDS}
    """
    SELECT_SNAPSHOTS_TO_RESEAL = """
        SELECT version FROM whatsapp_session_history
        WHERE session_id = %s AND COALESCE(key_id, '') <> %s ORDER BY version
    """
    SELECT_SNAPSHOT_TO_RESEAL = """
        SELECT CAST(session_data AS TEXT) AS session_data, checksum, key_id
        FROM whatsapp_session_history WHERE session_id = %s AND version = %s
    """
    RESEAL_SNAPSHOT = f"""
        UPDATE whatsapp_session_history SET session_data = %s, key_id = %s
        WHERE session_id = %s AND version = %s AND checksum = %s AND {FENCE_HOLDS}
    """

    SELECT_MEDIA_TO_RESEAL = """
        SELECT id, message_id, media_ref, media_key_id FROM whatsapp_messages
        WHERE session_id = %s AND media_ref IS NOT NULL AND COALESCE(media_key_id, '') <> %s AND id > %s
        ORDER BY id LIMIT %s
    """
    RESEAL_MEDIA = "UPDATE whatsapp_messages SET media_ref = %s, media_key_id = %s WHERE id = %s AND media_ref = %s"

    def _reseal_media(self, session_id: str, current: str) -> tuple[int, int]:
        """(resealed, unreadable) media references; the message log is not fenced, the update compares."""
        resealed = unreadable = 0
        after = 0
        while True:
            with self.transaction() as tx:
                found = tx.execute(
                    self.SELECT_MEDIA_TO_RESEAL, (session_id, current, after, self.RESEAL_BATCH)
                ).fetchall()
                for row in found:
                    context = media_context(session_id, row["message_id"])
                    try:
                        text = self.sealer.open(row["media_ref"], row["media_key_id"], context)
                    except Exception:
                        unreadable += 1
                        continue
                    params = (self.sealer.seal(text, context), self.sealer.key_id, row["id"], row["media_ref"])
                    resealed += tx.execute(self.RESEAL_MEDIA, params).rowcount
            if len(found) < self.RESEAL_BATCH:
                return resealed, unreadable
            after = found[-1]["id"]

    def _reseal_rows(
        self, tx: Transaction, session_id: str, found: list[Any], fence_params: tuple[Any, ...]
    ) -> tuple[int, int]:
        """(resealed, unreadable) of these rows; the sealer's own error, naming a row, is the restore's to tell."""
        resealed = unreadable = 0
        for row in found:
            context = row_context(session_id, row["table_name"], row["row_key"])
            try:
                text = self.sealer.open(row["row_text"], row["key_id"], context)
            except Exception:
                unreadable += 1
                continue
            params = (self.json_param(self.sealer.seal(text, context)), self.sealer.key_id, session_id)
            where = (row["table_name"], row["row_key"], row["row_hash"], *fence_params)
            resealed += tx.execute(self.RESEAL_ROW, (*params, *where)).rowcount
        return resealed, unreadable

    # The key marker first (see SELECT_KEY_MARKER), locked as it is read: from its commit on, no
    # write under a key that is being rotated out can land, so the pass below leaves nothing behind.
    SELECT_MARKER_TO_RESEAL = """
        SELECT table_name, row_key, CAST(row_data AS TEXT) AS row_text, row_hash, key_id
        FROM whatsapp_session_rows
        WHERE session_id = %s AND table_name = 'whatsmeow_device' AND COALESCE(key_id, '') <> %s
    """

    def reseal(self, session_id: str, fence: Fence | None = None) -> ResealCount:
        """Re-encrypt every stored credential payload of the session that is not under the
        current key (or, with no key, decrypt it), a few hundred rows a transaction. Safe beside a
        running mirror: only a payload's envelope changes, never its content."""
        current = self.sealer.key_id or ""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, session_id, fence)
            found = tx.execute(self.SELECT_MARKER_TO_RESEAL, (session_id, current)).fetchall()
            rows, unreadable = self._reseal_rows(tx, session_id, found, fence_params)
            if found:
                self._require_fence(tx, fence, fence_params)
        after = ("", "")
        while True:
            with self.transaction() as tx:
                fence_params = self._fence_params(tx, session_id, fence)
                found = tx.execute(
                    self.SELECT_ROWS_TO_RESEAL, (session_id, *after, current, self.RESEAL_BATCH)
                ).fetchall()
                moved, left = self._reseal_rows(tx, session_id, found, fence_params)
                rows, unreadable = rows + moved, unreadable + left
                if found:
                    self._require_fence(tx, fence, fence_params)
            if len(found) < self.RESEAL_BATCH:
                break
            after = (found[-1]["table_name"], found[-1]["row_key"])
        snapshots = 0
        with self.transaction() as tx:
            found = tx.execute(self.SELECT_SNAPSHOTS_TO_RESEAL, (session_id, current)).fetchall()
        for version in [row["version"] for row in found]:  # one a transaction: each is a whole document
            with self.transaction() as tx:
                fence_params = self._fence_params(tx, session_id, fence)
                row = tx.execute(self.SELECT_SNAPSHOT_TO_RESEAL, (session_id, version)).fetchone()
                if row is None:
                    continue  # pruned meanwhile
                context = history_context(session_id, version)
                try:
                    text = self.sealer.open(row["session_data"], row["key_id"], context)
                except Exception:
                    unreadable += 1
                    continue
                params = (self.json_param(self.sealer.seal(text, context)), self.sealer.key_id, session_id, version)
                snapshots += tx.execute(self.RESEAL_SNAPSHOT, (*params, row["checksum"], *fence_params)).rowcount
                self._require_fence(tx, fence, fence_params)
        media, unreadable_media = self._reseal_media(session_id, current)
        return ResealCount(rows, snapshots, unreadable + unreadable_media, media)

    DELETE_SESSION = f"DELETE FROM whatsapp_sessions WHERE session_id = %s AND {FENCE_HOLDS}"
    DELETE_HISTORY = "DELETE FROM whatsapp_session_history WHERE session_id = %s"

    def delete_session(self, session_id: str, *, keep_history: bool = True, fence: Fence | None = None) -> bool:
        """Delete the stored session and its rows; its history stays unless asked, so an admin can roll back."""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, session_id, fence)
            deleted = tx.execute(self.DELETE_SESSION, (session_id, *fence_params)).rowcount > 0
            if not deleted:
                self._require_fence(tx, fence, fence_params)
            tx.execute(self.DELETE_ROWS, (session_id,))
            if not keep_history:
                deleted = tx.execute(self.DELETE_HISTORY, (session_id,)).rowcount > 0 or deleted
        return deleted

    SELECT_SESSIONS = """
        SELECT session_id, version, checksum, size_bytes, device_jid, push_name, created_at, updated_at,
               format_version, mirror_sequence
        FROM whatsapp_sessions ORDER BY session_id
    """

    def list_sessions(self) -> list[SessionSummary]:
        with self.transaction() as tx:
            return tx.all(SessionSummary, self.SELECT_SESSIONS)

    # --- message log, chat state and outbox ---

    INSERT_MESSAGE = """
        INSERT INTO whatsapp_messages (session_id, chat_jid, sender, message_id, dedupe_key, direction, text,
                                       status, reason, created_at, sent_at, next_attempt_at, expires_at,
                                       message_type, mimetype, media_size, file_name, media_ref, media_key_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id, dedupe_key) DO NOTHING
        RETURNING id
    """
    SELECT_CHAT = """
        SELECT chat_jid, last_incoming_at, paused_until, pause_reason, last_reply_reason, last_reply_at, phone_jid
        FROM whatsapp_chats WHERE session_id = %s AND chat_jid = %s
    """
    UPSERT_CHAT = """
        INSERT INTO whatsapp_chats
            (session_id, chat_jid, last_incoming_at, paused_until, pause_reason, last_reply_reason, last_reply_at,
             phone_jid)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id, chat_jid) DO UPDATE SET
            last_incoming_at = COALESCE(excluded.last_incoming_at, whatsapp_chats.last_incoming_at),
            paused_until = excluded.paused_until,
            pause_reason = excluded.pause_reason,
            last_reply_reason = COALESCE(excluded.last_reply_reason, whatsapp_chats.last_reply_reason),
            last_reply_at = COALESCE(excluded.last_reply_at, whatsapp_chats.last_reply_at),
            phone_jid = COALESCE(excluded.phone_jid, whatsapp_chats.phone_jid)
    """
    SET_MESSAGE_STATUS = "UPDATE whatsapp_messages SET status = %s, reason = %s WHERE id = %s"
    INSERT_EVENT = """
        INSERT INTO whatsapp_events (session_id, event_type, chat_jid, payload, created_at) VALUES (%s, %s, %s, %s, %s)
    """

    def _event(self, tx: Transaction, session_id: str, event_type: str, chat_jid: str | None, payload: dict) -> None:
        """An event for webhooks and the event stream, in the transaction of what caused it."""
        text = json.dumps(payload, ensure_ascii=False, default=_json_default)
        self._lock_events(tx, session_id)
        tx.execute(self.INSERT_EVENT, (session_id, event_type, chat_jid, self.json_param(text), _utcnow()))

    def record_event(self, session_id: str, event_type: str, chat_jid: str | None, payload: dict) -> None:
        """An event whose cause is not a database write (a state change, a failed backup)."""
        with self.transaction() as tx:
            self._event(tx, session_id, event_type, chat_jid, payload)

    def _insert_message(
        self,
        tx: Transaction,
        *,
        session_id: str,
        chat_jid: str,
        direction: str,
        text: str,
        status: str,
        created_at: datetime | None,
        dedupe_key: str | None = None,
        sender: str | None = None,
        message_id: str | None = None,
        reason: str | None = None,
        sent_at: datetime | None = None,
        next_attempt_at: datetime | None = None,
        expires_at: datetime | None = None,
        message_type: str = "text",
        mimetype: str | None = None,
        media_size: int | None = None,
        file_name: str | None = None,
        media: str | None = None,
    ) -> int | None:
        """One row of the message log; None when its dedupe key was recorded before. ``media``
        (what downloads a received file, and the key to decrypt it) is sealed like credentials."""
        media_ref = None if media is None else self.sealer.seal(media, media_context(session_id, message_id))
        params = (
            session_id,
            chat_jid,
            sender,
            message_id,
            dedupe_key,
            direction,
            text,
            status,
            reason,
            _naive(created_at),
            _naive(sent_at),
            _naive(next_attempt_at),
            _naive(expires_at),
            message_type,
            mimetype,
            media_size,
            file_name,
            media_ref,
            None if media is None else self.sealer.key_id,
        )
        return tx.scalar(self.INSERT_MESSAGE, params)

    def record_inbound(self, message: Inbound, decide: Callable[[ChatState | None], InboundOutcome]) -> InboundResult:
        """Log the message and act on it exactly once: the id is recorded first, and the decision,
        the chat's new state and the queued reply commit with it or not at all."""
        received = _naive(message.received_at)
        with self.transaction() as tx:
            inbound_id = self._insert_message(
                tx,
                session_id=message.session_id,
                chat_jid=message.chat_jid,
                sender=message.sender,
                message_id=message.message_id,
                dedupe_key=f"in:{message.message_id}",
                direction="in",
                text=message.text,
                status="received",
                created_at=message.received_at,
                message_type=message.message_type,
                mimetype=message.mimetype,
                media_size=message.size,
                file_name=message.file_name,
                media=message.media,
            )
            if inbound_id is None:
                return InboundResult(duplicate=True, reply_id=None)
            chat = tx.one(ChatState, self.SELECT_CHAT, (message.session_id, message.chat_jid))
            before = None if chat is None else _aware_chat(chat)
            if message.chat_phone is None and before is not None and before.phone_jid is not None:
                message = replace(message, chat_phone=before.phone_jid)  # (known from an earlier message)
            outcome = decide(before)
            tx.execute(self.SET_MESSAGE_STATUS, (outcome.status, outcome.reason, inbound_id))
            payload = _message_event(inbound_id, message, "in", outcome.status, outcome.reason)
            self._event(tx, message.session_id, "message.received", message.chat_jid, payload)
            was_handed_off = (
                before is not None
                and before.pause_reason == "handoff"
                and before.paused_until is not None
                and before.paused_until > message.received_at
            )
            if outcome.pause_reason == "handoff" and not was_handed_off:
                handoff = {"chat": message.chat_jid, "paused_until": outcome.paused_until, "message": payload}
                self._event(tx, message.session_id, "chat.handoff", message.chat_jid, handoff)
            replied = outcome.reply_text is not None
            tx.execute(
                self.UPSERT_CHAT,
                (
                    message.session_id,
                    message.chat_jid,
                    received,
                    _naive(outcome.paused_until),
                    outcome.pause_reason,
                    outcome.reason if replied else None,
                    received if replied else None,
                    message.chat_phone,
                ),
            )
            reply_id = None
            if outcome.reply_text is not None:
                reply_id = self._insert_message(
                    tx,
                    session_id=message.session_id,
                    chat_jid=message.chat_jid,
                    dedupe_key=f"reply:{message.message_id}",
                    direction="out",
                    text=outcome.reply_text,
                    status="queued",
                    reason=outcome.reason,
                    created_at=message.received_at,
                    next_attempt_at=message.received_at,
                    expires_at=outcome.reply_expires_at,
                )
        return InboundResult(duplicate=False, reply_id=reply_id)

    def record_operator_message(self, message: Inbound, paused_until: datetime) -> bool:
        """An answer typed on the phone: logged as outgoing, and the bot steps back in that chat."""
        with self.transaction() as tx:
            self._lock_events(tx, message.session_id)  # before the chat's row, as record_inbound: no deadlock
            logged = self._insert_message(
                tx,
                session_id=message.session_id,
                chat_jid=message.chat_jid,
                sender=message.sender,
                message_id=message.message_id,
                dedupe_key=f"op:{message.message_id}",
                direction="out",
                text=message.text,
                status="sent",
                reason="operator",
                created_at=message.received_at,
                sent_at=message.received_at,
            )
            if logged is None:
                return False
            tx.execute(
                self.UPSERT_CHAT,
                (
                    message.session_id,
                    message.chat_jid,
                    None,
                    _naive(paused_until),
                    "operator",
                    None,
                    None,
                    message.chat_phone,
                ),
            )
            payload = _message_event(logged, message, "out", "sent", "operator")
            self._event(tx, message.session_id, "message.sent", message.chat_jid, payload)
        return True

    INSERT_OUTGOING_FILE = (
        "INSERT INTO whatsapp_outgoing_files (message_id, data, mimetype, file_name) VALUES (%s, %s, %s, %s)"
    )
    SELECT_OUTGOING_FILE = """
        SELECT m.message_type AS kind, f.data, f.mimetype, f.file_name
        FROM whatsapp_outgoing_files f JOIN whatsapp_messages m ON m.id = f.message_id WHERE f.message_id = %s
    """
    DELETE_OUTGOING_FILE = "DELETE FROM whatsapp_outgoing_files WHERE message_id = %s"

    def enqueue_outgoing(
        self,
        session_id: str,
        chat_jid: str,
        text: str,
        *,
        reason: str,
        expires_at: datetime | None,
        now: datetime,
        file: OutgoingFile | None = None,
    ) -> int:
        """A message to send (``text`` is a file's caption); the file is kept with it until it is sent."""
        with self.transaction() as tx:
            message_id = self._insert_message(
                tx,
                session_id=session_id,
                chat_jid=chat_jid,
                direction="out",
                text=text,
                status="queued",
                reason=reason,
                created_at=now,
                next_attempt_at=now,
                expires_at=expires_at,
                message_type=file.kind if file else "text",
                mimetype=file.mimetype if file else None,
                media_size=len(file.data) if file else None,
                file_name=file.file_name if file else None,
            )
            assert message_id is not None  # no dedupe key: never a conflict
            if file is not None:
                tx.execute(self.INSERT_OUTGOING_FILE, (message_id, file.data, file.mimetype, file.file_name))
        return message_id

    def outgoing_file(self, message_id: int) -> OutgoingFile | None:
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_OUTGOING_FILE, (message_id,)).fetchone()
        return None if row is None else OutgoingFile(row["kind"], bytes(row["data"]), row["mimetype"], row["file_name"])

    SELECT_MEDIA_REF = """
        SELECT message_id, mimetype, file_name, media_size, media_ref, media_key_id FROM whatsapp_messages
        WHERE session_id = %s AND id = %s AND media_ref IS NOT NULL
    """

    def media_ref(self, session_id: str, row_id: int) -> MediaRef | None:
        """How to download a received file (None: the message has none)."""
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_MEDIA_REF, (session_id, row_id)).fetchone()
        if row is None:
            return None
        context = media_context(session_id, row["message_id"])
        opened = self.sealer.open(row["media_ref"], row["media_key_id"], context)
        return MediaRef(row["mimetype"], row["file_name"], row["media_size"], opened)

    SELECT_QUEUED = """
        SELECT id, chat_jid, text, attempts, next_attempt_at, expires_at, message_type FROM whatsapp_messages
        WHERE session_id = %s AND status = 'queued' ORDER BY id LIMIT %s
    """

    def queued_outgoing(self, session_id: str, limit: int = 200) -> list[OutgoingMessage]:
        """Queued messages, oldest first (the caller keeps each chat in order)."""
        with self.transaction() as tx:
            rows = tx.all(OutgoingMessage, self.SELECT_QUEUED, (session_id, limit))
        return [replace(r, next_attempt_at=_aware(r.next_attempt_at), expires_at=_aware(r.expires_at)) for r in rows]

    OUTBOX_WAITING = """
        SELECT COUNT(*) FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending')
    """
    # (the column itself, not MIN(): SQLite types an aggregate's result as text)
    OUTBOX_OLDEST = """
        SELECT created_at FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending') ORDER BY id LIMIT 1
    """

    def outbox_depth(self, session_id: str) -> tuple[int, datetime | None]:
        """How many outgoing messages wait (queued or being sent), and since when the oldest has."""
        with self.transaction() as tx:
            waiting = int(tx.scalar(self.OUTBOX_WAITING, (session_id,)))
            oldest = tx.scalar(self.OUTBOX_OLDEST, (session_id,))
        return waiting, _aware(oldest)

    CLAIM_OUTGOING = (
        "UPDATE whatsapp_messages SET status = 'sending', attempts = attempts + 1 WHERE id = %s AND status = 'queued'"
    )
    MARK_SENT = """
        UPDATE whatsapp_messages SET status = 'sent', message_id = %s, sent_at = %s, last_error = NULL WHERE id = %s
        RETURNING id, session_id, chat_jid, message_id, text, reason, message_type
    """
    MARK_RETRY = "UPDATE whatsapp_messages SET status = 'queued', last_error = %s, next_attempt_at = %s WHERE id = %s"
    MARK_UNSENT = "UPDATE whatsapp_messages SET status = 'queued', attempts = attempts - 1 WHERE id = %s"
    MARK_FAILED = """
        UPDATE whatsapp_messages SET status = 'failed', last_error = %s WHERE id = %s
        RETURNING id, session_id, chat_jid, message_id, last_error
    """

    def claim_outgoing(self, message_id: int) -> bool:
        """Mark a message as being sent; a crash from here on never sends it twice."""
        with self.transaction() as tx:
            return tx.execute(self.CLAIM_OUTGOING, (message_id,)).rowcount == 1

    def mark_sent(self, message_id: int, whatsapp_id: str, at: datetime) -> None:
        with self.transaction() as tx:
            tx.execute(self.DELETE_OUTGOING_FILE, (message_id,))  # sent: its bytes are WhatsApp's now
            for row in tx.execute(self.MARK_SENT, (whatsapp_id, _naive(at), message_id)).fetchall():
                payload = {
                    "id": row["id"],
                    "chat": row["chat_jid"],
                    "whatsapp_id": row["message_id"],
                    "direction": "out",
                    "type": row["message_type"],
                    "text": row["text"],
                    "status": "sent",
                    "reason": row["reason"],
                    "at": at,
                }
                self._event(tx, row["session_id"], "message.sent", row["chat_jid"], payload)

    def mark_retry(self, message_id: int, error: str, next_attempt_at: datetime) -> None:
        with self.transaction() as tx:
            tx.execute(self.MARK_RETRY, (error, _naive(next_attempt_at), message_id))

    def mark_unsent(self, message_id: int) -> None:
        """Back to the queue without counting an attempt (nothing reached WhatsApp)."""
        with self.transaction() as tx:
            tx.execute(self.MARK_UNSENT, (message_id,))

    def mark_failed(self, message_id: int, error: str) -> None:
        with self.transaction() as tx:
            self._status_events(tx, tx.execute(self.MARK_FAILED, (error, message_id)).fetchall(), "failed")

    def _status_events(self, tx: Transaction, rows: list[Any], status: str) -> int:
        """A message.status event for each of our messages whose status moved (rows of a RETURNING)."""
        for row in rows:
            if status == "failed":
                tx.execute(self.DELETE_OUTGOING_FILE, (row["id"],))  # never sent: nothing will need it
            payload = {"id": row["id"], "chat": row["chat_jid"], "whatsapp_id": row["message_id"], "status": status}
            if row.get("last_error"):
                payload["error"] = row["last_error"]
            self._event(tx, row["session_id"], "message.status", row["chat_jid"], payload)
        return len(rows)

    FAIL_EXPIRED = """
        UPDATE whatsapp_messages SET status = 'failed', last_error = 'expired before it could be sent'
        WHERE session_id = %s AND status = 'queued' AND expires_at IS NOT NULL AND expires_at <= %s
        RETURNING id, session_id, chat_jid, message_id, last_error
    """
    FAIL_INTERRUPTED = """
        UPDATE whatsapp_messages SET status = 'failed',
            last_error = 'interrupted while sending; not retried, so that it is never sent twice'
        WHERE session_id = %s AND status = 'sending'
        RETURNING id, session_id, chat_jid, message_id, last_error
    """

    def fail_expired(self, session_id: str, now: datetime) -> int:
        with self.transaction() as tx:
            return self._status_events(
                tx, tx.execute(self.FAIL_EXPIRED, (session_id, _naive(now))).fetchall(), "failed"
            )

    def fail_interrupted(self, session_id: str) -> int:
        with self.transaction() as tx:
            return self._status_events(tx, tx.execute(self.FAIL_INTERRUPTED, (session_id,)).fetchall(), "failed")

    SELECT_OWN_MESSAGE = """
        SELECT 1 FROM whatsapp_messages WHERE session_id = %s AND direction = 'out' AND message_id = %s
    """

    def is_own_message(self, session_id: str, whatsapp_id: str) -> bool:
        with self.transaction() as tx:
            return tx.scalar(self.SELECT_OWN_MESSAGE, (session_id, whatsapp_id)) is not None

    SELECT_MESSAGES = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND (%s OR chat_jid = %s) ORDER BY id
    """

    def list_messages(self, session_id: str, chat_jid: str | None = None) -> list[LoggedMessage]:
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_MESSAGES, (session_id, chat_jid is None, chat_jid or ""))

    # --- the read API: conversations as a CRM shows them ---

    SELECT_CHATS = """
        SELECT s.chat_jid, s.unanswered, l.text AS last_text, l.direction AS last_direction,
               l.message_type AS last_type, l.created_at AS last_at, c.paused_until, c.pause_reason, c.phone_jid
        FROM (
            SELECT m.chat_jid, MAX(m.id) AS last_id,
                   SUM(CASE WHEN m.direction = 'in' AND m.id > COALESCE((
                       SELECT MAX(o.id) FROM whatsapp_messages o
                       WHERE o.session_id = m.session_id AND o.chat_jid = m.chat_jid AND o.direction = 'out'
                   ), 0) THEN 1 ELSE 0 END) AS unanswered
            FROM whatsapp_messages m WHERE m.session_id = %s GROUP BY m.session_id, m.chat_jid
        ) s
        JOIN whatsapp_messages l ON l.id = s.last_id
        LEFT JOIN whatsapp_chats c ON c.session_id = %s AND c.chat_jid = s.chat_jid
        ORDER BY s.last_id DESC LIMIT %s
    """

    def list_chats(self, session_id: str, limit: int = 50) -> list[ChatSummary]:
        """Chats with their latest message first; ``unanswered``: customer messages since our last one."""
        with self.transaction() as tx:
            chats = tx.all(ChatSummary, self.SELECT_CHATS, (session_id, session_id, limit))
        return [
            replace(c, unanswered=int(c.unanswered), last_at=_aware(c.last_at), paused_until=_aware(c.paused_until))
            for c in chats
        ]

    SELECT_CHAT_PAGE = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND chat_jid = %s AND id < %s ORDER BY id DESC LIMIT %s
    """

    def chat_messages(self, session_id: str, chat_jid: str, before_id: int | None, limit: int) -> list[LoggedMessage]:
        """A page of a chat's messages, newest first, older than ``before_id``."""
        before = 2**62 if before_id is None else before_id
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_CHAT_PAGE, (session_id, chat_jid, before, limit))

    SELECT_MESSAGE = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND id = %s
    """

    def message(self, session_id: str, row_id: int) -> LoggedMessage | None:
        with self.transaction() as tx:
            return tx.one(LoggedMessage, self.SELECT_MESSAGE, (session_id, row_id))

    SELECT_OUTBOX = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending', 'failed')
              AND (%s OR status = %s)
        ORDER BY id DESC LIMIT %s
    """

    def outbox_messages(self, session_id: str, status: str | None, limit: int) -> list[LoggedMessage]:
        """Outgoing messages not (yet) sent: queued, being sent, or failed with their error; newest first."""
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_OUTBOX, (session_id, status is None, status or "", limit))

    UPSERT_REPLIES_PAUSED = """
        INSERT INTO whatsapp_bot_settings (session_id, replies_paused, changed_at) VALUES (%s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET replies_paused = EXCLUDED.replies_paused, changed_at = EXCLUDED.changed_at
    """
    SELECT_REPLIES_PAUSED = "SELECT replies_paused FROM whatsapp_bot_settings WHERE session_id = %s"

    def set_replies_paused(self, session_id: str, paused: bool) -> None:
        """The whole bot stops (or resumes) answering; messages are logged either way."""
        with self.transaction() as tx:
            tx.execute(self.UPSERT_REPLIES_PAUSED, (session_id, paused, _utcnow()))

    def replies_paused(self, session_id: str) -> bool:
        with self.transaction() as tx:
            return bool(tx.scalar(self.SELECT_REPLIES_PAUSED, (session_id,)))

    # Receipts only move a sent message forward: sent -> delivered -> read.
    MARK_RECEIPT = {
        "delivered": """UPDATE whatsapp_messages SET status = 'delivered'
            WHERE session_id = %s AND direction = 'out' AND message_id = %s AND status = 'sent'
            RETURNING id, session_id, chat_jid, message_id""",
        "read": """UPDATE whatsapp_messages SET status = 'read'
            WHERE session_id = %s AND direction = 'out' AND message_id = %s AND status IN ('sent', 'delivered')
            RETURNING id, session_id, chat_jid, message_id""",
    }

    def mark_receipts(self, session_id: str, message_ids: list[str], status: str) -> int:
        """How many of our sent messages moved to ``status`` ("delivered" or "read")."""
        moved = 0
        with self.transaction() as tx:
            for message_id in message_ids:
                rows = tx.execute(self.MARK_RECEIPT[status], (session_id, message_id)).fetchall()
                moved += self._status_events(tx, rows, status)
        return moved

    RELEASE_CHAT = """
        UPDATE whatsapp_chats SET paused_until = NULL, pause_reason = NULL
        WHERE session_id = %s AND chat_jid = %s AND paused_until IS NOT NULL AND paused_until > %s
    """

    def release_chat(self, session_id: str, chat_jid: str) -> bool:
        """Give a chat paused by a hand-off (or an operator's answer) back to the bot; False: it was not paused."""
        with self.transaction() as tx:
            self._lock_events(tx, session_id)  # before the chat's row, as record_inbound: no deadlock
            released = tx.execute(self.RELEASE_CHAT, (session_id, chat_jid, _utcnow())).rowcount == 1
            if released:
                self._event(tx, session_id, "chat.released", chat_jid, {"chat": chat_jid})
            return released

    # --- events and webhook deliveries ---

    SELECT_EVENTS_AFTER = """
        SELECT id, session_id, event_type, chat_jid, CAST(payload AS TEXT) AS payload, created_at
        FROM whatsapp_events WHERE session_id = %s AND id > %s ORDER BY id LIMIT %s
    """
    LAST_EVENT_ID = "SELECT COALESCE(MAX(id), 0) FROM whatsapp_events WHERE session_id = %s"

    def events_after(self, session_id: str, after: int, limit: int = 500) -> list[StoredEvent]:
        with self.transaction() as tx:
            rows = tx.all(StoredEvent, self.SELECT_EVENTS_AFTER, (session_id, after, limit))
        return [replace(r, created_at=_aware(r.created_at)) for r in rows]

    def last_event_id(self, session_id: str) -> int:
        with self.transaction() as tx:
            return int(tx.scalar(self.LAST_EVENT_ID, (session_id,)))

    # An endpoint has settled every event up to settled_through (delivered, given up or filtered out).
    REGISTER_ENDPOINT = """
        INSERT INTO whatsapp_webhook_endpoints (endpoint, session_id, settled_through)
        SELECT %s, %s, COALESCE(MAX(id), 0) FROM whatsapp_events WHERE session_id = %s
        ON CONFLICT (endpoint, session_id) DO NOTHING
    """
    SELECT_SETTLED = "SELECT settled_through FROM whatsapp_webhook_endpoints WHERE endpoint = %s AND session_id = %s"
    # Only forward: an instance that read an older mark cannot move it back.
    SET_SETTLED = """
        UPDATE whatsapp_webhook_endpoints SET settled_through = %s
        WHERE endpoint = %s AND session_id = %s AND settled_through < %s
    """
    FORGET_SETTLED = "DELETE FROM whatsapp_webhook_deliveries WHERE endpoint = %s AND event_id <= %s"
    SELECT_OPEN_DELIVERIES = """
        SELECT event_id, attempts, next_attempt_at FROM whatsapp_webhook_deliveries
        WHERE endpoint = %s AND event_id > %s AND delivered_at IS NULL AND given_up_at IS NULL
    """
    SELECT_SETTLED_DELIVERIES = """
        SELECT event_id FROM whatsapp_webhook_deliveries
        WHERE endpoint = %s AND event_id > %s AND (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)
    """
    UPSERT_DELIVERY = """
        INSERT INTO whatsapp_webhook_deliveries
            (endpoint, event_id, attempts, next_attempt_at, last_error, delivered_at, given_up_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (endpoint, event_id) DO UPDATE SET
            attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
            last_error = excluded.last_error, delivered_at = excluded.delivered_at, given_up_at = excluded.given_up_at
    """

    def register_endpoint(self, endpoint: str, session_id: str) -> int:
        """A webhook endpoint new to this session starts with the events after this moment."""
        with self.transaction() as tx:
            self._lock_events(tx, session_id)  # (no event id in flight: none is skipped)
            tx.execute(self.REGISTER_ENDPOINT, (endpoint, session_id, session_id))
            return int(tx.scalar(self.SELECT_SETTLED, (endpoint, session_id)))

    def settled_through(self, endpoint: str, session_id: str) -> int:
        with self.transaction() as tx:
            return int(tx.scalar(self.SELECT_SETTLED, (endpoint, session_id)) or 0)

    def settle(self, endpoint: str, session_id: str, through: int, delivered_after: Sequence[int]) -> None:
        """One pass's outcome in one transaction: every event up to ``through`` settled (their rows
        forgotten), and the events delivered beyond it (behind a chat still waiting) remembered."""
        now = _utcnow()
        with self.transaction() as tx:
            tx.execute(self.SET_SETTLED, (through, endpoint, session_id, through))
            tx.execute(self.FORGET_SETTLED, (endpoint, through))
            tx.executemany(
                self.UPSERT_DELIVERY, [(endpoint, event_id, 1, None, None, now, None) for event_id in delivered_after]
            )

    def open_deliveries(self, endpoint: str, after: int) -> tuple[dict[int, Delivery], set[int]]:
        """After ``after``: events tried and not yet delivered, and events settled already."""
        with self.transaction() as tx:
            rows = tx.all(Delivery, self.SELECT_OPEN_DELIVERIES, (endpoint, after))
            settled = {r["event_id"] for r in tx.execute(self.SELECT_SETTLED_DELIVERIES, (endpoint, after)).fetchall()}
        return {r.event_id: replace(r, next_attempt_at=_aware(r.next_attempt_at)) for r in rows}, settled

    def record_delivery(
        self,
        endpoint: str,
        event_id: int,
        *,
        attempts: int,
        delivered: bool,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
        given_up: bool = False,
    ) -> None:
        now = _utcnow()
        params = (
            endpoint,
            event_id,
            attempts,
            _naive(next_attempt_at),
            error,
            now if delivered else None,
            now if given_up else None,
        )
        with self.transaction() as tx:
            tx.execute(self.UPSERT_DELIVERY, params)

    PRUNE_EVENTS = "DELETE FROM whatsapp_events WHERE session_id = %s AND created_at < %s"

    def prune_events(self, session_id: str, before: datetime) -> int:
        with self.transaction() as tx:
            return tx.execute(self.PRUNE_EVENTS, (session_id, _naive(before))).rowcount

    # --- ownership leases ---

    ACQUIRE_LEASE = """
        INSERT INTO whatsapp_session_leases (session_id, owner_id, fencing_token, expires_at, acquired_at, renewed_at)
        VALUES (%s, %s, 1, %s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET
            owner_id = excluded.owner_id,
            fencing_token = whatsapp_session_leases.fencing_token + 1,
            expires_at = excluded.expires_at,
            acquired_at = excluded.acquired_at,
            renewed_at = excluded.renewed_at
        WHERE whatsapp_session_leases.owner_id IS NULL OR whatsapp_session_leases.expires_at <= excluded.acquired_at
        RETURNING fencing_token
    """

    def acquire_lease(self, session_id: str, owner_id: str, ttl_seconds: float) -> Fence | None:
        """Take the session if nobody holds it (or the holder let it expire); each take-over gets a
        larger fencing token. None: a live owner holds it."""
        with self.transaction() as tx:
            self._lock_for_take_over(tx, session_id)
            now = tx.scalar(self.NOW)
            token = tx.scalar(self.ACQUIRE_LEASE, (session_id, owner_id, now + ttl_seconds, now, now))
        return None if token is None else Fence(session_id, owner_id, token)

    RENEW_LEASE = """
        UPDATE whatsapp_session_leases SET expires_at = %s, renewed_at = %s
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s AND expires_at > %s
    """

    def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        """Extend a lease still held; False once it expired or was taken (never revived: re-acquire)."""
        with self.transaction() as tx:
            now = tx.scalar(self.NOW)
            params = (now + ttl_seconds, now, fence.session_id, fence.owner_id, fence.token, now)
            return tx.execute(self.RENEW_LEASE, params).rowcount == 1

    RELEASE_LEASE = """
        UPDATE whatsapp_session_leases SET owner_id = NULL, expires_at = %s
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s
    """

    def release_lease(self, fence: Fence) -> bool:
        """Hand the session over at once (graceful shutdown); False if it was no longer ours."""
        with self.transaction() as tx:
            now = tx.scalar(self.NOW)
            return tx.execute(self.RELEASE_LEASE, (now, fence.session_id, fence.owner_id, fence.token)).rowcount == 1

    SELECT_LEASE = """
        SELECT session_id, owner_id, fencing_token, expires_at - %s AS expires_in_seconds
        FROM whatsapp_session_leases WHERE session_id = %s
    """

    def lease(self, session_id: str) -> LeaseInfo | None:
        with self.transaction() as tx:
            return tx.one(LeaseInfo, self.SELECT_LEASE, (tx.scalar(self.NOW), session_id))


RECONNECT_DELAY_CAP_SECONDS = 2.0
# A caller waits for a pooled connection in slices this long: when the database is found away
# meanwhile (a connection attempt of the pool failed), it stops waiting at the next slice.
WAIT_SLICE_SECONDS = 0.25
# While the database is known away, a caller waits at most this long for a connection (one that the
# pool's reconnect attempts got back); then it fails, and the API answers 503 at once.
AWAY_WAIT_SECONDS = 0.5


def _connection_pool(
    url: str, delay_cap: float | None, reachability: Reachability | None = None, **options: Any
) -> Any:
    """psycopg_pool's ConnectionPool, with the delay between reconnect attempts capped.

    The pool retries a lost connection with a doubling delay (1, 2, 4, 8, 16... s, for
    ``reconnect_timeout``), and a caller waiting for a connection starts no attempt of its own while
    one is scheduled: after an outage the daemon stayed away until the next attempt, up to half as
    long again as the outage (a 40 s outage: usable 20.3 s after the database was back; capped at
    2 s: 0.8 s, bench/bench_db_outage.py). A refused connect costs next to nothing.
    """
    from psycopg_pool import ConnectionPool
    from psycopg_pool.base import AttemptWithBackoff

    if delay_cap is None:  # psycopg_pool's own series, for the bench's side-by-side
        return ConnectionPool(url, **options)

    class CappedBackoff(AttemptWithBackoff):
        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, delay_cap)

    class Pool(ConnectionPool):
        # (A private hook of psycopg_pool 3.x: each reconnect series starts here with attempt=None.)
        def _add_connection(self, attempt: Any, growing: bool = False) -> None:
            super()._add_connection(attempt or CappedBackoff(timeout=self.reconnect_timeout), growing)

        # (Another: every new connection, the pool's reconnect attempts included, is made here.)
        def _connect(self, timeout: float | None = None) -> Any:
            try:
                conn = super()._connect(timeout)
            except Exception:
                if reachability is not None:
                    reachability.lost()
                raise
            if reachability is not None:
                reachability.reached()
            return conn

    return Pool(url, **options)


class PostgresDatabase(Database):
    backend = "postgresql"
    migrations = POSTGRES_MIGRATIONS
    NOW = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        connect_timeout: float = 10.0,
        wait_timeout: float = 10.0,
        reconnect_delay_cap: float | None = RECONNECT_DELAY_CAP_SECONDS,
        sealer: PayloadSealer | None = None,
    ) -> None:
        self.sealer = sealer or ClearPayloads()
        self._url = url
        self._connect_timeout = connect_timeout
        self._wait_timeout = wait_timeout
        self.reachability = Reachability(on_lost=self._drop_broken_idle)
        self.pool = _connection_pool(
            url,
            reconnect_delay_cap,
            self.reachability,
            open=False,
            min_size=1,
            max_size=max_size,
            # No check before each checkout (an extra round trip on every write): idle connections
            # are recycled, and one found broken fails its caller as "database away" and is dropped.
            max_idle=60,
            max_lifetime=1800,
            timeout=wait_timeout,  # a caller waits this long for a connection, not psycopg's 30 s
            kwargs={"connect_timeout": max(1, int(connect_timeout))},
            name="zapkeep",
        )

    # Row locks (see Database.SELECT_KEY_MARKER): SQLite runs one write transaction at a time anyway.
    SELECT_KEY_MARKER = Database.SELECT_KEY_MARKER + " FOR SHARE"
    SELECT_MARKER_TO_RESEAL = Database.SELECT_MARKER_TO_RESEAL + " FOR UPDATE"

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

    @property
    def unreachable_since(self) -> datetime | None:
        return self.reachability.unreachable_since

    def _drop_broken_idle(self) -> None:
        """The connections idle in the pool when the database went away are broken too: replaced
        now (in the background), not one by one after it is back, each failing its caller and
        calling the database away again."""

        def check() -> None:
            try:
                self.pool.check()
            except Exception as exc:  # (the pool is closing)
                log.debug("checking the idle connections failed: %s", exc)

        threading.Thread(target=check, name="pool-check", daemon=True).start()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        from psycopg import OperationalError
        from psycopg.rows import dict_row

        conn = self._checkout()
        try:
            with conn, conn.transaction():  # (as the pool's own connection() does)
                cursor = conn.cursor(row_factory=dict_row)
                yield Transaction(cursor.execute, cursor.executemany)
        except OperationalError:
            if conn.broken:  # the server went away under it (not a statement refused)
                self.reachability.lost()
            raise
        finally:
            self.pool.putconn(conn)
        self.reachability.reached()

    def _checkout(self) -> Any:
        """A pooled connection: waited for up to the pool's timeout, or only briefly while the
        database is known to be away (then PoolTimeout, which the API answers with 503)."""
        from psycopg_pool import PoolTimeout

        deadline = time.monotonic() + self._wait_timeout
        while True:
            away = self.reachability.unreachable_since is not None
            left = deadline - time.monotonic()
            wait = min(left, AWAY_WAIT_SECONDS if away else WAIT_SLICE_SECONDS)
            try:
                return self.pool.getconn(timeout=max(wait, 0.001))
            except PoolTimeout:
                if away:
                    raise PoolTimeout("the database is unreachable") from None
                if time.monotonic() >= deadline:  # (busy, or away: the pool's attempts tell which)
                    raise PoolTimeout(f"no database connection within {self._wait_timeout:.0f} s") from None

    def json_param(self, text: str) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(text, dumps=_already_json)

    def _lock_for_migration(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))

    # Advisory locks, not a lock on the lease row: they cost no WAL, and a session's writes share
    # theirs while a take-over needs it alone. The check itself is in each write's own statement,
    # which (read committed) sees any take-over that committed before the lock was granted.
    HOLD_OFF_TAKE_OVERS = (
        "SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s)) AS locked, "
        "EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now"
    )
    LOCK_FOR_TAKE_OVER = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"

    def _one_snapshot(self, tx: Transaction) -> None:
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # (SQLite's transactions are serial)

    def _hold_off_take_overs(self, tx: Transaction, session_id: str) -> float:
        row = tx.execute(self.HOLD_OFF_TAKE_OVERS, (_LEASE_LOCK_SPACE, session_id)).fetchone()
        return row["now"]

    def _lock_for_take_over(self, tx: Transaction, session_id: str) -> None:
        tx.execute(self.LOCK_FOR_TAKE_OVER, (_LEASE_LOCK_SPACE, session_id))

    def _lock_events(self, tx: Transaction, session_id: str) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_EVENTS_LOCK_SPACE, session_id))


class SqliteDatabase(Database):
    """The embedded default: one file, WAL mode, a short-lived connection per transaction."""

    backend = "sqlite"
    migrations = SQLITE_MIGRATIONS
    NOW = "SELECT (julianday('now') - 2440587.5) * 86400.0"

    def __init__(self, path: Path, *, sealer: PayloadSealer | None = None) -> None:
        self.sealer = sealer or ClearPayloads()
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


def _already_json(text: str) -> str:
    return text


def _message_event(row_id: int, message: Inbound, direction: str, status: str, reason: str | None) -> dict[str, Any]:
    return {
        "id": row_id,
        "chat": message.chat_jid,
        **({"chat_phone": message.chat_phone} if message.chat_phone else {}),
        "whatsapp_id": message.message_id,
        "sender": message.sender,
        "direction": direction,
        "type": message.message_type,
        "text": message.text,
        "status": status,
        "reason": reason,
        "at": message.received_at,
        **(
            {"mimetype": message.mimetype, "size": message.size, "file_name": message.file_name}
            if message.media
            else {}
        ),
    }


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _utcnow() -> datetime:
    # Stored naive, in UTC, to fit the seed's TIMESTAMP columns on both back-ends.
    return datetime.now(UTC).replace(tzinfo=None)


def _naive(value: datetime | None) -> datetime | None:
    """Aware -> naive UTC, the form every TIMESTAMP column holds."""
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def _aware_chat(chat: ChatState) -> ChatState:
    return replace(
        chat,
        last_incoming_at=_aware(chat.last_incoming_at),
        paused_until=_aware(chat.paused_until),
        last_reply_at=_aware(chat.last_reply_at),
    )


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _parse_timestamp(raw: bytes) -> datetime:
    return datetime.fromisoformat(raw.decode())


sqlite3.register_adapter(datetime, lambda value: value.isoformat(sep=" "))
sqlite3.register_converter("TIMESTAMP", _parse_timestamp)
