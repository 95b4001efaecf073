"""Events for webhooks and the event stream, and what each webhook endpoint has received."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from storage.core import DatabaseCore, _aware, _naive, _utcnow
from storage.records import Delivery, StoredEvent


class EventQueries(DatabaseCore):
    """whatsapp_events, whatsapp_webhook_endpoints, whatsapp_webhook_deliveries."""

    def record_event(self, session_id: str, event_type: str, chat_jid: str | None, payload: dict) -> None:
        """An event whose cause is not a database write (a state change, a failed backup)."""
        with self.transaction() as tx:
            self._event(tx, session_id, event_type, chat_jid, payload)

    SELECT_EVENTS_AFTER = """
        SELECT id, session_id, event_type, chat_jid, CAST(payload AS TEXT) AS payload, created_at
        FROM whatsapp_events WHERE session_id = %s AND id > %s ORDER BY id LIMIT %s
    """
    LAST_EVENT_ID = "SELECT COALESCE(MAX(id), 0) FROM whatsapp_events WHERE session_id = %s"

    def events_after(self, session_id: str, after: int, limit: int = 500) -> list[StoredEvent]:
        with self.transaction() as tx:
            rows = tx.all(StoredEvent, self.SELECT_EVENTS_AFTER, (session_id, after, limit))
        return [replace(r, created_at=_aware(r.created_at)) for r in rows]

    def last_event_id(self, session_id: str) -> int:
        with self.transaction() as tx:
            return int(tx.scalar(self.LAST_EVENT_ID, (session_id,)))

    # An endpoint has settled every event up to settled_through (delivered, given up or filtered out).
    REGISTER_ENDPOINT = """
        INSERT INTO whatsapp_webhook_endpoints (endpoint, session_id, settled_through)
        SELECT %s, %s, COALESCE(MAX(id), 0) FROM whatsapp_events WHERE session_id = %s
        ON CONFLICT (endpoint, session_id) DO NOTHING
    """
    SELECT_SETTLED = "SELECT settled_through FROM whatsapp_webhook_endpoints WHERE endpoint = %s AND session_id = %s"
    # Only forward: an instance that read an older mark cannot move it back.
    SET_SETTLED = """
        UPDATE whatsapp_webhook_endpoints SET settled_through = %s
        WHERE endpoint = %s AND session_id = %s AND settled_through < %s
    """
    FORGET_SETTLED = "DELETE FROM whatsapp_webhook_deliveries WHERE endpoint = %s AND event_id <= %s"
    SELECT_OPEN_DELIVERIES = """
        SELECT event_id, attempts, next_attempt_at FROM whatsapp_webhook_deliveries
        WHERE endpoint = %s AND event_id > %s AND delivered_at IS NULL AND given_up_at IS NULL
    """
    SELECT_SETTLED_DELIVERIES = """
        SELECT event_id FROM whatsapp_webhook_deliveries
        WHERE endpoint = %s AND event_id > %s AND (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)
    """
    UPSERT_DELIVERY = """
        INSERT INTO whatsapp_webhook_deliveries
            (endpoint, event_id, attempts, next_attempt_at, last_error, delivered_at, given_up_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (endpoint, event_id) DO UPDATE SET
            attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
            last_error = excluded.last_error, delivered_at = excluded.delivered_at, given_up_at = excluded.given_up_at
    """

    def register_endpoint(self, endpoint: str, session_id: str) -> int:
        """A webhook endpoint new to this session starts with the events after this moment."""
        with self.transaction() as tx:
            self._lock_events(tx, session_id)  # (no event id in flight: none is skipped)
            tx.execute(self.REGISTER_ENDPOINT, (endpoint, session_id, session_id))
            return int(tx.scalar(self.SELECT_SETTLED, (endpoint, session_id)))

    def settled_through(self, endpoint: str, session_id: str) -> int:
        with self.transaction() as tx:
            return int(tx.scalar(self.SELECT_SETTLED, (endpoint, session_id)) or 0)

    def settle(self, endpoint: str, session_id: str, through: int, delivered_after: Sequence[int]) -> None:
        """One pass's outcome in one transaction: every event up to ``through`` settled (their rows
        forgotten), and the events delivered beyond it (behind a chat still waiting) remembered."""
        now = _utcnow()
        with self.transaction() as tx:
            tx.execute(self.SET_SETTLED, (through, endpoint, session_id, through))
            tx.execute(self.FORGET_SETTLED, (endpoint, through))
            tx.executemany(
                self.UPSERT_DELIVERY, [(endpoint, event_id, 1, None, None, now, None) for event_id in delivered_after]
            )

    def open_deliveries(self, endpoint: str, after: int) -> tuple[dict[int, Delivery], set[int]]:
        """After ``after``: events tried and not yet delivered, and events settled already."""
        with self.transaction() as tx:
            rows = tx.all(Delivery, self.SELECT_OPEN_DELIVERIES, (endpoint, after))
            settled = {r["event_id"] for r in tx.execute(self.SELECT_SETTLED_DELIVERIES, (endpoint, after)).fetchall()}
        return {r.event_id: replace(r, next_attempt_at=_aware(r.next_attempt_at)) for r in rows}, settled

    def record_delivery(
        self,
        endpoint: str,
        event_id: int,
        *,
        attempts: int,
        delivered: bool,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
        given_up: bool = False,
    ) -> None:
        now = _utcnow()
        params = (
            endpoint,
            event_id,
            attempts,
            _naive(next_attempt_at),
            error,
            now if delivered else None,
            now if given_up else None,
        )
        with self.transaction() as tx:
            tx.execute(self.UPSERT_DELIVERY, params)

    PRUNE_EVENTS = "DELETE FROM whatsapp_events WHERE session_id = %s AND created_at < %s"

    def prune_events(self, session_id: str, before: datetime) -> int:
        with self.transaction() as tx:
            return tx.execute(self.PRUNE_EVENTS, (session_id, _naive(before))).rowcount
