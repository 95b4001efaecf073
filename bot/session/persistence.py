"""Moving a session between the local whatsmeow store and the database.

The database holds the session; the local store is a working copy. Rows are mirrored one by one
(``bot.session.mirror``); this module holds what the mirror, the boot, the API and the CLI share: the boot
rule, a whole-store sync, full snapshots for history, import, export, restore. The document head and
the check of stored rows that do not open are in ``bot.session.stored``.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from bot.session import cells, document as session_document
from bot.session.change_capture import Batch, Device, new_lineage
from bot.process.errors import (
    NotFoundError,
    SessionDocumentError,
    StoredSessionUnreadable,
    UnreadableCredentials,
    first_line,
)
from bot.session.store_worker import StoreInfo, document_rows, inspect_store, restore_store, scan_store
from bot.session.stored import MirroredRows, StoredHead, build_head, check_stored_rows, row_changes
from database import (
    Database,
    Fence,
    HeadWrite,
    MirrorBatch,
    RowChange,
    SessionRecord,
    SessionWrite,
)

log = logging.getLogger("bot.persistence")  # pinned: the name operators see in log lines


class BootOutcome(enum.Enum):
    RESTORED = "restored"  # the stored session was written over the local store
    KEPT = "kept"  # the local store descends from the stored session: its unsaved changes go up
    MIGRATED = "migrated"  # no stored session; the paired local store is being backed up
    PAIRING_NEEDED = "pairing_needed"  # nothing to log in with: show a QR / pairing code


@dataclass(frozen=True)
class BootResult:
    outcome: BootOutcome
    record: SessionRecord | None = None  # the stored session as the boot found (or rebuilt) it
    device_jid: str | None = None


@dataclass(frozen=True)
class SyncResult:
    """A whole-store comparison with the database and the writes that made them equal."""

    paired: bool
    written_rows: int
    missed: int  # rows that differed although change capture had logged nothing for them
    sequence: int
    checksum: str | None
    device_jid: str | None
    push_name: str | None
    total_rows: int
    duration_ms: float
    unreadable: int = 0  # stored rows that did not open (altered or corrupt), rewritten from the local store


def write_scan(
    db: Database, session_id: str, batch: Batch, rows: MirroredRows, fence: Fence | None, stored: StoredHead | None
) -> SyncResult:
    """Write a whole-store comparison (``rows`` is updated to what is then stored). Nothing is
    written when nothing differs."""
    started = time.perf_counter()
    device = batch.device
    if device is None or device.jid is None:
        return SyncResult(False, 0, 0, batch.sequence, None, None, None, 0, _ms_since(started))
    changes = row_changes(batch)
    after = rows.copy()
    after.apply(changes)
    head_text, checksum, total = build_head(batch.tables or [], after, device, batch.lineage, batch.sequence)
    if not changes and stored is not None and (stored.checksum, stored.lineage) == (checksum, batch.lineage):
        return SyncResult(True, 0, 0, batch.sequence, checksum, device.jid, device.push_name, total, _ms_since(started))
    # The whole document's size is known once it is assembled (a history snapshot); 0 keeps what is stored.
    head = HeadWrite(session_id, head_text, checksum, 0, device.jid, device.push_name, batch.lineage)
    db.write_batch(MirrorBatch(session_id, batch.sequence, changes, head), fence)
    rows.apply(changes)
    return SyncResult(
        True,
        len(changes),
        batch.missed if stored is not None else 0,  # a first sync misses nothing: it is the start
        batch.sequence,
        checksum,
        device.jid,
        device.push_name,
        total,
        _ms_since(started),
    )


def sync_session(db: Database, session_id: str, store_path: Path, fence: Fence | None = None) -> SyncResult:
    """Compare the whole local store with the stored rows (in a child process) and write the difference."""
    record = db.load_session(session_id)
    rows = MirroredRows(db.row_hashes(session_id) if StoredHead.of(record) else {})
    after = record.mirror_sequence if record is not None else 0
    batch = scan_store(store_path, after, rows.hashes)
    result = write_scan(db, session_id, batch, rows, fence, StoredHead.of(record))
    if result.paired and result.written_rows:
        log.info(
            "session %s synced: %d rows written (%d total), sequence %d, checksum %s, %.0f ms",
            session_id,
            result.written_rows,
            result.total_rows,
            result.sequence,
            (result.checksum or "")[7:19],
            result.duration_ms,
        )
    return result


# --- whole documents: export, history, import ---------------------------------------------------------


def assemble_document(record: SessionRecord, rows: Iterable[tuple[str, str, str]]) -> str:
    """The complete, checksummed document from a stored head and its rows ``(table, JSON text, hash)``.

    Counts and checksums come from the rows themselves (the head's are as of its last rewrite); the
    rows are spliced in as text, so megabytes of them are never parsed and encoded again."""
    head = json.loads(record.session_data)
    texts: dict[str, list[str]] = {}
    hashes: dict[str, list[str]] = {}
    for table, row_text, row_hash in rows:
        texts.setdefault(table, []).append(row_text)
        hashes.setdefault(table, []).append(row_hash)
    parts, checksums = [], []
    for table in head["tables"]:
        name = table["name"]
        digest = session_document.rows_digest(hashes.get(name, []))
        entry = {
            "name": name,
            "sql": table["sql"],
            "indexes": table["indexes"],
            "columns": table["columns"],
            "row_count": len(texts.get(name, [])),
            "checksum": session_document.table_checksum_v2(
                name, table["sql"], table["indexes"], table["columns"], digest
            ),
        }
        checksums.append((name, entry["checksum"]))
        opening = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)[:-1]
        parts.append(opening + ',"rows":[' + ",".join(texts.get(name, [])) + "]}")
    metadata = {
        **head.get("metadata", {}),
        "row_counts": {name: len(texts.get(name, [])) for name, _ in checksums},
        "total_rows": sum(len(texts.get(name, [])) for name, _ in checksums),
        "device_jid": record.device_jid,
        "push_name": record.push_name,
    }
    top = {
        "format": session_document.FORMAT,
        "format_version": session_document.FORMAT_VERSION,
        "checksum": session_document.document_checksum(checksums),
        "lineage": record.lineage,
        "sequence": record.mirror_sequence,
        "metadata": metadata,
    }
    return json.dumps(top, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"tables":[' + ",".join(parts) + "]}"


def current_document(
    db: Database, session_id: str, record: SessionRecord | None = None
) -> tuple[SessionRecord, str] | None:
    """The stored session as one portable document (a format 1 row is already one). The head and
    the rows are read as of one moment, as the mirror may be writing."""
    if record is not None and record.format_version == 1:
        return record, record.session_data
    found = db.load_session_and_rows(session_id)
    if found is None:
        return None
    record, stored = found
    if record.format_version == 1:
        return record, record.session_data
    return record, assemble_document(record, ((r.table, r.row_text, r.row_hash) for r in stored))


def export_document(db: Database, session_id: str, version: int | None = None) -> tuple[SessionRecord, str]:
    if version is not None:
        record = db.load_history_version(session_id, version)
        if record is None:
            raise NotFoundError(f"no stored snapshot of session {session_id} with version {version}")
        return record, record.session_data
    found = current_document(db, session_id)
    if found is None:
        raise NotFoundError(f"no stored session {session_id}")
    return found


def snapshot_to_history(
    db: Database, session_id: str, fence: Fence | None, reason: str, *, unless_newer_than: float | None = None
) -> int | None:
    """Keep the stored session as a full snapshot in history, unless the newest one is the same
    (or, with ``unless_newer_than``, was taken fewer than that many seconds ago)."""
    record = db.load_session(session_id)
    if record is None:
        return None
    newest = db.list_history(session_id)
    if newest and record.format_version == 2 and newest[0].checksum == record.checksum:
        return None  # decided before assembling megabytes
    if newest and unless_newer_than is not None:
        age = (datetime.now(UTC) - newest[0].taken_at.replace(tzinfo=UTC)).total_seconds()
        if age < unless_newer_than:
            return None
    _, text = current_document(db, session_id, record)
    checksum = _checksum_of(text)
    if newest and newest[0].checksum == checksum:
        return None
    version = db.save_history(SessionWrite(session_id, text, checksum, record.device_jid, record.push_name), fence)
    log.info("session %s: %s snapshot kept as history version %d (%d bytes)", session_id, reason, version, len(text))
    return version


def _checksum_of(text: str) -> str:
    return str(session_document.parse_document(text).get("checksum", ""))


def make_current(
    db: Database,
    session_id: str,
    document_text: str,
    fence: Fence | None,
    *,
    sequence: int = 0,
    snapshot_reason: str | None = None,
    lineage: str | None = None,
) -> tuple[session_document.DecodedSession, str]:
    """Validate a document (format 1 or 2) and make it the stored session, with a new lineage
    (``lineage``, when the local store was built with it already). Returns the decoded session
    and the lineage."""
    document = session_document.parse_document(document_text)
    session = session_document.validate_document(document)
    if session.device_field("jid") is None:
        raise SessionDocumentError("the session document holds no paired device")
    tables, keyed = document_rows(document_text)
    changes = [RowChange(t, k, cells.canonical_json(r).decode(), h) for t, k, r, h in keyed]
    rows = MirroredRows()
    rows.apply(changes)
    lineage = lineage or new_lineage()
    device = Device(
        session.device_field("jid"),
        session.device_field("push_name"),
        session.device_field("platform"),
        session.device_field("business_name"),
    )
    head_text, checksum, _ = build_head(tables, rows, device, lineage, sequence)
    head = HeadWrite(
        session_id, head_text, checksum, len(document_text.encode()), device.jid, device.push_name, lineage
    )
    if snapshot_reason is not None:  # only once the document is known good: a refused one changes nothing
        snapshot_to_history(db, session_id, fence, snapshot_reason)
    db.replace_session(head, changes, sequence, fence)
    return session, lineage


def import_document(db: Database, session_id: str, document_text: str, fence: Fence | None = None) -> int:
    """Store a document an admin supplies, after validating all of it; returns its history version."""
    session, _ = make_current(db, session_id, document_text, fence, snapshot_reason="before-import")
    version = snapshot_to_history(db, session_id, fence, "import")
    if version is None:
        version = db.list_history(session_id)[0].version
    log.info("imported session %s as version %d: %d rows", session_id, version, session.row_count)
    return version


# --- boot and restore ---------------------------------------------------------------------------------


def descends_from(info: StoreInfo | None, record: SessionRecord) -> bool:
    """The local store is the one that produced what is stored, and has seen at least as much."""
    return (
        info is not None
        and info.device_jid is not None
        and record.format_version == 2
        and info.lineage is not None
        and info.lineage == record.lineage
        and info.sequence >= record.mirror_sequence
    )


def prepare_local_store(db: Database, session_id: str, store_path: Path, fence: Fence | None = None) -> BootResult:
    """The boot rule: keep a local store that descends from the stored session (its unsaved changes
    are pushed, never overwritten), else restore the stored session, else back up a paired local
    store, else pair."""
    record = db.load_session(session_id)
    info = inspect_store(store_path)
    if record is not None:
        if descends_from(info, record):
            assert info is not None
            log.info(
                "session %s: the local store descends from the stored session (change %d >= %d): keeping it",
                session_id,
                info.sequence,
                record.mirror_sequence,
            )
            return BootResult(BootOutcome.KEPT, record, info.device_jid)
        return _restore_newest_valid(db, record, store_path, fence)
    if info is not None and info.device_jid is not None:
        log.info("session %s: no stored session; backing up the paired local store", session_id)
        return BootResult(BootOutcome.MIGRATED, None, info.device_jid)
    return BootResult(BootOutcome.PAIRING_NEEDED)


def _restore_newest_valid(db: Database, record: SessionRecord, store_path: Path, fence: Fence | None) -> BootResult:
    """Restore the stored session; if it is refused for its content, the newest history entry that
    is not (which then becomes the stored session; older documents are read only when needed).
    Stored rows that do not open (altered or corrupt) are never rolled back over: StoredSessionUnreadable."""
    session_id = record.session_id
    try:
        found = current_document(db, session_id, record)  # a row that does not decrypt is refused here
        assert found is not None
        lineage = new_lineage()  # (the restore validates the document: never twice in the common case)
        restore_document(
            session_id, record.version, found[1], store_path, lineage=lineage, sequence=record.mirror_sequence
        )
        # Only once the document restored: a refused one leaves the stored lineage alone, so the
        # host whose local store descends from it can still come back and repair what is stored.
        db.set_lineage(session_id, lineage, record.mirror_sequence, fence)
        return BootResult(BootOutcome.RESTORED, replace(record, lineage=lineage), record.device_jid)
    except SessionDocumentError as exc:
        # Rows that do not open (they do not decrypt, or their content is not their hash): rolling
        # back to a snapshot would silently drop everything mirrored since it, and the owner's local
        # store (on a host that may come back) still holds them.
        check = check_stored_rows(db, session_id)
        if isinstance(exc, UnreadableCredentials) or check.unreadable:
            raise StoredSessionUnreadable(
                f"session {session_id}: {max(1, len(check.unreadable))} stored rows do not open "
                f"({first_line(exc)}); nothing was rolled back\n"
                'Restore a history version on purpose (POST /api/session/restore with {"version": N}), import '
                "a document, or stop this instance and start the host that still has the session's local store: "
                "its owner repairs the rows.",
                len(check.unreadable),
                check.tables(),
            ) from None
        log.error("session %s version %d refused: %s", session_id, record.version, exc)
        refused = record.checksum  # a document refused for its content is refused again under its checksum
    for entry in db.list_history(session_id):
        if entry.checksum == refused:
            continue
        try:
            older = db.load_history_version(session_id, entry.version)
            if older is None:
                continue  # pruned meanwhile
            log.warning("session %s: rolling back to history version %d", session_id, entry.version)
            _, lineage = make_current(db, session_id, older.session_data, fence)
            restore_document(session_id, entry.version, older.session_data, store_path, lineage=lineage, sequence=0)
        except SessionDocumentError as exc:
            log.error("session %s version %d refused: %s", session_id, entry.version, exc)
            continue
        return BootResult(BootOutcome.RESTORED, db.load_session(session_id), record.device_jid)
    raise SessionDocumentError(
        f"no stored snapshot of session {session_id} can be restored\n"
        "Import a good document, or delete the stored session to pair again."
    )


def restore_document(
    session_id: str, version: int, document_text: str, store_path: Path, *, lineage: str, sequence: int
) -> None:
    summary = restore_store(document_text, store_path, lineage=lineage, sequence=sequence)
    log.info(
        "restored session %s version %d: %d tables, %d rows, %d bytes in %.0f ms",
        session_id,
        version,
        summary.tables,
        summary.rows,
        len(document_text),
        summary.duration_ms,
    )


def restore_record(db: Database, record: SessionRecord, store_path: Path, fence: Fence | None = None) -> None:
    """Operator restore (daemon stopped): the chosen snapshot becomes the stored session and the local store."""
    text = record.session_data
    if record.format_version == 2:
        found = current_document(db, record.session_id, record)
        assert found is not None
        text = found[1]
        lineage = new_lineage()
        db.set_lineage(record.session_id, lineage, record.mirror_sequence, fence)
        sequence = record.mirror_sequence
    else:
        _, lineage = make_current(db, record.session_id, text, fence, snapshot_reason="before-restore")
        sequence = 0
    restore_document(record.session_id, record.version, text, store_path, lineage=lineage, sequence=sequence)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
