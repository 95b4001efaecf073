"""The outbox: queued messages (and the files waiting with them) until sent, failed or expired, and
the status of our sent messages as receipts move it (sent -> delivered -> read)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from storage.core import Transaction, _aware, _naive
from storage.messages import MessageQueries
from storage.records import MESSAGE_SENT, MESSAGE_STATUS, OutgoingFile, OutgoingMessage


class OutboxQueries(MessageQueries):  # (an outgoing message is a row of the message log)
    """Outgoing messages: enqueued, claimed, marked sent/retried/failed, each move an event."""

    INSERT_OUTGOING_FILE = (
        "INSERT INTO whatsapp_outgoing_files (message_id, data, mimetype, file_name) VALUES (%s, %s, %s, %s)"
    )
    SELECT_OUTGOING_FILE = """
        SELECT m.message_type AS kind, f.data, f.mimetype, f.file_name
        FROM whatsapp_outgoing_files f JOIN whatsapp_messages m ON m.id = f.message_id WHERE f.message_id = %s
    """
    DELETE_OUTGOING_FILE = "DELETE FROM whatsapp_outgoing_files WHERE message_id = %s"

    def enqueue_outgoing(
        self,
        session_id: str,
        chat_jid: str,
        text: str,
        *,
        reason: str,
        expires_at: datetime | None,
        now: datetime,
        file: OutgoingFile | None = None,
    ) -> int:
        """A message to send (``text`` is a file's caption); the file is kept with it until it is sent."""
        with self.transaction() as tx:
            message_id = self._insert_message(
                tx,
                session_id=session_id,
                chat_jid=chat_jid,
                direction="out",
                text=text,
                status="queued",
                reason=reason,
                created_at=now,
                next_attempt_at=now,
                expires_at=expires_at,
                message_type=file.kind if file else "text",
                mimetype=file.mimetype if file else None,
                media_size=len(file.data) if file else None,
                file_name=file.file_name if file else None,
            )
            assert message_id is not None  # no dedupe key: never a conflict
            if file is not None:
                tx.execute(self.INSERT_OUTGOING_FILE, (message_id, file.data, file.mimetype, file.file_name))
        return message_id

    def outgoing_file(self, message_id: int) -> OutgoingFile | None:
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_OUTGOING_FILE, (message_id,)).fetchone()
        return None if row is None else OutgoingFile(row["kind"], bytes(row["data"]), row["mimetype"], row["file_name"])

    SELECT_QUEUED = """
        SELECT id, chat_jid, text, attempts, next_attempt_at, expires_at, message_type FROM whatsapp_messages
        WHERE session_id = %s AND status = 'queued' ORDER BY id LIMIT %s
    """

    def queued_outgoing(self, session_id: str, limit: int = 200) -> list[OutgoingMessage]:
        """Queued messages, oldest first (the caller keeps each chat in order)."""
        with self.transaction() as tx:
            rows = tx.all(OutgoingMessage, self.SELECT_QUEUED, (session_id, limit))
        return [replace(r, next_attempt_at=_aware(r.next_attempt_at), expires_at=_aware(r.expires_at)) for r in rows]

    OUTBOX_WAITING = """
        SELECT COUNT(*) FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending')
    """
    # (the column itself, not MIN(): SQLite types an aggregate's result as text)
    OUTBOX_OLDEST = """
        SELECT created_at FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending') ORDER BY id LIMIT 1
    """

    def outbox_depth(self, session_id: str) -> tuple[int, datetime | None]:
        """How many outgoing messages wait (queued or being sent), and since when the oldest has."""
        with self.transaction() as tx:
            waiting = int(tx.scalar(self.OUTBOX_WAITING, (session_id,)))
            oldest = tx.scalar(self.OUTBOX_OLDEST, (session_id,))
        return waiting, _aware(oldest)

    CLAIM_OUTGOING = (
        "UPDATE whatsapp_messages SET status = 'sending', attempts = attempts + 1 WHERE id = %s AND status = 'queued'"
    )
    MARK_SENT = """
        UPDATE whatsapp_messages SET status = 'sent', message_id = %s, sent_at = %s, last_error = NULL WHERE id = %s
        RETURNING id, session_id, chat_jid, message_id, text, reason, message_type
    """
    MARK_RETRY = "UPDATE whatsapp_messages SET status = 'queued', last_error = %s, next_attempt_at = %s WHERE id = %s"
    MARK_UNSENT = "UPDATE whatsapp_messages SET status = 'queued', attempts = attempts - 1 WHERE id = %s"
    MARK_FAILED = """
        UPDATE whatsapp_messages SET status = 'failed', last_error = %s WHERE id = %s
        RETURNING id, session_id, chat_jid, message_id, last_error
    """

    def claim_outgoing(self, message_id: int) -> bool:
        """Mark a message as being sent; a crash from here on never sends it twice."""
        with self.transaction() as tx:
            return tx.execute(self.CLAIM_OUTGOING, (message_id,)).rowcount == 1

    def mark_sent(self, message_id: int, whatsapp_id: str, at: datetime) -> None:
        with self.transaction() as tx:
            tx.execute(self.DELETE_OUTGOING_FILE, (message_id,))  # sent: its bytes are WhatsApp's now
            for row in tx.execute(self.MARK_SENT, (whatsapp_id, _naive(at), message_id)).fetchall():
                payload = {
                    "id": row["id"],
                    "chat": row["chat_jid"],
                    "whatsapp_id": row["message_id"],
                    "direction": "out",
                    "type": row["message_type"],
                    "text": row["text"],
                    "status": "sent",
                    "reason": row["reason"],
                    "at": at,
                }
                self._event(tx, row["session_id"], MESSAGE_SENT, row["chat_jid"], payload)

    def mark_retry(self, message_id: int, error: str, next_attempt_at: datetime) -> None:
        with self.transaction() as tx:
            tx.execute(self.MARK_RETRY, (error, _naive(next_attempt_at), message_id))

    def mark_unsent(self, message_id: int) -> None:
        """Back to the queue without counting an attempt (nothing reached WhatsApp)."""
        with self.transaction() as tx:
            tx.execute(self.MARK_UNSENT, (message_id,))

    def mark_failed(self, message_id: int, error: str) -> None:
        with self.transaction() as tx:
            self._status_events(tx, tx.execute(self.MARK_FAILED, (error, message_id)).fetchall(), "failed")

    def _status_events(self, tx: Transaction, rows: list[Any], status: str) -> int:
        """A message.status event for each of our messages whose status moved (rows of a RETURNING)."""
        for row in rows:
            if status == "failed":
                tx.execute(self.DELETE_OUTGOING_FILE, (row["id"],))  # never sent: nothing will need it
            payload = {"id": row["id"], "chat": row["chat_jid"], "whatsapp_id": row["message_id"], "status": status}
            if row.get("last_error"):
                payload["error"] = row["last_error"]
            self._event(tx, row["session_id"], MESSAGE_STATUS, row["chat_jid"], payload)
        return len(rows)

    FAIL_EXPIRED = """
        UPDATE whatsapp_messages SET status = 'failed', last_error = 'expired before it could be sent'
        WHERE session_id = %s AND status = 'queued' AND expires_at IS NOT NULL AND expires_at <= %s
        RETURNING id, session_id, chat_jid, message_id, last_error
    """
    FAIL_INTERRUPTED = """
        UPDATE whatsapp_messages SET status = 'failed',
            last_error = 'interrupted while sending; not retried, so that it is never sent twice'
        WHERE session_id = %s AND status = 'sending'
        RETURNING id, session_id, chat_jid, message_id, last_error
    """

    def fail_expired(self, session_id: str, now: datetime) -> int:
        with self.transaction() as tx:
            return self._status_events(
                tx, tx.execute(self.FAIL_EXPIRED, (session_id, _naive(now))).fetchall(), "failed"
            )

    def fail_interrupted(self, session_id: str) -> int:
        with self.transaction() as tx:
            return self._status_events(tx, tx.execute(self.FAIL_INTERRUPTED, (session_id,)).fetchall(), "failed")

    # Receipts only move a sent message forward: sent -> delivered -> read.
    MARK_RECEIPT = {
        "delivered": """UPDATE whatsapp_messages SET status = 'delivered'
            WHERE session_id = %s AND direction = 'out' AND message_id = %s AND status = 'sent'
            RETURNING id, session_id, chat_jid, message_id""",
        "read": """UPDATE whatsapp_messages SET status = 'read'
            WHERE session_id = %s AND direction = 'out' AND message_id = %s AND status IN ('sent', 'delivered')
            RETURNING id, session_id, chat_jid, message_id""",
    }

    def mark_receipts(self, session_id: str, message_ids: list[str], status: str) -> int:
        """How many of our sent messages moved to ``status`` ("delivered" or "read")."""
        moved = 0
        with self.transaction() as tx:
            for message_id in message_ids:
                rows = tx.execute(self.MARK_RECEIPT[status], (session_id, message_id)).fetchall()
                moved += self._status_events(tx, rows, status)
        return moved
