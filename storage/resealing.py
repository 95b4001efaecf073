"""Encryption at rest: which keys a session's payloads are sealed with, and moving them all to the current one."""

from __future__ import annotations

from typing import Any

from storage.core import FENCE_HOLDS, DatabaseCore, Transaction
from storage.records import Fence, ResealCount, history_context, media_context, row_context


class ResealQueries(DatabaseCore):
    """Re-encrypting rows, history snapshots and media references, a few hundred a transaction."""

    SELECT_KEY_IDS = """
        SELECT DISTINCT key_id FROM whatsapp_session_rows WHERE session_id = %s
        UNION SELECT DISTINCT key_id FROM whatsapp_session_history WHERE session_id = %s
        UNION SELECT DISTINCT media_key_id FROM whatsapp_messages WHERE session_id = %s AND media_ref IS NOT NULL
    """

    def key_ids(self, session_id: str) -> set[str | None]:
        """The keys the session's stored credentials are sealed with (None: some are in clear)."""
        with self.transaction() as tx:
            found = tx.execute(self.SELECT_KEY_IDS, (session_id, session_id, session_id)).fetchall()
            return {row["key_id"] for row in found}

    RESEAL_BATCH = 500
    # COALESCE: in clear is key '' here, so one query serves "encrypt", "rotate" and "decrypt".
    SELECT_ROWS_TO_RESEAL = """
        SELECT table_name, row_key, CAST(row_data AS TEXT) AS row_text, row_hash, key_id
        FROM whatsapp_session_rows
        WHERE session_id = %s AND (table_name, row_key) > (%s, %s) AND COALESCE(key_id, '') <> %s
        ORDER BY table_name, row_key LIMIT %s
    """
    # Compare-and-set on the row's hash: a row the mirror changed meanwhile is left as the mirror wrote it.
    RESEAL_ROW = f"""
        UPDATE whatsapp_session_rows SET row_data = %s, key_id = %s
        WHERE session_id = %s AND table_name = %s AND row_key = %s AND row_hash = %s AND {FENCE_HOLDS}
    """
    SELECT_SNAPSHOTS_TO_RESEAL = """
        SELECT version FROM whatsapp_session_history
        WHERE session_id = %s AND COALESCE(key_id, '') <> %s ORDER BY version
    """
    SELECT_SNAPSHOT_TO_RESEAL = """
        SELECT CAST(session_data AS TEXT) AS session_data, checksum, key_id
        FROM whatsapp_session_history WHERE session_id = %s AND version = %s
    """
    RESEAL_SNAPSHOT = f"""
        UPDATE whatsapp_session_history SET session_data = %s, key_id = %s
        WHERE session_id = %s AND version = %s AND checksum = %s AND {FENCE_HOLDS}
    """

    SELECT_MEDIA_TO_RESEAL = """
        SELECT id, message_id, media_ref, media_key_id FROM whatsapp_messages
        WHERE session_id = %s AND media_ref IS NOT NULL AND COALESCE(media_key_id, '') <> %s AND id > %s
        ORDER BY id LIMIT %s
    """
    RESEAL_MEDIA = "UPDATE whatsapp_messages SET media_ref = %s, media_key_id = %s WHERE id = %s AND media_ref = %s"

    def _reseal_media(self, session_id: str, current: str) -> tuple[int, int]:
        """(resealed, unreadable) media references; the message log is not fenced, the update compares."""
        resealed = unreadable = 0
        after = 0
        while True:
            with self.transaction() as tx:
                found = tx.execute(
                    self.SELECT_MEDIA_TO_RESEAL, (session_id, current, after, self.RESEAL_BATCH)
                ).fetchall()
                for row in found:
                    context = media_context(session_id, row["message_id"])
                    try:
                        text = self.sealer.open(row["media_ref"], row["media_key_id"], context)
                    except Exception:
                        unreadable += 1
                        continue
                    params = (self.sealer.seal(text, context), self.sealer.key_id, row["id"], row["media_ref"])
                    resealed += tx.execute(self.RESEAL_MEDIA, params).rowcount
            if len(found) < self.RESEAL_BATCH:
                return resealed, unreadable
            after = found[-1]["id"]

    def _reseal_rows(
        self, tx: Transaction, session_id: str, found: list[Any], fence_params: tuple[Any, ...]
    ) -> tuple[int, int]:
        """(resealed, unreadable) of these rows; the sealer's own error, naming a row, is the restore's to tell."""
        resealed = unreadable = 0
        for row in found:
            context = row_context(session_id, row["table_name"], row["row_key"])
            try:
                text = self.sealer.open(row["row_text"], row["key_id"], context)
            except Exception:
                unreadable += 1
                continue
            params = (self.json_param(self.sealer.seal(text, context)), self.sealer.key_id, session_id)
            where = (row["table_name"], row["row_key"], row["row_hash"], *fence_params)
            resealed += tx.execute(self.RESEAL_ROW, (*params, *where)).rowcount
        return resealed, unreadable

    # The key marker first (see SELECT_KEY_MARKER), locked as it is read: from its commit on, no
    # write under a key that is being rotated out can land, so the pass below leaves nothing behind.
    SELECT_MARKER_TO_RESEAL = """
        SELECT table_name, row_key, CAST(row_data AS TEXT) AS row_text, row_hash, key_id
        FROM whatsapp_session_rows
        WHERE session_id = %s AND table_name = 'whatsmeow_device' AND COALESCE(key_id, '') <> %s
    """

    def reseal(self, session_id: str, fence: Fence | None = None) -> ResealCount:
        """Re-encrypt every stored credential payload of the session that is not under the
        current key (or, with no key, decrypt it), a few hundred rows a transaction. Safe beside a
        running mirror: only a payload's envelope changes, never its content."""
        current = self.sealer.key_id or ""
        with self.transaction() as tx:
            fence_params = self._fence_params(tx, session_id, fence)
            found = tx.execute(self.SELECT_MARKER_TO_RESEAL, (session_id, current)).fetchall()
            rows, unreadable = self._reseal_rows(tx, session_id, found, fence_params)
            if found:
                self._require_fence(tx, fence, fence_params)
        after = ("", "")
        while True:
            with self.transaction() as tx:
                fence_params = self._fence_params(tx, session_id, fence)
                found = tx.execute(
                    self.SELECT_ROWS_TO_RESEAL, (session_id, *after, current, self.RESEAL_BATCH)
                ).fetchall()
                moved, left = self._reseal_rows(tx, session_id, found, fence_params)
                rows, unreadable = rows + moved, unreadable + left
                if found:
                    self._require_fence(tx, fence, fence_params)
            if len(found) < self.RESEAL_BATCH:
                break
            after = (found[-1]["table_name"], found[-1]["row_key"])
        snapshots = 0
        with self.transaction() as tx:
            found = tx.execute(self.SELECT_SNAPSHOTS_TO_RESEAL, (session_id, current)).fetchall()
        for version in [row["version"] for row in found]:  # one a transaction: each is a whole document
            with self.transaction() as tx:
                fence_params = self._fence_params(tx, session_id, fence)
                row = tx.execute(self.SELECT_SNAPSHOT_TO_RESEAL, (session_id, version)).fetchone()
                if row is None:
                    continue  # pruned meanwhile
                context = history_context(session_id, version)
                try:
                    text = self.sealer.open(row["session_data"], row["key_id"], context)
                except Exception:
                    unreadable += 1
                    continue
                params = (self.json_param(self.sealer.seal(text, context)), self.sealer.key_id, session_id, version)
                snapshots += tx.execute(self.RESEAL_SNAPSHOT, (*params, row["checksum"], *fence_params)).rowcount
                self._require_fence(tx, fence, fence_params)
        media, unreadable_media = self._reseal_media(session_id, current)
        return ResealCount(rows, snapshots, unreadable + unreadable_media, media)
