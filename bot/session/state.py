"""What a session is doing, as the status route, /readyz and the runtime's parts see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime


class State(str, enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"
    CONNECTING = "connecting"
    QR = "qr"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    LOGGED_OUT = "logged_out"
    REPLACED = "replaced"
    DISCONNECTED = "disconnected"  # an operator stopped the client (POST /api/session/stop); still paired
    RESTORE_NEEDED = "restore_needed"  # stored rows do not open: nothing rolled back, an operator decides
    STOPPED = "stopped"


class StandbyCause(str, enum.Enum):
    """Why a standby daemon does not hold the lease: only one of them is another instance."""

    LOST = "lost"  # just given up (a write was refused, a take-over failed); asking again
    HELD_ELSEWHERE = "held_elsewhere"  # another instance holds it
    NOT_RENEWED = "not_renewed"  # this instance could not renew it in time (the database did not answer)
    OWN_LEASE = "own_lease"  # this instance's previous lease, given up, has not run out yet
    DATABASE = "database"  # the database did not answer the request for the lease


# States in which the local store holds this process's live session, worth backing up.
BACKUP_STATES = frozenset({State.CONNECTING, State.QR, State.CONNECTED, State.RECONNECTING, State.DISCONNECTED})
HISTORY_STATES = BACKUP_STATES | {State.LOGGED_OUT}

# Fixed sentences only: /readyz needs no token, and error texts can quote what they failed on.
_NOT_READY_BECAUSE = {
    State.CONNECTED: None,
    State.STARTING: "starting: restoring the stored session",
    State.STANDBY: "standby: another instance holds session {session_id}",  # (see _STANDBY_BECAUSE)
    State.CONNECTING: "connecting to WhatsApp",
    State.RECONNECTING: "reconnecting to WhatsApp (the last error is in /api/session/status)",
    State.QR: "not linked: scan the QR code (GET /api/session/qr) or request a pairing code",
    State.LOGGED_OUT: "logged out: the device was unlinked; pairing again",
    State.REPLACED: "replaced: another client took over this session's stream; POST /api/session/reconnect takes it back",
    State.DISCONNECTED: "disconnected by an operator: POST /api/session/start connects again",
    State.RESTORE_NEEDED: (
        "the stored session does not open (stored rows altered or corrupt) and nothing was rolled back: "
        'restore a history version on purpose (POST /api/session/restore with {{"version": N}}; the versions '
        "are in GET /api/session/status), import a document, or stop this instance and start the host that "
        "still has the session's local store"
    ),
    State.STOPPED: "shutting down",
}

_STANDBY_BECAUSE = {
    StandbyCause.LOST: "standby: this instance lost the lease of session {session_id}; taking it again when it is free",
    StandbyCause.HELD_ELSEWHERE: "standby: another instance holds session {session_id}",
    StandbyCause.NOT_RENEWED: (
        "standby: this instance could not renew its lease of session {session_id} in time (the database did not "
        "answer); it takes the session again once it can"
    ),
    StandbyCause.OWN_LEASE: (
        "standby: this instance's previous lease of session {session_id} has not run out yet; "
        "it takes the session again then"
    ),
    StandbyCause.DATABASE: "standby: the database does not answer, so the lease of session {session_id} cannot be taken",
}


@dataclass(frozen=True)
class SessionStatus:
    session_id: str
    state: str
    connected: bool
    jid: str | None
    phone: str | None
    push_name: str | None
    last_error: str | None
    reconnect_count: int
    connected_since: datetime | None
    started_at: datetime
    uptime_seconds: float
    last_backup_at: datetime | None
    last_backup_size: int | None
    last_backup_checksum: str | None
    last_backup_version: int | None
    last_backup_error: str | None
    qr_available: bool
    pairing_code: str | None
    next_retry_in_seconds: float | None
    owner_id: str
    owns_session: bool
    fencing_token: int | None
    handover_seconds: float | None  # how long this daemon waited in standby before it took over
    boot_error: str | None = None  # why the stored session was refused at boot, until that is resolved
    mirror_running: bool = False
    mirror_sequence: int = 0  # the store's change sequence the database holds
    last_mirrored_at: datetime | None = None
    mirror_pending_changes: int = 0
    last_reconcile_at: datetime | None = None
    last_reconcile_result: str | None = None
    qr_expires_at: datetime | None = None  # while a QR code is shown: when whatsmeow replaces it
    unreadable_rows: int = 0  # stored rows found not to open (altered or corrupt) since this process started
    last_unreadable_at: datetime | None = None
    standby_cause: str | None = None  # in standby: why (a StandbyCause)
    database_unreachable_since: datetime | None = None  # the first call that could not reach it, until one does

    @classmethod
    def initial(cls, session_id: str) -> SessionStatus:
        return cls(
            session_id=session_id,
            state=State.STARTING.value,
            connected=False,
            jid=None,
            phone=None,
            push_name=None,
            last_error=None,
            reconnect_count=0,
            connected_since=None,
            started_at=now(),
            uptime_seconds=0.0,
            last_backup_at=None,
            last_backup_size=None,
            last_backup_checksum=None,
            last_backup_version=None,
            last_backup_error=None,
            qr_available=False,
            pairing_code=None,
            next_retry_in_seconds=None,
            owner_id="",
            owns_session=False,
            fencing_token=None,
            handover_seconds=None,
        )


@dataclass(frozen=True)
class Readiness:
    """Whether customers are being served, and if not, why and what a person can do."""

    ready: bool
    state: str
    reason: str | None


def readiness_of(status: SessionStatus) -> Readiness:
    """Serving customers only when connected; otherwise the reason, in words a person can act on."""
    state = State(status.state)
    if status.database_unreachable_since is not None and state is not State.STOPPED:
        # Whatever the state says, replies, the mirror and the lease wait for the database.
        since = status.database_unreachable_since.isoformat(timespec="seconds")
        reason = f"database unreachable since {since}: replies, backups and the lease wait for it"
        return Readiness(ready=False, state=state.value, reason=reason)
    reason = _NOT_READY_BECAUSE[state]
    if state is State.STANDBY and status.standby_cause is not None:
        reason = _STANDBY_BECAUSE[StandbyCause(status.standby_cause)]
    if reason is not None:
        reason = reason.format(session_id=status.session_id)
        if status.boot_error and state is not State.RESTORE_NEEDED:  # (the details need the token: the status)
            reason = f"{reason}; the stored session was refused at boot"
    return Readiness(ready=state is State.CONNECTED, state=state.value, reason=reason)


def phone_of(jid: str | None) -> str | None:
    """The number of a device JID ("5511999999999:12@s.whatsapp.net" -> "5511999999999")."""
    if not jid:
        return None
    return jid.split("@", 1)[0].split(":", 1)[0].split(".", 1)[0]


def now() -> datetime:
    return datetime.now(UTC)
