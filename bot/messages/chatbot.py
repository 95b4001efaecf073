"""Customer messages in: filtered, logged, decided once, the reply queued in the outbox."""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.messages import rules

from bot.connection import events
from bot.process.errors import first_line
from bot.process.counters import MessageCounts, NotCounted
from bot.messages.outbox import Outbox
from bot.process.retry import RetrySchedule
from bot.process.logs import session_thread
from database import ChatState, Database, Inbound, InboundOutcome, is_unavailable

log = logging.getLogger("bot.messaging")  # pinned: the name operators see in log lines

INBOX_RETRY = RetrySchedule((1.0, 2.0, 5.0, 10.0, 30.0))  # then every 30 s: whatsmeow will not deliver it again

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# Servers of chats the bot never answers.
IGNORED_SERVERS = {"g.us": "group", "broadcast": "broadcast", "newsletter": "newsletter"}


@dataclass(frozen=True)
class Handled:
    outcome: str  # replied | paused | ignored:<why> | duplicate | operator | own
    reply_id: int | None = None


def ignore_reason(message: events.IncomingMessage) -> str | None:
    server = message.chat.rpartition("@")[2]
    if message.is_group or server == "g.us":
        return "group"
    return IGNORED_SERVERS.get(server)


def _ignored(reason: str, chat: ChatState | None) -> InboundOutcome:
    """Logged, unanswered, and the chat's pause (if any) left as it was."""
    if chat is None:
        return InboundOutcome("ignored", reason)
    return InboundOutcome("ignored", reason, paused_until=chat.paused_until, pause_reason=chat.pause_reason)


def storable(text: str) -> str:
    """PostgreSQL's text refuses NUL and UTF-8 has no lone surrogates: a customer's stray
    character must not cost them their answer, so it is kept as U+FFFD."""
    return UNSTORABLE.sub("\ufffd", text)


def _sent_at(message: events.IncomingMessage) -> datetime:
    return datetime.fromtimestamp(message.timestamp, UTC)


