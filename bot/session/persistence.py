"""Moving a session between the local whatsmeow store and the database.

The database holds the session; the local store is a working copy. Rows are mirrored one by one
(``bot.session.mirror``); this module holds what the mirror, the boot, the API and the CLI share: the boot
rule, a whole-store sync, the document head, full snapshots for history, import, export, restore.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from bot.session import cells, document as session_document
from bot.session.change_capture import Batch, Device, TableDef, new_lineage
from bot.process.errors import (
    NotFoundError,
    SessionDocumentError,
    StoredSessionUnreadable,
    UnreadableCredentials,
    first_line,
)
from bot.session.store_worker import StoreInfo, document_rows, inspect_store, restore_store, scan_store
from database import (
    Database,
    Fence,
    HeadWrite,
    MirrorBatch,
    RowChange,
    SessionRecord,
    SessionWrite,
    StoredForm,
    row_context,
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


@dataclass(frozen=True)
class StoredCheck:
    """What is stored, checked: the hash of every row that opens and hashes to its stored hash,
    and where the others are (table, key): altered, corrupt, or moved from another row."""

    hashes: dict[str, dict[str, str]]
    unreadable: list[tuple[str, str]]

    def known(self) -> dict[str, dict[str, str]]:
        """The hashes a whole-store comparison starts from: a row that does not open counts as
        different from anything, so the local store's row is written over it (or it is deleted)."""
        known = {table: dict(rows) for table, rows in self.hashes.items()}
        for table, key in self.unreadable:
            known.setdefault(table, {})[key] = UNREADABLE_HASH
        return known

    def tables(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for table, _ in self.unreadable:
            counts[table] = counts.get(table, 0) + 1
        return counts


UNREADABLE_HASH = "0" * 64  # (no row hashes to it: a SHA-256 of zero)


def check_stored_rows(db: Database, session_id: str, verified: dict[tuple[str, str], int] | None = None) -> StoredCheck:
    """Open every stored row and hash what it holds: a row that does not decrypt, or whose content
    is not what its stored hash says, is found here rather than at the next restore.

    ``verified`` (kept by the caller from one pass to the next) remembers each row's stored form
    that was found good: a row stored as it was then is not opened again, so a pass costs reading
    the rows, and opening only those written (or altered) since."""
    seen = {} if verified is None else verified
    good: dict[tuple[str, str], int] = {}
    hashes: dict[str, dict[str, str]] = {}
    unreadable = []
    for form in db.stored_forms(session_id):
        where = (form.table, form.key)
        fingerprint = hash((form.stored_text, form.key_id, form.row_hash))  # (salted per process)
        if seen.get(where) == fingerprint or _opens(db, session_id, form):
            good[where] = fingerprint
            hashes.setdefault(form.table, {})[form.key] = form.row_hash
        else:
            unreadable.append(where)
    seen.clear()
    seen.update(good)
    return StoredCheck(hashes, unreadable)


def _opens(db: Database, session_id: str, form: StoredForm) -> bool:
    try:
        text = db.sealer.open(form.stored_text, form.key_id, row_context(session_id, form.table, form.key))
    except Exception:  # (altered, or moved from another row: reported and repaired by the caller)
        return False
    return _holds(text, form.row_hash)


def _holds(row_text: str, row_hash: str) -> bool:
    """The row's content is what its stored hash says. Sealed rows (and clear ones on SQLite) are
    stored as the canonical text the hash is of, and are hashed as they are (a fraction of the
    cost); PostgreSQL's JSONB prints a clear row its own way, so that one is parsed first."""
    if hashlib.sha256(row_text.encode()).hexdigest() == row_hash:
        return True
    try:
        return cells.row_hash(json.loads(row_text)) == row_hash
    except (ValueError, TypeError):
        return False


# --- the document head ---------------------------------------------------------------------------


class MirroredRows:
    """The hash of every stored row (table -> key -> hash), with each table's digest kept up to
    date change by change, so the document checksum is known after every batch without a scan."""

    def __init__(self, hashes: dict[str, dict[str, str]] | None = None) -> None:
        self.hashes: dict[str, dict[str, str]] = hashes or {}
        self._digests = {table: sum(int(h, 16) for h in rows.values()) for table, rows in self.hashes.items()}

    def copy(self) -> MirroredRows:
        return MirroredRows({table: dict(rows) for table, rows in self.hashes.items()})

    def apply(self, changes: Iterable[RowChange]) -> None:
        for change in changes:
            rows = self.hashes.setdefault(change.table, {})
            old = rows.pop(change.key, None)
            digest = self._digests.get(change.table, 0) - (int(old, 16) if old else 0)
            if change.row_hash is not None:
                rows[change.key] = change.row_hash
                digest += int(change.row_hash, 16)
            self._digests[change.table] = digest

    def checksum_after(self, tables: list[TableDef], changes: Iterable[RowChange]) -> str:
        """The document checksum once ``changes`` are applied, without applying them."""
        digests = dict(self._digests)
        for change in changes:
            old = self.hashes.get(change.table, {}).get(change.key)
            digest = digests.get(change.table, 0) - (int(old, 16) if old else 0)
            digests[change.table] = digest + (int(change.row_hash, 16) if change.row_hash else 0)
        return session_document.document_checksum([(t.name, self._table_checksum(t, digests)) for t in tables])

    def count(self, table: str) -> int:
        return len(self.hashes.get(table, {}))

    def table_checksum(self, table: TableDef) -> str:
        return self._table_checksum(table, self._digests)

    @staticmethod
    def _table_checksum(table: TableDef, digests: dict[str, int]) -> str:
        digest = f"{digests.get(table.name, 0) % 2**256:064x}"
        return session_document.table_checksum_v2(table.name, table.sql, table.indexes, table.columns, digest)


def build_head(
    tables: list[TableDef], rows: MirroredRows, device: Device | None, lineage: str, sequence: int
) -> tuple[str, str, int]:
    """The head of the document the stored rows make: (JSON text, document checksum, total rows)."""
    entries = [
        {
            "name": table.name,
            "sql": table.sql,
            "indexes": table.indexes,
            "columns": table.columns,
            "row_count": rows.count(table.name),
            "checksum": rows.table_checksum(table),
        }
        for table in tables
    ]
    checksum = session_document.document_checksum([(t["name"], t["checksum"]) for t in entries])
    version_keys = list(rows.hashes.get("whatsmeow_version", {}))
    schema = version_keys[0].split(":", 1)[-1].split(",") if len(version_keys) == 1 else [None, None]
    total = sum(t["row_count"] for t in entries)
    head = {
        "format": session_document.FORMAT,
        "format_version": session_document.FORMAT_VERSION,
        "checksum": checksum,
        "lineage": lineage,
        "sequence": sequence,
        "metadata": {
            "device_jid": device.jid if device else None,
            "push_name": device.push_name if device else None,
            "platform": device.platform if device else None,
            "business_name": device.business_name if device else None,
            "whatsmeow_schema_version": _int_or_none(schema[0]),
            "whatsmeow_schema_compat": _int_or_none(schema[1]),
            "row_counts": {t["name"]: t["row_count"] for t in entries},
            "total_rows": total,
            "taken_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        },
        "tables": entries,
    }
    return json.dumps(head, separators=(",", ":"), ensure_ascii=False), checksum, total


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def row_changes(batch: Batch) -> list[RowChange]:
    return [
        RowChange(c.table, c.key, None if c.row is None else cells.canonical_json(c.row).decode(), c.hash)
        for c in batch.changes
    ]


@dataclass(frozen=True)
class StoredHead:
    """What the stored head says, to tell whether a whole-store comparison has anything to write."""

    checksum: str
    lineage: str | None

    @staticmethod
    def of(record: SessionRecord | None) -> StoredHead | None:
        if record is None or record.format_version != 2:
            return None
        return StoredHead(record.checksum, record.lineage)


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
