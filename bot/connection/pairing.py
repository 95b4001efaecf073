"""Pairing a new device: the QR codes of a round (shown in the log and over the API) and the
phone-number pairing code (``PAIR_PHONE``)."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import segno

from bot.connection import events

log = logging.getLogger("bot.pairing")  # pinned: the name operators see in log lines

# whatsmeow shows a round's first QR code for 60 s, each next one for 20 s.
FIRST_QR_SECONDS = 60
NEXT_QR_SECONDS = 20


class Pairing:
    """The pairing state of the current round. The runtime calls it under its own lock."""

    def __init__(self, session_id: str, pair_phone: str | None, update: Callable[..., None]) -> None:
        self.session_id = session_id
        self.pair_phone = pair_phone
        self._update = update  # fields of the session status
        self.qr: str | None = None
        self.qr_expires_at: datetime | None = None  # when whatsmeow replaces the code shown
        self._qr_at = 0.0
        self._codes_in_round = 0
        self._code_requested = False

    def new_round(self) -> None:
        self.qr = None
        self.qr_expires_at = None
        self._qr_at = time.monotonic()
        self._codes_in_round = 0
        self._code_requested = False

    def clear(self) -> None:
        self.qr = None
        self.qr_expires_at = None

    def expired(self, round_seconds: float) -> bool:
        """No new QR for this long: whatsmeow's codes ran out (~60 s, then 20 s each)."""
        return time.monotonic() - self._qr_at > round_seconds

    def show(self, code: str, client: events.WhatsAppClient | None) -> Callable[[], None] | None:
        """A new QR code; returns what to do outside the lock (log it, or ask for a pairing code)."""
        self.qr = code
        self._qr_at = time.monotonic()
        lifetime = FIRST_QR_SECONDS if self._codes_in_round == 0 else NEXT_QR_SECONDS
        self._codes_in_round += 1
        self.qr_expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        if self.pair_phone is not None:
            if self._code_requested or client is None:
                return None
            self._code_requested = True
            # Off the events thread: neonize's PairPhone can block for a minute while a dial hangs.
            thread = threading.Thread(target=self._request_code, args=(client,), name="pairing", daemon=True)
            return thread.start
        return lambda: log.info(
            "session %s: scan this QR code in WhatsApp > Linked devices (or GET /api/session/qr):\n%s",
            self.session_id,
            qr_terminal_art(code),
        )

    def _request_code(self, client: events.WhatsAppClient) -> None:
        assert self.pair_phone is not None
        try:
            code = client.request_pairing_code(self.pair_phone)
        except Exception as exc:
            log.error("session %s: pairing code request failed: %s", self.session_id, exc)
            self._update(last_error=f"pairing code request failed: {exc}")
            return
        self._update(pairing_code=code)
        log.warning(
            "session %s: pairing code for %s: %s  (WhatsApp > Linked devices > Link with phone number)",
            self.session_id,
            self.pair_phone,
            code,
        )


def qr_terminal_art(code: str) -> str:
    buffer = io.StringIO()
    segno.make_qr(code).terminal(out=buffer, compact=True)
    return buffer.getvalue()
