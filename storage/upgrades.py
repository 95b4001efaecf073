"""Schema upgrades as numbered steps: step N brings a database from version N-1 to N.

One ordered list serves both back-ends; a step whose text differs by back-end reads the dialect
(``storage.core.Dialect``). The schema version is the number of steps: add a step at the end, never
edit one that shipped (databases out there ran it already). A fresh database runs every step, so it
has the same schema as one upgraded step by step. A database newer than this list is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from storage.core import DatabaseCore, Dialect, Transaction
from storage.records import SchemaTooNewError


@dataclass(frozen=True)
class Step:
    version: int  # the schema version this step brings a database to
    description: str
    statements: Callable[[Dialect], list[str]]


STEPS: list[Step] = []


def upgrade(description: str) -> Callable[[Callable[[Dialect], list[str]]], Callable[[Dialect], list[str]]]:
    """Append the decorated function as the next step (its statements for a dialect)."""

    def register(statements: Callable[[Dialect], list[str]]) -> Callable[[Dialect], list[str]]:
        STEPS.append(Step(len(STEPS) + 1, description, statements))
        return statements

    return register


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


@upgrade("sessions, history, leases, the message log and chats (PostgreSQL: adopts the seed's whatsapp_sessions)")
def _sessions_history_leases_messages(dialect: Dialect) -> list[str]:
    if dialect.name == "postgresql":
        sessions = [
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
        ]
    else:
        sessions = [
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
        ]
    return [*sessions, *_tables_beside_sessions(dialect.serial_key)]


@upgrade("persistence v2: a session's lineage and mirror sequence; every row of its whatsmeow store mirrored")
def _rows_table(dialect: Dialect) -> list[str]:
    """Persistence v2: every row of every session's whatsmeow store, mirrored one by one."""
    if_not_exists = "IF NOT EXISTS " if dialect.name == "postgresql" else ""
    return [
        f"ALTER TABLE whatsapp_sessions ADD COLUMN {if_not_exists}format_version INTEGER NOT NULL DEFAULT 1",
        f"ALTER TABLE whatsapp_sessions ADD COLUMN {if_not_exists}lineage TEXT",
        f"ALTER TABLE whatsapp_sessions ADD COLUMN {if_not_exists}mirror_sequence BIGINT NOT NULL DEFAULT 0",
        """CREATE TABLE whatsapp_session_rows (
            session_id VARCHAR(100) NOT NULL,
            table_name TEXT NOT NULL,
            row_key TEXT NOT NULL,
            row_data JSONB NOT NULL,
            row_hash TEXT NOT NULL,
            PRIMARY KEY (session_id, table_name, row_key)
        )""",
    ]


@upgrade("what kind each logged message is, and each chat's last reply")
def _message_kinds(dialect: Dialect) -> list[str]:
    """What kind each logged message is (text, audio, reaction...), and each chat's last reply."""
    return [
        "ALTER TABLE whatsapp_messages ADD COLUMN message_type VARCHAR(16) NOT NULL DEFAULT 'text'",
        "ALTER TABLE whatsapp_chats ADD COLUMN last_reply_reason TEXT",
        "ALTER TABLE whatsapp_chats ADD COLUMN last_reply_at TIMESTAMP",
    ]


@upgrade("the bot's settings per session, and messages found by WhatsApp's id")
def _bot_settings_and_receipts(dialect: Dialect) -> list[str]:
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


@upgrade("encryption at rest: the key each credential payload is sealed with")
def _key_ids(dialect: Dialect) -> list[str]:
    """Encryption at rest: which key each credential payload is sealed with (NULL: in clear)."""
    return [
        "ALTER TABLE whatsapp_session_rows ADD COLUMN key_id TEXT",
        "ALTER TABLE whatsapp_session_history ADD COLUMN key_id TEXT",
    ]


@upgrade("events, and what each webhook endpoint has received")
def _events(dialect: Dialect) -> list[str]:
    """Events for webhooks and the event stream, and what each webhook endpoint has received."""
    serial_key = dialect.big_serial_key
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


@upgrade("files: received ones' references, and the bytes of one waiting to be sent")
def _media(dialect: Dialect) -> list[str]:
    """Files: what a received one is and how to download it; the bytes of one waiting to be sent."""
    blob = dialect.blob
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


