"""A session's stored credentials: its head and mirrored rows, and its history of whole snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storage.core import FENCE_HOLDS, DatabaseCore, Transaction, _utcnow
from storage.records import (
    DatabaseError,
    Fence,
    KeyMoved,
    HeadWrite,
    HistoryEntry,
    MirrorBatch,
    RowChange,
    SessionMissing,
    SessionRecord,
    SessionSummary,
    SessionWrite,
    StoredForm,
    StoredRow,
    history_context,
    row_context,
)

HISTORY_KEEP = 5


class SessionQueries(DatabaseCore):
    """The session tables: whatsapp_sessions, whatsapp_session_rows, whatsapp_session_history."""

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
