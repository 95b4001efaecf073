"""The durable outbox: every reply and API message is a database row first, sent by one worker.

Rows go queued -> sending -> sent, or back to queued with a delay after an error, or failed
(too many attempts, expired, or interrupted mid-send). A reply goes out at most once: neonize
cannot send with a message id of our choosing (whatsmeow's SendRequestExtra.ID is not exposed),
so WhatsApp could not tell a resend from a new message. A send whose outcome is unknown (no
answer, the client ended mid-send) is failed, never retried, and so is a row a crashed owner
left "sending": the next owner settles those when it takes the session over. While the client is not connected
nothing is attempted and nothing expires early; queued rows go out, in order per chat, once
it reconnects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.connection import events
from bot.process.errors import SendOutcomeUnknown, StateConflictError, first_line
from bot.process.counters import MessageCounts, NotCounted
from bot.process.retry import RetrySchedule
from bot.process.logs import session_thread
from database import Database, OutgoingFile, OutgoingMessage

log = logging.getLogger("bot.outbox")  # pinned: the name operators see in log lines

RETRY = RetrySchedule((5.0, 30.0, 120.0, 600.0))  # seconds; then the message is given up
MAX_ATTEMPTS = len(RETRY.steps) + 1
TYPING_ONLY_BELOW = 5  # with a longer queue, skip "typing…" so that the backlog drains fast


@dataclass(frozen=True)
class Channel:
    """What the outbox needs of the WhatsApp side."""

    send_text: Callable[[str, str], str]  # (chat jid, text) -> message id; StateConflictError when offline
    is_connected: Callable[[], bool]
    show_typing: Callable[[str, float], None]  # (chat jid, seconds): may sleep that long
    send_file: Callable[[str, OutgoingFile, str], str] | None = None  # (chat jid, file, caption) -> message id


class Outbox:
    def __init__(
        self,
        db: Database,
        session_id: str,
        channel: Channel,
        *,
        typing_seconds: float = 0.0,
        clock: Callable[[], datetime] | None = None,
        poll_seconds: float = 1.0,
        metrics: MessageCounts | None = None,
    ) -> None:
        self.metrics = metrics or NotCounted()
        self.db = db
        self.session_id = session_id
        self.channel = channel
        self.typing_seconds = typing_seconds
        self._clock = clock or (lambda: datetime.now(UTC))
        self._poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def settle_interrupted(self) -> None:
        """At take-over (never before: the live owner's sends are "sending" too): what the last
        owner left mid-send may have gone out, so it is failed rather than sent again."""
        interrupted = self.db.fail_interrupted(self.session_id)
        if interrupted:
            log.warning("outbox: %d message(s) were interrupted mid-send by the last owner; marked failed", interrupted)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = session_thread(self.session_id, self._run, "outbox")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def notify(self) -> None:
        """Something was queued, or the client connected: look now rather than at the next poll."""
        self._wake.set()

    def on_receipt(self, receipt: events.Receipt) -> None:
        """The customer's phone got (or read) messages we sent: their status moves on, never back."""
        try:
            moved = self.db.mark_receipts(self.session_id, receipt.message_ids, receipt.status)
        except Exception as exc:  # a status is a courtesy: never worth holding the events thread
            log.warning(
                "outbox: %s receipt for %d message(s) not stored: %s",
                receipt.status,
                len(receipt.message_ids),
                first_line(exc),
            )
            return
        if moved:
            log.debug("outbox: %d message(s) to %s %s", moved, receipt.chat, receipt.status)

    def enqueue(
        self,
        chat_jid: str,
        text: str,
        *,
        reason: str,
        expires_in: timedelta | None,
        file: OutgoingFile | None = None,
    ) -> int:
        """Queue a text (or a file, ``text`` its caption); sent in order per chat once connected."""
        now = self._clock()
        message_id = self.db.enqueue_outgoing(
            self.session_id,
            chat_jid,
            text,
            reason=reason,
            expires_at=None if expires_in is None else now + expires_in,
            now=now,
            file=file,
        )
        self.notify()
        return message_id

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.flush()
            except Exception as exc:  # the database is away, most likely: the rows wait where they are
                log.warning(
                    "outbox: cannot send now (%s); retrying shortly",
                    first_line(exc),
                )

    def flush(self) -> int:
        """Send every message that is due, oldest first and in order within each chat; returns how many."""
        with self._flush_lock:
            if not self.channel.is_connected():
                return 0
            now = self._clock()
            expired = self.db.fail_expired(self.session_id, now)
            if expired:
                log.warning("outbox: %d message(s) expired before they could be sent", expired)
            queued = self.db.queued_outgoing(self.session_id)
            held: set[str] = set()  # chats whose oldest message waits for a retry: keep their order
            sent = 0
            for message in queued:
                if message.chat_jid in held:
                    continue
                if message.next_attempt_at is not None and message.next_attempt_at > now:
                    held.add(message.chat_jid)
                    continue
                if not self._send(message, typing=len(queued) < TYPING_ONLY_BELOW):
                    if not self.channel.is_connected():
                        return sent  # wait for the reconnect; the rest stays queued in order
                    held.add(message.chat_jid)
                    continue
                sent += 1
            return sent

    def _send(self, message: OutgoingMessage, *, typing: bool) -> bool:
        row_id, chat_jid, text, attempts = message.id, message.chat_jid, message.text, message.attempts
        if not self.db.claim_outgoing(row_id):
            return False  # someone else took it
        file = self.db.outgoing_file(row_id) if message.message_type != "text" else None
        if message.message_type != "text" and (file is None or self.channel.send_file is None):
            self.db.mark_failed(row_id, "its file is gone (or files cannot be sent here)")
            return False
        try:
            if typing and self.typing_seconds > 0 and file is None:
                self.channel.show_typing(chat_jid, self.typing_seconds)
            if file is not None and self.channel.send_file is not None:
                whatsapp_id = self.channel.send_file(chat_jid, file, text)
            else:
                whatsapp_id = self.channel.send_text(chat_jid, text)
        except StateConflictError:
            self.db.mark_unsent(row_id)  # never reached WhatsApp: not an attempt
            return False
        except SendOutcomeUnknown as exc:
            self.db.mark_failed(row_id, f"outcome unknown, not retried (at most once): {first_line(exc)}")
            self.metrics.sent("unknown")
            log.error("outbox: message %d to %s may not have been sent: %s", row_id, chat_jid, first_line(exc))
            return False
        except Exception as exc:
            error = first_line(exc)
            if attempts + 1 >= MAX_ATTEMPTS:
                self.db.mark_failed(row_id, f"gave up after {attempts + 1} attempts: {error}")
                self.metrics.sent("failed")
                log.error("outbox: message %d to %s failed for good: %s", row_id, chat_jid, error)
            else:
                self.db.mark_retry(row_id, error, self._clock() + timedelta(seconds=RETRY.delay(attempts + 1)))
                log.warning("outbox: message %d to %s failed (%s); retrying", row_id, chat_jid, error)
            return False
        self.db.mark_sent(row_id, whatsapp_id, self._clock())
        self.metrics.sent("sent")
        log.info("outbox: sent message %d to %s (%d chars)", row_id, chat_jid, len(text))
        return True