@upgrade("a LID chat's phone JID beside it")
def _lid_chats(dialect: Dialect) -> list[str]:
    """A chat WhatsApp addresses by LID ("<lid>@lid") stays that chat; its phone JID, once known, beside it."""
    return ["ALTER TABLE whatsapp_chats ADD COLUMN phone_jid TEXT"]


@upgrade("many sessions: the session registry and its tombstones, owners' live state, commands for owners")
def _many_sessions(dialect: Dialect) -> list[str]:
    """Many sessions in one daemon (issue 25): a session exists when registered here or stored (and
    not tombstoned); every stored session is registered, with its stored creation time. Owners
    publish their sessions' live state; a write for a session hosted elsewhere is a command."""
    utc_now = "timezone('UTC', now())" if dialect.name == "postgresql" else "CURRENT_TIMESTAMP"  # (naive UTC)
    return [
        """CREATE TABLE whatsapp_session_registry (
            session_id VARCHAR(100) PRIMARY KEY,
            created_at TIMESTAMP NOT NULL,
            pair_phone TEXT,
            rules TEXT,
            deleted_at TIMESTAMP
        )""",
        f"""INSERT INTO whatsapp_session_registry (session_id, created_at)
            SELECT session_id, COALESCE(created_at, {utc_now}) FROM whatsapp_sessions
            WHERE session_id IS NOT NULL""",
        """CREATE TABLE whatsapp_session_live (
            session_id VARCHAR(100) PRIMARY KEY,
            owner_id TEXT NOT NULL,
            state VARCHAR(32) NOT NULL,
            connected BOOLEAN NOT NULL,
            phone TEXT,
            push_name TEXT,
            last_error TEXT,
            updated_at TIMESTAMP NOT NULL
        )""",
        f"""CREATE TABLE whatsapp_session_commands (
            id {dialect.big_serial_key},
            session_id VARCHAR(100) NOT NULL,
            method VARCHAR(10) NOT NULL,
            path TEXT NOT NULL,
            query TEXT NOT NULL,
            content_type TEXT,
            body {dialect.blob} NOT NULL,
            created_at TIMESTAMP NOT NULL,
            claimed_by TEXT,
            claimed_at TIMESTAMP,
            finished_at TIMESTAMP,
            status_code INTEGER,
            answer TEXT
        )""",
        # What an owner polls (few rows: commands wait seconds), and what pruning deletes.
        """CREATE INDEX whatsapp_session_commands_waiting ON whatsapp_session_commands (session_id, id)
            WHERE claimed_by IS NULL""",
        "CREATE INDEX whatsapp_session_commands_by_finish ON whatsapp_session_commands (finished_at)",
    ]


@upgrade("instances: the processes sharing the sessions, each with a heartbeat")
def _instances(dialect: Dialect) -> list[str]:
    """Several replicas share the sessions (issue 26): each registers itself and beats, by the
    database's clock (unix seconds, as the leases), in the statement that renews its leases."""
    return [
        """CREATE TABLE whatsapp_instances (
            instance_id TEXT PRIMARY KEY,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            max_sessions INTEGER NOT NULL
        )""",
        # Every renewal finds its instance's leases by owner.
        "CREATE INDEX whatsapp_session_leases_by_owner ON whatsapp_session_leases (owner_id)",
    ]


SCHEMA_VERSION = len(STEPS)

CREATE_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS zapkeep_schema (version INTEGER NOT NULL)"
SELECT_SCHEMA_VERSION = "SELECT version FROM zapkeep_schema"
INSERT_SCHEMA_VERSION = "INSERT INTO zapkeep_schema (version) VALUES (%s)"
UPDATE_SCHEMA_VERSION = "UPDATE zapkeep_schema SET version = %s"


class SchemaUpgrades(DatabaseCore):
    """Brings the database's schema to ``SCHEMA_VERSION``: once, at boot, before anything else."""

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
            for step in STEPS[current:]:
                run_step(tx, step, self.dialect)
            tx.execute(UPDATE_SCHEMA_VERSION, (SCHEMA_VERSION,))


def run_step(tx: Transaction, step: Step, dialect: Dialect) -> None:
    for statement in step.statements(dialect):
        tx.execute(statement)
