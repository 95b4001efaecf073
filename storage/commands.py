"""Commands: an API write for a session that another instance hosts, kept in the database until
its owner has executed it (``whatsapp_session_commands``).

The command is the request itself (method, path, query, content type, body); the owner replays it
against its own API and stores the answer. Claims are fenced by the owner's lease, in the claim's
own statement, so an instance that lost the session claims nothing. A claimed command is never
handed to another owner: it may have acted already (a message sent), and doing it twice is worse
than an answer that never comes (the requester was told 202 and the command id).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from storage.core import DatabaseCore, Transaction, _aware, _naive, _utcnow
from storage.records import Command, CommandRequest, Fence

COMMAND_COLUMNS = (
    "id, session_id, method, path, query, content_type, body, created_at, claimed_by, claimed_at, finished_at,"
    " status_code, answer"
)


class CommandQueries(DatabaseCore):
    """whatsapp_session_commands: enqueued by any instance, claimed and answered by the owner."""

    INSERT_COMMAND = """
        INSERT INTO whatsapp_session_commands (session_id, method, path, query, content_type, body, created_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        RETURNING id
    """

    def enqueue_command(self, session_id: str, request: CommandRequest) -> int:
        """A command for the session's owner; its id. On PostgreSQL, a NOTIFY of the session id on
        ``zapkeep_commands`` wakes the owners' ``wait_for_commands`` when it commits."""
        params = (session_id, request.method, request.path, request.query, request.content_type, request.body)
        with self.transaction() as tx:
            command_id = int(tx.scalar(self.INSERT_COMMAND, (*params, _utcnow())))
            self._notify_commands(tx, session_id)
        return command_id

    def _notify_commands(self, tx: Transaction, session_id: str) -> None:
        """Wake the waiting owners at this transaction's commit (PostgreSQL; SQLite's poll)."""

    # Only sessions with a waiting command are looked at, through the partial index: an owner of
    # a hundred sessions polls with one small read, and takes a fence's lock only where it claims.
    WAITING_SESSIONS = "SELECT DISTINCT session_id FROM whatsapp_session_commands WHERE claimed_by IS NULL"
    CLAIM_COMMANDS = f"""
        UPDATE whatsapp_session_commands SET claimed_by = %s, claimed_at = %s
        WHERE session_id = %s AND claimed_by IS NULL AND {DatabaseCore.FENCE_HOLDS}
        RETURNING {COMMAND_COLUMNS}
    """

    def claim_commands(self, owner_id: str, fences: Sequence[Fence]) -> list[Command]:
        """The waiting commands of the sessions these fences still hold, now claimed by
        ``owner_id``, oldest first. The lease is checked in the claim's own statement (and a
        take-over waits for it to commit): a fence no longer valid claims nothing and raises nothing."""
        by_session = {fence.session_id: fence for fence in fences}
        claimed: list[Command] = []
        with self.transaction() as tx:
            waiting = {row["session_id"] for row in tx.execute(self.WAITING_SESSIONS).fetchall()}
            for session_id in sorted(waiting & by_session.keys()):
                fence_params = self._fence_params(tx, session_id, by_session[session_id])
                params = (owner_id, _utcnow(), session_id, *fence_params)
                claimed += [_command(row) for row in tx.execute(self.CLAIM_COMMANDS, params).fetchall()]
        return sorted(claimed, key=lambda c: c.id)

    # Only the first answer counts (an owner that lost the session mid-way may answer late).
    FINISH_COMMAND = """
        UPDATE whatsapp_session_commands SET finished_at = %s, status_code = %s, answer = %s, body = %s
        WHERE id = %s AND finished_at IS NULL
    """

    def finish_command(self, command_id: int, status_code: int, answer: dict) -> None:
        """Store the command's answer (status and JSON body) for the instance waiting on it; the
        request's body goes (an import carries a whole session's credentials, a send a file)."""
        text = json.dumps(answer, ensure_ascii=False)
        with self.transaction() as tx:
            tx.execute(self.FINISH_COMMAND, (_utcnow(), status_code, text, b"", command_id))

    SELECT_COMMAND = f"SELECT {COMMAND_COLUMNS} FROM whatsapp_session_commands WHERE id = %s"

    def command(self, command_id: int) -> Command | None:
        with self.transaction() as tx:
            row = tx.execute(self.SELECT_COMMAND, (command_id,)).fetchone()
        return None if row is None else _command(row)

    PRUNE_COMMANDS = "DELETE FROM whatsapp_session_commands WHERE finished_at IS NOT NULL AND finished_at < %s"

    def prune_commands(self, before: datetime) -> int:
        """Forget finished commands older than ``before``; waiting and claimed ones stay."""
        with self.transaction() as tx:
            return tx.execute(self.PRUNE_COMMANDS, (_naive(before),)).rowcount

    def wait_for_commands(self, timeout: float) -> bool:
        """Wait until commands may be waiting, at most ``timeout`` seconds; True: look now
        (``claim_commands``). PostgreSQL: LISTEN (True when notified, or when listening just
        began, since anything before it was not heard); SQLite: a poll every ``timeout``. For one
        waiting thread; ``close`` ends a wait early."""
        raise NotImplementedError


def _command(row: dict[str, Any]) -> Command:
    answer = row["answer"]
    return Command(
        id=int(row["id"]),
        session_id=row["session_id"],
        method=row["method"],
        path=row["path"],
        query=row["query"],
        content_type=row["content_type"],
        body=bytes(row["body"]),
        created_at=_aware(row["created_at"]),
        claimed_by=row["claimed_by"],
        claimed_at=_aware(row["claimed_at"]),
        finished_at=_aware(row["finished_at"]),
        status_code=row["status_code"],
        answer=None if answer is None else json.loads(answer),
    )
