"""Moving a session between the local whatsmeow store and the database.

The database is the source of truth and the local store a cache: at boot a stored session
is restored over the local store before neonize opens it.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bot import session_store
from bot.errors import SessionDocumentError
from bot.store_worker import Snapshot, restore_store, snapshot_store
from database import Database, Fence, SessionRecord, SessionWrite

log = logging.getLogger(__name__)


class BootOutcome(enum.Enum):
    RESTORED = "restored"  # the stored session was written over the local store
    MIGRATED = "migrated"  # no stored session; the paired local store was backed up
    PAIRING_NEEDED = "pairing_needed"  # nothing to log in with: show a QR / pairing code


@dataclass(frozen=True)
class BootResult:
    outcome: BootOutcome
    version: int | None = None
    device_jid: str | None = None


class BackupStatus(enum.Enum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"  # same checksum as the stored one: no write
    NOT_PAIRED = "not_paired"  # the store holds no device: nothing worth keeping


@dataclass(frozen=True)
class BackupResult:
    status: BackupStatus
    snapshot: Snapshot
    version: int | None
    duration_ms: float


def snapshot_to_write(session_id: str, snapshot: Snapshot) -> SessionWrite:
    return SessionWrite(
        session_id=session_id,
        document_text=snapshot.text,
        checksum=snapshot.checksum,
        device_jid=snapshot.device_jid,
        push_name=snapshot.push_name,
    )


def prepare_local_store(db: Database, session_id: str, store_path: Path, fence: Fence | None = None) -> BootResult:
    """The boot rule: restore from the DB, else migrate a paired local store up, else pair."""
    record = db.load_session(session_id)
    if record is not None:
        return _restore_newest_valid(db, record, store_path)
    if store_path.is_file():
        result = backup_session(db, session_id, store_path, fence)
        if result.status is not BackupStatus.NOT_PAIRED:
            log.info("session %s: no stored session, backed up the paired local store", session_id)
            return BootResult(BootOutcome.MIGRATED, version=result.version, device_jid=result.snapshot.device_jid)
    return BootResult(BootOutcome.PAIRING_NEEDED)


def _restore_newest_valid(db: Database, record: SessionRecord, store_path: Path) -> BootResult:
    """Restore the stored snapshot; if it is refused, the newest history entry that is not."""
    candidates = [record]
    for entry in db.list_history(record.session_id):
        if entry.checksum != record.checksum:
            older = db.load_history_version(record.session_id, entry.version)
            if older is not None:
                candidates.append(older)
    for candidate in candidates:
        try:
            restore_record(candidate, store_path)
        except SessionDocumentError as exc:
            log.error("session %s version %d refused: %s", candidate.session_id, candidate.version, exc)
            continue
        return BootResult(BootOutcome.RESTORED, version=candidate.version, device_jid=candidate.device_jid)
    raise SessionDocumentError(
        f"no stored snapshot of session {record.session_id} can be restored\n"
        "Import a good document, or delete the stored session to pair again."
    )


def restore_record(record: SessionRecord, store_path: Path) -> None:
    summary = restore_store(record.session_data, store_path)
    log.info(
        "restored session %s version %d: %d tables, %d rows, %d bytes in %.0f ms",
        record.session_id,
        record.version,
        summary.tables,
        summary.rows,
        record.size_bytes,
        summary.duration_ms,
    )


def backup_session(db: Database, session_id: str, store_path: Path, fence: Fence | None = None) -> BackupResult:
    """Snapshot the local store (in a child process) and store it unless unchanged."""
    started = time.perf_counter()
    snapshot = snapshot_store(store_path)
    if not snapshot.paired:
        return BackupResult(BackupStatus.NOT_PAIRED, snapshot, None, _ms_since(started))
    saved = db.save_session(snapshot_to_write(session_id, snapshot), fence)
    status = BackupStatus.WRITTEN if saved.written else BackupStatus.UNCHANGED
    result = BackupResult(status, snapshot, saved.version, _ms_since(started))
    if saved.written:
        log.info(
            "backed up session %s version %d: %d bytes, %d rows, checksum %s, snapshot %.0f ms, total %.0f ms",
            session_id,
            saved.version,
            snapshot.size_bytes,
            snapshot.total_rows,
            snapshot.checksum[7:19],
            snapshot.duration_ms,
            result.duration_ms,
        )
    else:
        log.debug("session %s unchanged (checksum %s): no write", session_id, snapshot.checksum[7:19])
    return result


def import_document(db: Database, session_id: str, document_text: str, fence: Fence | None = None) -> int:
    """Store a document an admin supplies, after validating all of it; returns its version."""
    document = session_store.parse_document(document_text)
    session = session_store.validate_document(document)
    if session.device_field("jid") is None:
        raise SessionDocumentError("the session document holds no paired device")
    text = session_store.canonical_json(document).decode()
    saved = db.save_session(
        SessionWrite(
            session_id=session_id,
            document_text=text,
            checksum=session.checksum,
            device_jid=session.device_field("jid"),
            push_name=session.device_field("push_name"),
        ),
        fence,
    )
    log.info(
        "imported session %s version %d: %d bytes, %d rows", session_id, saved.version, len(text), session.row_count
    )
    return saved.version


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
