"""The transaction core every concern's queries stand on, and the fence of session writes.

``DatabaseCore`` names what a back-end provides (``storage.postgres``, ``storage.sqlite``): its
transactions, its JSON type and its locks; each concern's queries (a mixin of ``storage``) use them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from storage.records import ChatState, ClearPayloads, Fence, FencedOut, PayloadSealer

T = TypeVar("T")
log = logging.getLogger("database")

# "%s OR EXISTS (...)": the first parameter is True for an unfenced (admin) write.
FENCE_HOLDS = """(%s OR EXISTS (SELECT 1 FROM whatsapp_session_leases
        WHERE session_id = %s AND owner_id = %s AND fencing_token = %s AND expires_at > %s))"""


@dataclass(frozen=True)
class Dialect:
    """What a back-end's schema text differs in (``storage.upgrades``)."""

    name: str  # postgresql | sqlite
    serial_key: str  # an auto-incremented primary key
    big_serial_key: str  # ... of 64 bits where the back-end tells them apart
    blob: str  # bytes


POSTGRES = Dialect("postgresql", "SERIAL PRIMARY KEY", "BIGSERIAL PRIMARY KEY", "BYTEA")
SQLITE = Dialect("sqlite", "INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB")


class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


class Transaction:
    """One open transaction; rows come back as dicts (mapped to dataclasses by the caller)."""

    def __init__(self, execute: Any, executemany: Any) -> None:
        self._execute = execute
        self._executemany = executemany

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        return self._execute(query, params)

    def executemany(self, query: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self._executemany(query, params)

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(query, params).fetchone()
        return None if row is None else next(iter(row.values()))

    def one(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> T | None:
        row = self.execute(query, params).fetchone()
        return None if row is None else cls(**row)

    def all(self, cls: type[T], query: str, params: Sequence[Any] = ()) -> list[T]:
        return [cls(**row) for row in self.execute(query, params).fetchall()]


class Reachability:
    """Whether the database answers: unreachable from the first call (or connection attempt) that
    could not reach it until the next one that did. Callers that meet a database known to be away
    fail at once instead of waiting out the pool's timeout each."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._since: datetime | None = None
        self._on_lost = on_lost

    @property
    def unreachable_since(self) -> datetime | None:
        return self._since

    def lost(self) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = datetime.now(UTC)
        log.warning("the database is unreachable; callers fail at once until it answers again")
        if self._on_lost is not None:
            self._on_lost()

    def reached(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            away = (datetime.now(UTC) - since).total_seconds()
            log.info("the database answers again after %.1f s", away)


class DatabaseCore:
    """What every concern's queries stand on: the back-end's transactions, its JSON type, the
    payload sealer, and the fence that every write of a session made under a lease carries."""

    backend = "abstract"
    dialect: Dialect
    sealer: PayloadSealer = ClearPayloads()
    NOW = ""  # the database's clock in unix seconds; leases never trust a host's clock

    @property
    def unreachable_since(self) -> datetime | None:
        """Since when the database has been found unreachable; None while it answers (the
        embedded SQLite file is never "away": a busy one is waited for)."""
        return None

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        raise NotImplementedError
        yield

    def json_param(self, text: str) -> Any:
        """Bind an already-serialised JSON document as this back-end's JSON type."""
        raise NotImplementedError

    def _lock_for_migration(self, tx: Transaction) -> None:
        """Make concurrent boots migrate one at a time."""

    def _one_snapshot(self, tx: Transaction) -> None:
        """Make every statement of this (read) transaction see the same committed state."""

    # --- fencing: every write of a session made under a lease proves the lease still holds ---

    FENCE_HOLDS = FENCE_HOLDS
    SELECT_FENCE_HOLDS = f"SELECT {FENCE_HOLDS} AS holds"

    def _fence_params(self, tx: Transaction, session_id: str, fence: Fence | None) -> tuple[Any, ...]:
        """Hold off take-overs of the session until this write has committed (so the token that
        FENCE_HOLDS checks cannot change under the write); the parameters of FENCE_HOLDS."""
        if fence is None:
            return (True, session_id, "", 0, 0.0)
        if fence.session_id != session_id:
            raise FencedOut(f"a fence for session {fence.session_id} cannot write session {session_id}")
        return (False, session_id, fence.owner_id, fence.token, self._hold_off_take_overs(tx, session_id))

    def _hold_off_take_overs(self, tx: Transaction, session_id: str) -> float:
        """Returns the database's clock; the back-end makes a concurrent take-over wait."""
        raise NotImplementedError

    def _lock_for_take_over(self, tx: Transaction, session_id: str) -> None:
        """A take-over waits for every fenced write in flight (see ``_hold_off_take_overs``)."""

    def _lock_events(self, tx: Transaction, session_id: str) -> None:
        """Until this transaction ends, no other takes an event id of the session: ids then commit
        in order, so a reader that has seen id N never sees an N-1 appear later (SQLite's
        transactions are serial already)."""

    def _require_fence(self, tx: Transaction, fence: Fence | None, params: tuple[Any, ...]) -> None:
        if fence is not None and not tx.scalar(self.SELECT_FENCE_HOLDS, params):
            raise self._fenced_out(fence)

    @staticmethod
    def _fenced_out(fence: Fence) -> FencedOut:
        return FencedOut(
            f"session {fence.session_id}: fencing token {fence.token} is no longer valid; "
            "another instance owns the session"
        )

    # --- events: written by every concern, in the transaction of their cause (read: storage.events) ---

    INSERT_EVENT = """
        INSERT INTO whatsapp_events (session_id, event_type, chat_jid, payload, created_at) VALUES (%s, %s, %s, %s, %s)
    """

    def _event(self, tx: Transaction, session_id: str, event_type: str, chat_jid: str | None, payload: dict) -> None:
        """An event for webhooks and the event stream, in the transaction of what caused it."""
        text = json.dumps(payload, ensure_ascii=False, default=_json_default)
        self._lock_events(tx, session_id)
        tx.execute(self.INSERT_EVENT, (session_id, event_type, chat_jid, self.json_param(text), _utcnow()))


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _utcnow() -> datetime:
    # Stored naive, in UTC, to fit the seed's TIMESTAMP columns on both back-ends.
    return datetime.now(UTC).replace(tzinfo=None)


def _naive(value: datetime | None) -> datetime | None:
    """Aware -> naive UTC, the form every TIMESTAMP column holds."""
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def _aware_chat(chat: ChatState) -> ChatState:
    return replace(
        chat,
        last_incoming_at=_aware(chat.last_incoming_at),
        paused_until=_aware(chat.paused_until),
        last_reply_at=_aware(chat.last_reply_at),
    )
