"""The project's own small event types and the client interface the runtime drives.

``bot.connection.whatsapp`` translates neonize's events into these; the test suite's fake client emits
the same ones. Nothing here imports neonize.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, get_args


@dataclass(frozen=True)
class QrCode:
    code: str  # the raw "2@...,...,...,..." string; rotates every ~20 s


@dataclass(frozen=True)
class PairingCode:
    code: str  # typed on the phone instead of scanning a QR (PAIR_PHONE)


@dataclass(frozen=True)
class Paired:
    jid: str
    platform: str = ""


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    pass  # whatsmeow reconnects by itself after this


@dataclass(frozen=True)
class LoggedOut:
    reason: str = ""


@dataclass(frozen=True)
class StreamReplaced:
    pass


@dataclass(frozen=True)
class TemporaryBan:
    code: str
    expires_in_seconds: int


@dataclass(frozen=True)
class ConnectFailure:
    reason: str


@dataclass(frozen=True)
class KeepAliveTimeout:
    error_count: int


@dataclass(frozen=True)
class KeepAliveRestored:
    pass


@dataclass(frozen=True)
class IncomingMessage:
    message_id: str
    chat: str  # JID string, e.g. 5511999999999@s.whatsapp.net, or 123456789012345@lid
    sender: str
    push_name: str
    text: str
    from_me: bool
    is_group: bool
    timestamp: int  # unix seconds
    kind: str = "text"  # see message_kind: text, audio, image, ..., reaction, edit, revoke, protocol
    # A photo, voice note, video, document or sticker (the caption is ``text``):
    mimetype: str | None = None
    size: int | None = None  # bytes
    file_name: str | None = None  # documents
    media: str | None = None  # what whatsmeow needs to download it later (base64; holds its media key)
    # A one-to-one chat WhatsApp addresses by LID ("<lid>@lid", kept as the chat and answered there):
    # the customer's phone JID, where the message or whatsmeow's LID map tells it.
    chat_phone: str | None = None


@dataclass(frozen=True)
class Receipt:
    """The other side's phone got (or read) messages we sent: the seed systems' ACK."""

    message_ids: list[str]
    chat: str
    status: str  # "delivered" or "read" (a played voice note counts as read)
    timestamp: int  # unix seconds


# neonize's Receipt.ReceiptType names -> the status a sent message moves to; the rest (our own
# devices reading, retries, errors, history sync) say nothing about the customer.
RECEIPT_STATUSES = {"DELIVERED": "delivered", "READ": "read", "PLAYED": "read"}


def receipt_status(type_name: str) -> str | None:
    return RECEIPT_STATUSES.get(type_name)


# Never answered: they change or acknowledge another message, or carry no content for a person.
PROTOCOL_KINDS = frozenset({"reaction", "edit", "revoke", "poll_vote", "protocol"})

_CONTENT_FIELDS = (  # neonize Message fields, most specific first
    ("audioMessage", "audio"),  # voice notes (PTT) and audio files
    ("imageMessage", "image"),
    ("videoMessage", "video"),
    ("documentMessage", "document"),
    ("documentWithCaptionMessage", "document"),
    ("stickerMessage", "sticker"),
    ("lottieStickerMessage", "sticker"),
    ("locationMessage", "location"),
    ("liveLocationMessage", "location"),
    ("contactMessage", "contact"),
    ("contactsArrayMessage", "contact"),
    ("conversation", "text"),
    ("extendedTextMessage", "text"),
)
_BOOKKEEPING_FIELDS = frozenset({"senderKeyDistributionMessage", "messageContextInfo"})


def message_kind(fields: Collection[str], protocol_type: str | None = None) -> str:
    """The kind of a WhatsApp message from the names of its set Message fields (wrappers such as
    ephemeralMessage already unwrapped) and, for a protocolMessage, its type's name."""
    if "reactionMessage" in fields or "encReactionMessage" in fields:
        return "reaction"
    if "editedMessage" in fields:
        return "edit"
    if "protocolMessage" in fields:
        return {"REVOKE": "revoke", "MESSAGE_EDIT": "edit"}.get(protocol_type or "", "protocol")
    if "pollUpdateMessage" in fields:
        return "poll_vote"
    for field, kind in _CONTENT_FIELDS:
        if field in fields:
            return kind
    if any(name.startswith("pollCreationMessage") for name in fields):
        return "poll"
    return "protocol" if set(fields) <= _BOOKKEEPING_FIELDS else "other"


ClientEvent = (
    QrCode
    | PairingCode
    | Paired
    | Connected
    | Disconnected
    | LoggedOut
    | StreamReplaced
    | TemporaryBan
    | ConnectFailure
    | KeepAliveTimeout
    | KeepAliveRestored
    | IncomingMessage
    | Receipt
)
EventSink = Callable[[ClientEvent], None]

MAX_DOWNLOAD_BYTES = 64 * 2**20  # a received file crosses the client pipe as one base64 line: at most this

# The wire names, derived from the union above: an event added there crosses the pipe too.
_EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in get_args(ClientEvent)}


def to_wire(event: ClientEvent) -> dict[str, object]:
    """An event as a JSON object, for the pipe between the client process and the daemon."""
    return {"event": type(event).__name__, "fields": asdict(event)}


def from_wire(message: dict[str, object]) -> ClientEvent:
    """The inverse of ``to_wire``; ValueError for anything that is not one of these events."""
    cls = _EVENT_TYPES.get(str(message.get("event")))
    values = message.get("fields")
    if cls is None or not isinstance(values, dict):
        raise ValueError(f"not a client event: {str(message)[:80]}")
    known = {f.name for f in fields(cls)}
    if set(values) != known:
        raise ValueError(f"{cls.__name__} with fields {sorted(values)}, expected {sorted(known)}")
    return cls(**values)  # type: ignore[no-any-return]


class WhatsAppClient(Protocol):
    """One connection attempt's client. Handlers call the sink from the library's own thread."""

    def run(self) -> str | None:
        """Connect and block until the client stops; return the error that ended it, if any."""

    def stop(self) -> None:
        """Make ``run`` return. Safe from any thread, and more than once."""

    def send_text(self, to_jid: str, text: str) -> str:
        """Send a text; return its message id."""

    def logout(self) -> None:
        """Unlink this device from the phone."""

    def request_pairing_code(self, phone: str) -> str:
        """Ask for a code to type on the phone (only while ``run`` is waiting for a QR scan)."""

    def mark_read(self, chat_jid: str, sender_jid: str, message_id: str) -> None:
        """Blue ticks for a received message."""

    def set_typing(self, chat_jid: str, typing: bool) -> None:
        """Show (or stop showing) "typing…" in a chat."""

    def message_handled(self, message_id: str) -> None:
        """The daemon logged a message this client delivered: its handler may return."""

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        """Whether each phone number (digits with country code) is on WhatsApp:
        ``[{"number": ..., "on_whatsapp": bool, "jid": str | None}]``, in the order asked."""

    def download(self, media: str) -> str:
        """A received file's bytes (base64), fetched and decrypted by whatsmeow from ``media``."""

    def send_media(
        self, to_jid: str, kind: str, data: str, mimetype: str, file_name: str | None, caption: str | None
    ) -> str:
        """Upload and send a file (``kind``: image, document, audio, video; ``data``: base64); its message id."""


ClientFactory = Callable[[Path, EventSink], WhatsAppClient]
