"""The project's error hierarchy: the message says what went wrong, and what to do about it."""


class ZapkeepError(Exception):
    """Base of every error zapkeep raises on purpose."""


class ConfigError(ZapkeepError):
    """A configuration variable is missing or malformed (the message names it)."""


class SessionDocumentError(ZapkeepError):
    """A session document is malformed, corrupt or of an unknown format; nothing was changed."""


class UnreadableCredentials(SessionDocumentError):
    """A stored payload does not decrypt: its key is not configured, or it was altered or moved."""


class StoredSessionUnreadable(UnreadableCredentials):
    """Stored rows of the session do not open (altered or corrupt): the boot rolled nothing back and
    waits for an operator to restore a history version, or for the owner of the local store."""

    def __init__(self, message: str, rows: int, tables: dict[str, int]) -> None:
        super().__init__(message)
        self.rows = rows
        self.tables = tables


class SnapshotError(ZapkeepError):
    """The local whatsmeow store could not be read into a session document."""


class RestoreError(ZapkeepError):
    """A session document could not be written over the local store; the old store is untouched."""


class DiskFullError(RestoreError):
    """The disk holding DATA_DIR has no room for the new local store; nothing was changed."""


class NotFoundError(ZapkeepError):
    """No such session, snapshot or QR code."""


class SendOutcomeUnknown(ZapkeepError):
    """A send that may or may not have reached WhatsApp (no answer in time, the client ended
    mid-send). Never retried: a message goes out at most once."""


class CallTimeout(ZapkeepError):
    """WhatsApp's client gave no answer in time; its answer may still come (a send that times out
    is a ``SendOutcomeUnknown``)."""


class StateConflictError(ZapkeepError):
    """The session is not in a state that allows this (not connected, replaced, not owned...)."""


class SessionExists(StateConflictError):
    """A session with that id exists already (409)."""


class SessionLimit(StateConflictError):
    """This daemon hosts MAX_SESSIONS sessions already (409)."""


def first_line(exc: BaseException) -> str:
    """An error's headline for a log line or a status field: its first line, or its class name."""
    return first_line_of(str(exc)) or exc.__class__.__name__


def headline(error: str, limit: int = 120) -> str:
    """A Go error chain ("what: why: ...: cause") cut to what an operator reads at a glance:
    the first and the last link. The whole text belongs at DEBUG."""
    links = [link.strip() for link in first_line_of(error).split(": ") if link.strip()]
    short = links[0] if len(links) < 2 else f"{links[0]} ({links[-1]})"
    return short if len(short) <= limit else short[: limit - 1] + "…"


def first_line_of(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""
