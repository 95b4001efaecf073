"""What the chatbot and the outbox send through: the live client while connected, a
``StateConflictError`` otherwise (the outbox keeps the message for later)."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable

from bot.connection import events
from bot.process.errors import StateConflictError
from database import OutgoingFile

log = logging.getLogger("bot.gateway")  # pinned: the name operators see in log lines


class SendGateway:
    def __init__(
        self,
        connected_client: Callable[[], events.WhatsAppClient | None],
        round_client: Callable[[], events.WhatsAppClient | None],
        not_connected: Callable[[], str],
        stopping: threading.Event,
    ) -> None:
        self._connected_client = connected_client  # None unless connected
        self._round_client = round_client  # the current round's, connected or not
        self._not_connected = not_connected  # why not, in words
        self._stopping = stopping

    def is_connected(self) -> bool:
        return self._connected_client() is not None

    def send_text(self, to_jid: str, text: str) -> str:
        return self._client().send_text(to_jid, text)

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        return self._client().check_numbers(numbers)

    def send_file(self, to_jid: str, file: OutgoingFile, caption: str) -> str:
        data = base64.b64encode(file.data).decode("ascii")
        return self._client().send_media(to_jid, file.kind, data, file.mimetype, file.file_name, caption or None)

    def download(self, media: str) -> bytes:
        """A received file, fetched through whatsmeow now (nothing is kept on disk)."""
        return base64.b64decode(self._client().download(media))

    def mark_read(self, message: events.IncomingMessage) -> None:
        """Blue ticks through the round's client, connected or not yet: whatsmeow delivers the messages
        queued while it was away before it dispatches Connected (after its pre-key check), over a
        connection that takes receipts already."""
        client = self._round_client()
        if client is None:
            raise StateConflictError(self._not_connected())
        client.mark_read(message.chat, message.sender, message.message_id)

    def message_handled(self, message: events.IncomingMessage) -> None:
        """Logged: the client may take the next message. (A message from an ended round: that
        round's client is gone, and the next one knows nothing of it.)"""
        client = self._round_client()
        if client is not None:
            try:
                client.message_handled(message.message_id)
            except Exception as exc:
                log.debug("message hand-back failed: %s", exc)

    def show_typing(self, chat_jid: str, seconds: float) -> None:
        """'typing…' for a moment before a reply; best effort, never delays by more than asked."""
        try:
            client = self._client()
            client.set_typing(chat_jid, True)
        except Exception as exc:
            log.debug("typing indicator failed: %s", exc)
            return
        self._stopping.wait(seconds)
        try:
            client.set_typing(chat_jid, False)
        except Exception as exc:
            log.debug("typing indicator failed: %s", exc)

    def _client(self) -> events.WhatsAppClient:
        client = self._connected_client()
        if client is None:
            raise StateConflictError(self._not_connected())
        return client
