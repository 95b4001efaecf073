"""The message log, the chats' state and the bot's settings (whatsapp_messages, whatsapp_chats,
whatsapp_bot_settings)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from storage.core import DatabaseCore, Transaction, _aware, _aware_chat, _naive, _utcnow
from storage.records import (
    CHAT_HANDOFF,
    CHAT_RELEASED,
    LOGGED_MESSAGE_COLUMNS,
    MESSAGE_RECEIVED,
    MESSAGE_SENT,
    ChatState,
    ChatSummary,
    Inbound,
    InboundOutcome,
    InboundResult,
    LoggedMessage,
    MediaRef,
    media_context,
)


class MessageQueries(DatabaseCore):
    """Logging messages and acting on each once; the conversations as a CRM reads them."""

    INSERT_MESSAGE = """
        INSERT INTO whatsapp_messages (session_id, chat_jid, sender, message_id, dedupe_key, direction, text,
                                       status, reason, created_at, sent_at, next_attempt_at, expires_at,
                                       message_type, mimetype, media_size, file_name, media_ref, media_key_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id, dedupe_key) DO NOTHING
        RETURNING id
    """
    SELECT_CHAT = """
        SELECT chat_jid, last_incoming_at, paused_until, pause_reason, last_reply_reason, last_reply_at, phone_jid
        FROM whatsapp_chats WHERE session_id = %s AND chat_jid = %s
    """
    UPSERT_CHAT = """
        INSERT INTO whatsapp_chats
            (session_id, chat_jid, last_incoming_at, paused_until, pause_reason, last_reply_reason, last_reply_at,
             phone_jid)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id, chat_jid) DO UPDATE SET
            last_incoming_at = COALESCE(excluded.last_incoming_at, whatsapp_chats.last_incoming_at),
            paused_until = excluded.paused_until,
            pause_reason = excluded.pause_reason,
            last_reply_reason = COALESCE(excluded.last_reply_reason, whatsapp_chats.last_reply_reason),
            last_reply_at = COALESCE(excluded.last_reply_at, whatsapp_chats.last_reply_at),
            phone_jid = COALESCE(excluded.phone_jid, whatsapp_chats.phone_jid)
    """
    SET_MESSAGE_STATUS = "UPDATE whatsapp_messages SET status = %s, reason = %s WHERE id = %s"

    def _insert_message(
        self,
        tx: Transaction,
        *,
        session_id: str,
        chat_jid: str,
        direction: str,
        text: str,
        status: str,
        created_at: datetime | None,
        dedupe_key: str | None = None,
        sender: str | None = None,
        message_id: str | None = None,
        reason: str | None = None,
        sent_at: datetime | None = None,
        next_attempt_at: datetime | None = None,
        expires_at: datetime | None = None,
        message_type: str = "text",
        mimetype: str | None = None,
        media_size: int | None = None,
        file_name: str | None = None,
        media: str | None = None,
    ) -> int | None:
        """One row of the message log; None when its dedupe key was recorded before. ``media``
        (what downloads a received file, and the key to decrypt it) is sealed like credentials."""
        media_ref = None if media is None else self.sealer.seal(media, media_context(session_id, message_id))
        params = (
            session_id,
            chat_jid,
            sender,
            message_id,
            dedupe_key,
            direction,
            text,
            status,
            reason,
            _naive(created_at),
            _naive(sent_at),
            _naive(next_attempt_at),
            _naive(expires_at),
            message_type,
            mimetype,
            media_size,
            file_name,
            media_ref,
            None if media is None else self.sealer.key_id,
        )
        return tx.scalar(self.INSERT_MESSAGE, params)

    def record_inbound(self, message: Inbound, decide: Callable[[ChatState | None], InboundOutcome]) -> InboundResult:
        """Log the message and act on it exactly once: the id is recorded first, and the decision,
        the chat's new state and the queued reply commit with it or not at all."""
        received = _naive(message.received_at)
        with self.transaction() as tx:
            inbound_id = self._insert_message(
                tx,
                session_id=message.session_id,
                chat_jid=message.chat_jid,
                sender=message.sender,
                message_id=message.message_id,
                dedupe_key=f"in:{message.message_id}",
                direction="in",
                text=message.text,
                status="received",
                created_at=message.received_at,
                message_type=message.message_type,
                mimetype=message.mimetype,
                media_size=message.size,
                file_name=message.file_name,
                media=message.media,
            )
            if inbound_id is None:
                return InboundResult(duplicate=True, reply_id=None)
            chat = tx.one(ChatState, self.SELECT_CHAT, (message.session_id, message.chat_jid))
            before = None if chat is None else _aware_chat(chat)
            if message.chat_phone is None and before is not None and before.phone_jid is not None:
                message = replace(message, chat_phone=before.phone_jid)  # (known from an earlier message)
            outcome = decide(before)
            tx.execute(self.SET_MESSAGE_STATUS, (outcome.status, outcome.reason, inbound_id))
            payload = _message_event(inbound_id, message, "in", outcome.status, outcome.reason)
            self._event(tx, message.session_id, MESSAGE_RECEIVED, message.chat_jid, payload)
            was_handed_off = (
                before is not None
                and before.pause_reason == "handoff"
                and before.paused_until is not None
                and before.paused_until > message.received_at
            )
            if outcome.pause_reason == "handoff" and not was_handed_off:
                handoff = {"chat": message.chat_jid, "paused_until": outcome.paused_until, "message": payload}
                self._event(tx, message.session_id, CHAT_HANDOFF, message.chat_jid, handoff)
            replied = outcome.reply_text is not None
            tx.execute(
                self.UPSERT_CHAT,
                (
                    message.session_id,
                    message.chat_jid,
                    received,
                    _naive(outcome.paused_until),
                    outcome.pause_reason,
                    outcome.reason if replied else None,
                    received if replied else None,
                    message.chat_phone,
                ),
            )
            reply_id = None
            if outcome.reply_text is not None:
                reply_id = self._insert_message(
                    tx,
                    session_id=message.session_id,
                    chat_jid=message.chat_jid,
                    dedupe_key=f"reply:{message.message_id}",
                    direction="out",
                    text=outcome.reply_text,
                    status="queued",
                    reason=outcome.reason,
                    created_at=message.received_at,
                    next_attempt_at=message.received_at,
                    expires_at=outcome.reply_expires_at,
                )
        return InboundResult(duplicate=False, reply_id=reply_id)

    def record_operator_message(self, message: Inbound, paused_until: datetime) -> bool:
        """An answer typed on the phone: logged as outgoing, and the bot steps back in that chat."""
        with self.transaction() as tx:
            self._lock_events(tx, message.session_id)  # before the chat's row, as record_inbound: no deadlock
            logged = self._insert_message(
                tx,
                session_id=message.session_id,
                chat_jid=message.chat_jid,
                sender=message.sender,
                message_id=message.message_id,
                dedupe_key=f"op:{message.message_id}",
                direction="out",
                text=message.text,
                status="sent",
                reason="operator",
                created_at=message.received_at,
                sent_at=message.received_at,
            )
            if logged is None:
                return False
            tx.execute(
                self.UPSERT_CHAT,
                (
                    message.session_id,
                    message.chat_jid,
                    None,
                    _naive(paused_until),
                    "operator",
                    None,
                    None,
                    message.chat_phone,
                ),
            )
            payload = _message_event(logged, message, "out", "sent", "operator")
            self._event(tx, message.session_id, MESSAGE_SENT, message.chat_jid, payload)
        return True

    SELECT_MEDIA_REF = """
        SELECT message_id, mimetype, file_name, media_size, media_ref, media_key_id FROM whatsapp_messages
        WHERE session_id = %s AND id = %s AND media_ref IS NOT NULL
    """

    def media_ref(self, session_id: str, row_id: int) -> MediaRef | None:
        """How to download a received file (None: the message has none)."""
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_MEDIA_REF, (session_id, row_id)).fetchone()
        if row is None:
            return None
        context = media_context(session_id, row["message_id"])
        opened = self.sealer.open(row["media_ref"], row["media_key_id"], context)
        return MediaRef(row["mimetype"], row["file_name"], row["media_size"], opened)

    SELECT_OWN_MESSAGE = """
        SELECT 1 FROM whatsapp_messages WHERE session_id = %s AND direction = 'out' AND message_id = %s
    """

    def is_own_message(self, session_id: str, whatsapp_id: str) -> bool:
        with self.transaction() as tx:
            return tx.scalar(self.SELECT_OWN_MESSAGE, (session_id, whatsapp_id)) is not None

    SELECT_MESSAGES = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND (%s OR chat_jid = %s) ORDER BY id
    """

    def list_messages(self, session_id: str, chat_jid: str | None = None) -> list[LoggedMessage]:
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_MESSAGES, (session_id, chat_jid is None, chat_jid or ""))

    # --- the read API: conversations as a CRM shows them ---

    SELECT_CHATS = """
        SELECT s.chat_jid, s.unanswered, l.text AS last_text, l.direction AS last_direction,
               l.message_type AS last_type, l.created_at AS last_at, c.paused_until, c.pause_reason, c.phone_jid
        FROM (
            SELECT m.chat_jid, MAX(m.id) AS last_id,
                   SUM(CASE WHEN m.direction = 'in' AND m.id > COALESCE((
                       SELECT MAX(o.id) FROM whatsapp_messages o
                       WHERE o.session_id = m.session_id AND o.chat_jid = m.chat_jid AND o.direction = 'out'
                   ), 0) THEN 1 ELSE 0 END) AS unanswered
            FROM whatsapp_messages m WHERE m.session_id = %s GROUP BY m.session_id, m.chat_jid
        ) s
        JOIN whatsapp_messages l ON l.id = s.last_id
        LEFT JOIN whatsapp_chats c ON c.session_id = %s AND c.chat_jid = s.chat_jid
        ORDER BY s.last_id DESC LIMIT %s
    """

    def list_chats(self, session_id: str, limit: int = 50) -> list[ChatSummary]:
        """Chats with their latest message first; ``unanswered``: customer messages since our last one."""
        with self.transaction() as tx:
            chats = tx.all(ChatSummary, self.SELECT_CHATS, (session_id, session_id, limit))
        return [
            replace(c, unanswered=int(c.unanswered), last_at=_aware(c.last_at), paused_until=_aware(c.paused_until))
            for c in chats
        ]

    SELECT_CHAT_PAGE = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND chat_jid = %s AND id < %s ORDER BY id DESC LIMIT %s
    """

    def chat_messages(self, session_id: str, chat_jid: str, before_id: int | None, limit: int) -> list[LoggedMessage]:
        """A page of a chat's messages, newest first, older than ``before_id``."""
        before = 2**62 if before_id is None else before_id
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_CHAT_PAGE, (session_id, chat_jid, before, limit))

    SELECT_MESSAGE = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages WHERE session_id = %s AND id = %s
    """

    def message(self, session_id: str, row_id: int) -> LoggedMessage | None:
        with self.transaction() as tx:
            return tx.one(LoggedMessage, self.SELECT_MESSAGE, (session_id, row_id))

    SELECT_OUTBOX = f"""
        SELECT {LOGGED_MESSAGE_COLUMNS}
        FROM whatsapp_messages
        WHERE session_id = %s AND direction = 'out' AND status IN ('queued', 'sending', 'failed')
              AND (%s OR status = %s)
        ORDER BY id DESC LIMIT %s
    """

    def outbox_messages(self, session_id: str, status: str | None, limit: int) -> list[LoggedMessage]:
        """Outgoing messages not (yet) sent: queued, being sent, or failed with their error; newest first."""
        with self.transaction() as tx:
            return tx.all(LoggedMessage, self.SELECT_OUTBOX, (session_id, status is None, status or "", limit))

    UPSERT_REPLIES_PAUSED = """
        INSERT INTO whatsapp_bot_settings (session_id, replies_paused, changed_at) VALUES (%s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET replies_paused = EXCLUDED.replies_paused, changed_at = EXCLUDED.changed_at
    """
    SELECT_REPLIES_PAUSED = "SELECT replies_paused FROM whatsapp_bot_settings WHERE session_id = %s"

    def set_replies_paused(self, session_id: str, paused: bool) -> None:
        """The whole bot stops (or resumes) answering; messages are logged either way."""
        with self.transaction() as tx:
            tx.execute(self.UPSERT_REPLIES_PAUSED, (session_id, paused, _utcnow()))

    def replies_paused(self, session_id: str) -> bool:
        with self.transaction() as tx:
            return bool(tx.scalar(self.SELECT_REPLIES_PAUSED, (session_id,)))

    RELEASE_CHAT = """
        UPDATE whatsapp_chats SET paused_until = NULL, pause_reason = NULL
        WHERE session_id = %s AND chat_jid = %s AND paused_until IS NOT NULL AND paused_until > %s
    """

    def release_chat(self, session_id: str, chat_jid: str) -> bool:
        """Give a chat paused by a hand-off (or an operator's answer) back to the bot; False: it was not paused."""
        with self.transaction() as tx:
            self._lock_events(tx, session_id)  # before the chat's row, as record_inbound: no deadlock
            released = tx.execute(self.RELEASE_CHAT, (session_id, chat_jid, _utcnow())).rowcount == 1
            if released:
                self._event(tx, session_id, CHAT_RELEASED, chat_jid, {"chat": chat_jid})
            return released


def _message_event(row_id: int, message: Inbound, direction: str, status: str, reason: str | None) -> dict[str, Any]:
    return {
        "id": row_id,
        "chat": message.chat_jid,
        **({"chat_phone": message.chat_phone} if message.chat_phone else {}),
        "whatsapp_id": message.message_id,
        "sender": message.sender,
        "direction": direction,
        "type": message.message_type,
        "text": message.text,
        "status": status,
        "reason": reason,
        "at": message.received_at,
        **(
            {"mimetype": message.mimetype, "size": message.size, "file_name": message.file_name}
            if message.media
            else {}
        ),
    }