class Chatbot:
    def __init__(
        self,
        db: Database,
        session_id: str,
        rules: rules.Rules,
        outbox: Outbox,
        *,
        mark_read: Callable[[events.IncomingMessage], None] | None = None,
        handled: Callable[[events.IncomingMessage], None] | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: MessageCounts | None = None,
    ) -> None:
        self.metrics = metrics or NotCounted()
        self.db = db
        self.session_id = session_id
        self.rules = rules
        self.outbox = outbox
        self._mark_read = mark_read
        self._handled = handled or (lambda message: None)  # the client may deliver the next one
        self._database_away = threading.Event()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._inbox: queue.Queue[events.IncomingMessage | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the daemon's path: off the events thread, in order, surviving database hiccups ---

    def start(self) -> None:
        if self._thread is None:
            self._thread = session_thread(self.session_id, self._work, "chatbot")
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        if not self._inbox.empty():
            log.warning("chatbot: %d received message(s) not yet handled at shutdown", self._inbox.qsize() - 1)

    def submit(self, message: events.IncomingMessage) -> None:
        """Hand a message over and return at once (called on the client's events thread)."""
        self._inbox.put(message)
        if self._database_away.is_set():
            self._handled(message)  # kept here in order; the client must not wait out the outage

    def _hand_back_everything_waiting(self) -> None:
        """The database went away: the client must not wait for what is queued behind this one."""
        with self._inbox.mutex:
            waiting = [m for m in self._inbox.queue if m is not None]
        for message in waiting:
            self._handled(message)

    def _work(self) -> None:
        while (message := self._inbox.get()) is not None:
            for attempt in itertools.count():
                try:
                    handled = self.handle(message)
                    self._database_away.clear()
                    self._handled(message)
                    self.metrics.received(handled.outcome)
                    if handled.outcome in ("replied", "paused"):
                        self._mark_as_read(message)  # after the hand-back: a round trip to WhatsApp
                    break
                except Exception as exc:
                    if not is_unavailable(exc):  # this message itself is refused: never hold up the others
                        log.error(
                            "chatbot: message %s in %s cannot be stored and is skipped: %s",
                            message.message_id,
                            message.chat,
                            first_line(exc),
                        )
                        self.metrics.received("unstorable")
                        self._handled(message)
                        break
                    # The database is away: keep the message, and the order, but let the client go
                    # on: holding whatsmeow through an outage would stall its connection.
                    if attempt == 0:
                        self._database_away.set()
                        self._handled(message)
                        self._hand_back_everything_waiting()
                    delay = INBOX_RETRY.delay(attempt + 1)
                    log.warning(
                        "chatbot: message %s not handled yet (%s); retrying in %.0f s",
                        message.message_id,
                        first_line(exc),
                        delay,
                    )
                    if self._stopping.wait(delay):
                        return

    def handle(self, message: events.IncomingMessage) -> Handled:
        now = self._clock()
        inbound = Inbound(
            self.session_id,
            storable(message.chat),
            storable(message.sender),
            storable(message.message_id),
            storable(message.text),
            now,
            message_type=message.kind,
            mimetype=None if message.mimetype is None else storable(message.mimetype),
            size=message.size,
            file_name=None if message.file_name is None else storable(message.file_name),
            media=message.media,
            chat_phone=None if message.chat_phone is None else storable(message.chat_phone),
        )
        reason = ignore_reason(message)
        if reason is None and (message.kind in events.PROTOCOL_KINDS or self.rules.ignores(message.kind)):
            reason = message.kind  # logged, never answered
        if reason is None and not message.from_me and _sent_at(message) < now - self.rules.reply_expiry:
            reason = "stale"  # delivered long after it was sent (an outage): a person follows up, not the bot
        if reason is None and not message.from_me and self.db.replies_paused(self.session_id):
            reason = "bot_paused"  # an operator paused the whole bot: logged, answered by people
        if reason is not None:
            result = self.db.record_inbound(inbound, lambda chat: _ignored(reason, chat))
            return Handled("duplicate" if result.duplicate else f"ignored:{reason}")
        if message.from_me:
            return self._own_message(inbound, now)

        def decide(chat: ChatState | None) -> InboundOutcome:
            context = rules.ChatContext(
                last_incoming_at=None if chat is None else chat.last_incoming_at,
                paused_until=None if chat is None else chat.paused_until,
                last_reply_reason=None if chat is None else chat.last_reply_reason,
                last_reply_at=None if chat is None else chat.last_reply_at,
            )
            decision = rules.decide(self.rules, message.text, storable(message.push_name), context, now, message.kind)
            if decision.reason == "paused":  # still paused: the pause stays as it was
                paused_until, pause_reason = context.paused_until, None if chat is None else chat.pause_reason
            else:
                paused_until, pause_reason = decision.pause_until, "handoff" if decision.pause_until else None
            return InboundOutcome(
                status="paused" if decision.reply is None else "replied",
                reason=decision.reason,
                reply_text=decision.reply,
                reply_expires_at=now + self.rules.reply_expiry,
                paused_until=paused_until,
                pause_reason=pause_reason,
            )

        result = self.db.record_inbound(inbound, decide)
        if result.duplicate:
            log.info(
                "message %s in %s: already handled (redelivered); no second reply", message.message_id, message.chat
            )
            return Handled("duplicate")
        log.info(
            "message %s from %s: %d chars, %s",
            message.message_id,
            message.chat,
            len(message.text),
            "reply queued" if result.reply_id else "no reply (paused)",
        )
        if result.reply_id is None:
            return Handled("paused")
        self.outbox.notify()
        return Handled("replied", result.reply_id)

    def _mark_as_read(self, message: events.IncomingMessage) -> None:
        if self.rules.mark_read and self._mark_read is not None:
            try:
                self._mark_read(message)
            except Exception as exc:
                log.debug("mark read failed: %s", exc)

    def _own_message(self, inbound: Inbound, now: datetime) -> Handled:
        """Sent by this account: our own reply coming back, or an operator answering from the phone."""
        if self.db.is_own_message(self.session_id, inbound.message_id):
            return Handled("own")
        if self.db.record_operator_message(inbound, now + self.rules.operator_pause):
            log.info("operator answered in %s from the phone; the bot steps back there", inbound.chat_jid)
            return Handled("operator")
        return Handled("duplicate")
