"""Ownership leases: which instance runs a session, proven by a fencing token that grows at each take-over."""

from __future__ import annotations

from storage.core import DatabaseCore
from storage.records import Fence, LeaseInfo


class LeaseQueries(DatabaseCore):
    """whatsapp_session_leases, by the database's clock (never a host's)."""

    ACQUIRE_LEASE = """
        INSERT INTO whatsapp_session_leases (session_id, owner_id, fencing_token, expires_at, acquired_at, renewed_at)
        VALUES (%s, %s, 1, %s, %s, %s)
        ON CONFLICT (session_id) DO UPDATE SET
            owner_id = excluded.owner_id,
            fencing_token = whatsapp_session_leases.fencing_token + 1,
            expires_at = excluded.expires_at,
            acquired_at = excluded.acquired_at,
            renewed_at = excluded.renewed_at
        WHERE whatsapp_session_leases.owner_id IS NULL OR whatsapp_session_leases.expires_at <= excluded.acquired_at
        RETURNING fencing_token
    """

    SELECT_DELETED = "SELECT 1 FROM whatsapp_session_registry WHERE session_id = %s AND deleted_at IS NOT NULL"

    def acquire_lease(self, session_id: str, owner_id: str, ttl_seconds: float) -> Fence | None:
        """Take the session if nobody holds it (or the holder let it expire); each take-over gets a
        larger fencing token. None: a live owner holds it, or the session was deleted (nobody may
        take a deleted session: a standby would restore and store it again)."""
        with self.transaction() as tx:
            self._lock_for_take_over(tx, session_id)
            if tx.scalar(self.SELECT_DELETED, (session_id,)) is not None:
                return None
            now = tx.scalar(self.NOW)
            token = tx.scalar(self.ACQUIRE_LEASE, (session_id, owner_id, now + ttl_seconds, now, now))
        return None if token is None else Fence(session_id, owner_id, token)

    RENEW_LEASE = """
        UPDATE whatsapp_session_leases SET expires_at = %s, renewed_at = %s
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s AND expires_at > %s
    """

    def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        """Extend a lease still held; False once it expired or was taken (never revived: re-acquire)."""
        with self.transaction() as tx:
            now = tx.scalar(self.NOW)
            params = (now + ttl_seconds, now, fence.session_id, fence.owner_id, fence.token, now)
            return tx.execute(self.RENEW_LEASE, params).rowcount == 1

    RELEASE_LEASE = """
        UPDATE whatsapp_session_leases SET owner_id = NULL, expires_at = %s
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s
    """

    def release_lease(self, fence: Fence) -> bool:
        """Hand the session over at once (graceful shutdown); False if it was no longer ours."""
        with self.transaction() as tx:
            now = tx.scalar(self.NOW)
            return tx.execute(self.RELEASE_LEASE, (now, fence.session_id, fence.owner_id, fence.token)).rowcount == 1

    SELECT_LEASE = """
        SELECT session_id, owner_id, fencing_token, expires_at - %s AS expires_in_seconds
        FROM whatsapp_session_leases WHERE session_id = %s
    """

    def lease(self, session_id: str) -> LeaseInfo | None:
        with self.transaction() as tx:
            return tx.one(LeaseInfo, self.SELECT_LEASE, (tx.scalar(self.NOW), session_id))
