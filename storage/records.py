"""What crosses the storage boundary: the records (frozen dataclasses), the errors, the payload
sealer's contract and the event type names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


# The event types (webhooks, /api/events): defined here once, where the events are written.
MESSAGE_RECEIVED = "message.received"
MESSAGE_SENT = "message.sent"
MESSAGE_STATUS = "message.status"
CHAT_HANDOFF = "chat.handoff"
CHAT_RELEASED = "chat.released"
SESSION_STATE = "session.state"
BACKUP_FAILED = "backup.failed"
SESSION_CORRUPT = "session.corrupt"
EVENT_TYPES = (
    MESSAGE_RECEIVED,
    MESSAGE_SENT,
    MESSAGE_STATUS,
    CHAT_HANDOFF,
    CHAT_RELEASED,
    SESSION_STATE,
    BACKUP_FAILED,
    SESSION_CORRUPT,
)


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


# --- many sessions in one daemon (issue 25): the registry, owners' live state, commands ---


@dataclass(frozen=True)
class RegisteredSession:
    """A session's registry row: created over the API (or at a first boot), or stored by an older
    release (then only ``created_at`` is known). ``deleted_at`` set: tombstoned, gone for good
    until created again."""

    session_id: str
    created_at: datetime
    pair_phone: str | None
    rules: str | None  # the session's own chatbot rules (a path under the rules directory); None: the shared file
    deleted_at: datetime | None


@dataclass(frozen=True)
class LiveState:
    """What the owner of a session publishes about it, for every instance's reads."""

    session_id: str
    owner_id: str
    state: str
    connected: bool
    phone: str | None
    push_name: str | None
    last_error: str | None
    updated_at: datetime | None = None  # by the database's clock; set when read, ignored when published


@dataclass(frozen=True)
class CommandRequest:
    """An API request for a session hosted by another instance, replayed there by its owner."""

    method: str
    path: str
    query: str  # the raw query string, without "?"
    content_type: str | None
    body: bytes


@dataclass(frozen=True)
class Command:
    """A durable command: the request, who claimed it, and its answer once finished."""

    id: int
    session_id: str
    method: str
    path: str
    query: str
    content_type: str | None
    body: bytes
    created_at: datetime
    claimed_by: str | None  # the owner id that took it; None: waiting
    claimed_at: datetime | None
    finished_at: datetime | None
    status_code: int | None
    answer: dict | None  # the JSON answer, decoded

    @property
    def request(self) -> CommandRequest:
        return CommandRequest(self.method, self.path, self.query, self.content_type, self.body)


@dataclass(frozen=True)
class SessionOverview:
    """One existing session as ``GET /api/sessions`` lists it, from any instance."""

    session_id: str
    state: str  # the live owner's state; "not_running" when no instance holds its lease
    connected: bool
    phone: str | None
    push_name: str | None
    owner: str | None  # the instance id holding an unexpired lease
    last_mirrored_at: datetime | None  # whatsapp_sessions.updated_at; None: never stored
    last_error: str | None
    lease_expires_in_seconds: float | None  # by the database's clock; None: never leased
    device_jid: str | None = None  # the stored device's JID (its phone when nothing was published)


@dataclass(frozen=True)
class InstanceInfo:
    """A live process sharing the sessions (issue 26), by the database's clock."""

    instance_id: str  # host/deployment/pid, also the owner id of its leases
    started_at: float  # unix seconds
    heartbeat_age_seconds: float  # since its last heartbeat
    max_sessions: int  # its MAX_SESSIONS
    sessions_owned: int  # leases it holds now
