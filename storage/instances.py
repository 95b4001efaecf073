"""The instances sharing the sessions: each process beats, by the database's clock, in the same
statement that renews every lease it holds (one statement per renewal, however many sessions it
owns), and sees the others whose heartbeat is younger than a lease's life."""

from __future__ import annotations

import json

from storage.core import DatabaseCore
from storage.records import Fence, InstanceInfo, LeaseInfo


class InstanceQueries(DatabaseCore):
    """whatsapp_instances, and the leases seen across instances."""

    # PostgreSQL: one round trip. The heartbeat is a data-modifying CTE (it runs whether or not any
    # lease matches); the leases held come as one JSON array of {session_id, fencing_token}.
    BEAT_AND_RENEW_POSTGRES = """
        WITH clock AS (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now, %s::text AS instance),
        beat AS (
            INSERT INTO whatsapp_instances (instance_id, started_at, heartbeat_at, max_sessions)
            SELECT clock.instance, clock.now, clock.now, %s FROM clock WHERE %s
            ON CONFLICT (instance_id) DO UPDATE SET
                heartbeat_at = excluded.heartbeat_at, max_sessions = excluded.max_sessions
        ),
        held AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS h(session_id TEXT, fencing_token BIGINT))
        UPDATE whatsapp_session_leases SET expires_at = clock.now + %s, renewed_at = clock.now
        FROM clock, held
        WHERE whatsapp_session_leases.session_id = held.session_id
          AND whatsapp_session_leases.fencing_token = held.fencing_token
          AND whatsapp_session_leases.owner_id = clock.instance
          AND whatsapp_session_leases.expires_at > clock.now
        RETURNING whatsapp_session_leases.session_id
    """

    # SQLite (in the process: no round trips to save) does the same in one transaction.
    BEAT = """
        INSERT INTO whatsapp_instances (instance_id, started_at, heartbeat_at, max_sessions)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (instance_id) DO UPDATE SET
            heartbeat_at = excluded.heartbeat_at, max_sessions = excluded.max_sessions
    """
    RENEW_HELD_SQLITE = """
        UPDATE whatsapp_session_leases SET expires_at = %s, renewed_at = %s
        WHERE owner_id = %s AND expires_at > %s
          AND EXISTS (SELECT 1 FROM json_each(%s) h
                      WHERE json_extract(h.value, '$.session_id') = whatsapp_session_leases.session_id
                        AND json_extract(h.value, '$.fencing_token') = whatsapp_session_leases.fencing_token)
        RETURNING session_id
    """

    def beat_and_renew(
        self, instance_id: str, held: list[Fence], ttl_seconds: float, max_sessions: int, *, beat: bool = True
    ) -> set[str]:
        """This instance's heartbeat, and every lease in ``held`` (its own) extended by
        ``ttl_seconds``; returns the sessions renewed (a lease missing from it expired or was taken:
        never revived). ``beat=False``: the leases alone (an instance that signed off and is still
        storing and releasing its sessions)."""
        mine = [{"session_id": f.session_id, "fencing_token": f.token} for f in held if f.owner_id == instance_id]
        fences = json.dumps(mine)
        with self.transaction() as tx:
            if self.dialect.name == "postgresql":
                params: tuple[object, ...] = (instance_id, max_sessions, beat, fences, ttl_seconds)
                rows = tx.execute(self.BEAT_AND_RENEW_POSTGRES, params).fetchall()
            else:
                now = tx.scalar(self.NOW)
                if beat:
                    tx.execute(self.BEAT, (instance_id, now, now, max_sessions))
                params = (now + ttl_seconds, now, instance_id, now, fences)
                rows = tx.execute(self.RENEW_HELD_SQLITE, params).fetchall()
        return {row["session_id"] for row in rows}

    LEAVE = "DELETE FROM whatsapp_instances WHERE instance_id = %s"
    # Instances gone for a day are forgotten (a crash never says goodbye).
    FORGET_GONE = "DELETE FROM whatsapp_instances WHERE heartbeat_at < %s"

    def leave(self, instance_id: str) -> None:
        """A graceful stop: the others count one instance fewer at once (and take its share)."""
        with self.transaction() as tx:
            tx.execute(self.LEAVE, (instance_id,))
            tx.execute(self.FORGET_GONE, (tx.scalar(self.NOW) - 86400.0,))

    SELECT_LIVE_INSTANCES = """
        SELECT i.instance_id, i.started_at, %s - i.heartbeat_at AS heartbeat_age_seconds, i.max_sessions,
               (SELECT COUNT(*) FROM whatsapp_session_leases l
                WHERE l.owner_id = i.instance_id AND l.expires_at > %s) AS sessions_owned
        FROM whatsapp_instances i
        WHERE i.heartbeat_at > %s
        ORDER BY i.started_at, i.instance_id
    """

    def live_instances(self, ttl_seconds: float) -> list[InstanceInfo]:
        """The instances whose heartbeat is younger than ``ttl_seconds`` (a lease's life: an
        instance is gone when the leases it renewed with its last beat have run out)."""
        with self.transaction() as tx:
            now = tx.scalar(self.NOW)
            return tx.all(InstanceInfo, self.SELECT_LIVE_INSTANCES, (now, now, now - ttl_seconds))

    SELECT_LEASES = """
        SELECT session_id, owner_id, fencing_token, expires_at - %s AS expires_in_seconds
        FROM whatsapp_session_leases ORDER BY session_id
    """

    def leases(self) -> list[LeaseInfo]:
        """Every session's lease (a session never owned has none)."""
        with self.transaction() as tx:
            return tx.all(LeaseInfo, self.SELECT_LEASES, (tx.scalar(self.NOW),))
