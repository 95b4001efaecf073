"""What is stored of a session, checked and summed: the check of stored rows that do not open
(altered, corrupt or moved), and the document head built from the stored rows' hashes.

Shared by the mirror (``bot.session.mirror``) and the boot, sync, import and restore
(``bot.session.persistence``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.session import cells, document as session_document
from bot.session.change_capture import Batch, Device, TableDef
from database import Database, RowChange, SessionRecord, StoredForm, row_context


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
