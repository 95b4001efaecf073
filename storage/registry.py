"""Which sessions exist (the registry and its tombstones), what their owners publish about them,
and the overview every instance answers ``GET /api/sessions`` from.

A session exists when it is registered (``whatsapp_session_registry``) or stored
(``whatsapp_sessions``: a release before the registry stored it without registering it), and is not
tombstoned. A tombstone outlives the stored rows on purpose: an owner that has not yet heard of the
delete may mirror the session again, and it must still count as gone.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from storage.core import DatabaseCore, Transaction, _aware, _utcnow
from storage.records import LiveState, RegisteredSession, SessionOverview

# Every existing session's id: registered and not tombstoned, or stored and never registered.
EXISTING_SESSIONS = """
    SELECT r.session_id FROM whatsapp_session_registry r WHERE r.deleted_at IS NULL
    UNION
    SELECT s.session_id FROM whatsapp_sessions s
    WHERE s.session_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM whatsapp_session_registry t WHERE t.session_id = s.session_id)
"""


class RegistryQueries(DatabaseCore):
    """whatsapp_session_registry, whatsapp_session_live, and the overview joining them to the
    stored sessions and their leases."""

    # Created when new or tombstoned; a stored session counts as existing unless tombstoned.
    REGISTER_SESSION = """
        INSERT INTO whatsapp_session_registry (session_id, created_at, pair_phone, rules, deleted_at)
        SELECT %s, %s, %s, %s, NULL
        WHERE NOT EXISTS (
            SELECT 1 FROM whatsapp_sessions s WHERE s.session_id = %s
              AND NOT EXISTS (SELECT 1 FROM whatsapp_session_registry t
                              WHERE t.session_id = s.session_id AND t.deleted_at IS NOT NULL))
        ON CONFLICT (session_id) DO UPDATE SET
            created_at = excluded.created_at,
            pair_phone = excluded.pair_phone,
            rules = excluded.rules,
            deleted_at = NULL
        WHERE whatsapp_session_registry.deleted_at IS NOT NULL
        RETURNING session_id
    """

    def register_session(self, session_id: str, *, pair_phone: str | None = None, rules: str | None = None) -> bool:
        """Create a session: True when created (a tombstoned one is created anew: tombstone
        cleared, a new ``created_at``); False when it exists already (registered, or stored by an
        older release), nothing changed. Concurrent calls for one id: one of them gets True."""
        with self.transaction() as tx:
            params = (session_id, _utcnow(), pair_phone, rules, session_id)
            return tx.scalar(self.REGISTER_SESSION, params) is not None

    SELECT_EXISTING = EXISTING_SESSIONS

    def session_ids(self) -> list[str]:
        """Every session that exists (registered or stored, not tombstoned), sorted."""
        with self.transaction() as tx:
            return sorted(row["session_id"] for row in tx.execute(self.SELECT_EXISTING).fetchall())

    SELECT_REGISTERED = """
        SELECT session_id, created_at, pair_phone, rules, deleted_at
        FROM whatsapp_session_registry WHERE session_id = %s
    """
    SELECT_STORED_CREATED = "SELECT session_id, created_at FROM whatsapp_sessions WHERE session_id = %s"

    def registered_session(self, session_id: str) -> RegisteredSession | None:
        """The session's registry row (tombstoned ones too: ``deleted_at`` set); for a session only
        stored (by an older release), a record with its stored creation time and nothing else;
        None: never created."""
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_REGISTERED, (session_id,)).fetchone()
            if row is None:
                stored = tx.execute(self.SELECT_STORED_CREATED, (session_id,)).fetchone()
                if stored is None:
                    return None
                row = {**stored, "pair_phone": None, "rules": None, "deleted_at": None}
        return RegisteredSession(
            session_id=row["session_id"],
            created_at=_timestamp(row["created_at"]) or datetime.now(UTC),
            pair_phone=row["pair_phone"],
            rules=row["rules"],
            deleted_at=_timestamp(row["deleted_at"]),
        )

    TOMBSTONE_REGISTERED = """
        UPDATE whatsapp_session_registry SET deleted_at = %s WHERE session_id = %s AND deleted_at IS NULL
    """
    TOMBSTONE_STORED = """
        INSERT INTO whatsapp_session_registry (session_id, created_at, deleted_at)
        SELECT session_id, COALESCE(created_at, %s), %s FROM whatsapp_sessions WHERE session_id = %s
        ON CONFLICT (session_id) DO NOTHING
    """

    def tombstone_session(self, session_id: str) -> bool:
        """Mark the session deleted for good (until created again); True if it existed. Its stored
        rows stay: the caller deletes them (``delete_session``); the tombstone keeps the session
        gone even if an owner mirrors it again before it heard of the delete."""
        now = _utcnow()
        with self.transaction() as tx:
            if tx.execute(self.TOMBSTONE_REGISTERED, (now, session_id)).rowcount == 1:
                return True
            return tx.execute(self.TOMBSTONE_STORED, (now, now, session_id)).rowcount == 1

    IS_TOMBSTONED = "SELECT 1 FROM whatsapp_session_registry WHERE session_id = %s AND deleted_at IS NOT NULL"

    def is_tombstoned(self, session_id: str) -> bool:
        with self.transaction() as tx:
            return tx.scalar(self.IS_TOMBSTONED, (session_id,)) is not None

    # --- live state: what each owner publishes about the sessions it runs ---

    UPSERT_LIVE = """
        INSERT INTO whatsapp_session_live
            (session_id, owner_id, state, connected, phone, push_name, last_error, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET
            owner_id = excluded.owner_id,
            state = excluded.state,
            connected = excluded.connected,
            phone = excluded.phone,
            push_name = excluded.push_name,
            last_error = excluded.last_error,
            updated_at = excluded.updated_at
    """

    def publish_live(self, live: LiveState) -> None:
        """The owner's view of its session now (``updated_at``: the database's clock, so that
        instances with drifting clocks compare ages alike)."""
        with self.transaction() as tx:
            params = (live.session_id, live.owner_id, live.state, live.connected, live.phone, live.push_name)
            tx.execute(self.UPSERT_LIVE, (*params, live.last_error, _database_now(self, tx)))

    SELECT_LIVE = """
        SELECT session_id, owner_id, state, connected, phone, push_name, last_error, updated_at
        FROM whatsapp_session_live
    """

    def live_states(self) -> dict[str, LiveState]:
        """Every published live state, by session id (tombstoned sessions' too, until cleared)."""
        with self.transaction() as tx:
            rows = tx.all(LiveState, self.SELECT_LIVE)
        return {
            r.session_id: replace(r, connected=bool(r.connected), updated_at=_timestamp(r.updated_at)) for r in rows
        }

    DELETE_LIVE = "DELETE FROM whatsapp_session_live WHERE session_id = %s"

    def clear_live(self, session_id: str) -> None:
        with self.transaction() as tx:
            tx.execute(self.DELETE_LIVE, (session_id,))

    # --- the overview of every existing session (GET /api/sessions), in one query ---

    SELECT_OVERVIEW = f"""
        SELECT e.session_id,
               l.owner_id AS live_owner, l.state, l.connected, l.phone, l.push_name AS live_push_name,
               l.last_error, s.updated_at AS last_mirrored_at, s.push_name AS stored_push_name, s.device_jid,
               k.owner_id AS lease_owner, k.expires_at - %s AS lease_expires_in_seconds
        FROM ({EXISTING_SESSIONS}) e
        LEFT JOIN whatsapp_session_live l ON l.session_id = e.session_id
        LEFT JOIN whatsapp_sessions s ON s.session_id = e.session_id
        LEFT JOIN whatsapp_session_leases k ON k.session_id = e.session_id
    """

    def session_overview(self) -> list[SessionOverview]:
        """Every existing session, sorted by id. Its state and ``connected`` are the live owner's
        when the instance that published them still holds an unexpired lease; a lease held with
        nothing published by its holder yet is "starting"; no unexpired lease is "not_running" (an
        owner killed while "connected" leaves that row behind: the lease's expiry is what tells). Phone, name and last error are the last
        published (the name falls back to the stored one)."""
        with self.transaction() as tx:
            rows = tx.execute(self.SELECT_OVERVIEW, (tx.scalar(self.NOW),)).fetchall()
        return sorted((_overview(row) for row in rows), key=lambda o: o.session_id)


def _overview(row: dict[str, Any]) -> SessionOverview:
    expires_in = row["lease_expires_in_seconds"]
    owner = row["lease_owner"] if expires_in is not None and expires_in > 0 else None
    running = owner is not None and row["live_owner"] == owner
    return SessionOverview(
        session_id=row["session_id"],
        state=row["state"] if running else ("starting" if owner is not None else "not_running"),
        connected=bool(row["connected"]) if running else False,
        phone=row["phone"],
        push_name=row["live_push_name"] or row["stored_push_name"],
        owner=owner,
        last_mirrored_at=_timestamp(row["last_mirrored_at"]),
        last_error=row["last_error"],
        lease_expires_in_seconds=None if expires_in is None else float(expires_in),
        device_jid=row["device_jid"],
    )


def _database_now(db: DatabaseCore, tx: Transaction) -> datetime:
    """The database's clock as a naive UTC timestamp (the form every TIMESTAMP column holds)."""
    return datetime.fromtimestamp(tx.scalar(db.NOW), UTC).replace(tzinfo=None)


def _timestamp(value: datetime | str | None) -> datetime | None:
    """A stored timestamp, aware (UTC). SQLite converts a TIMESTAMP column it can trace to its
    declaration; a value through a join of a subquery may come back as its text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return _aware(value)
