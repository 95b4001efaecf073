"""The PostgreSQL back-end: a psycopg 3 pool whose reconnect delay is capped, advisory locks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from storage.composed import Database
from storage.core import POSTGRES, Reachability, Transaction
from storage.records import ClearPayloads, DatabaseError, PayloadSealer

log = logging.getLogger("database")

_MIGRATION_LOCK_ID = 7_266_133_001  # any constant: serialises concurrent boots on PostgreSQL
_LEASE_LOCK_SPACE = 72_661_330  # any constant: the first key of the sessions' advisory locks
_EVENTS_LOCK_SPACE = 72_661_331  # ... and of the locks that make a session's events commit in id order

RECONNECT_DELAY_CAP_SECONDS = 2.0
# A caller waits for a pooled connection in slices this long: when the database is found away
# meanwhile (a connection attempt of the pool failed), it stops waiting at the next slice.
WAIT_SLICE_SECONDS = 0.25
# The channel a new command is announced on (payload: its session id); owners LISTEN on it.
COMMANDS_CHANNEL = "zapkeep_commands"
# While the database is known away, a caller waits at most this long for a connection (one that the
# pool's reconnect attempts got back); then it fails, and the API answers 503 at once.
AWAY_WAIT_SECONDS = 0.5


def _connection_pool(
    url: str, delay_cap: float | None, reachability: Reachability | None = None, **options: Any
) -> Any:
    """psycopg_pool's ConnectionPool, with the delay between reconnect attempts capped.

    The pool retries a lost connection with a doubling delay (1, 2, 4, 8, 16... s, for
    ``reconnect_timeout``), and a caller waiting for a connection starts no attempt of its own while
    one is scheduled: after an outage the daemon stayed away until the next attempt, up to half as
    long again as the outage (a 40 s outage: usable 20.3 s after the database was back; capped at
    2 s: 0.8 s, bench/bench_db_outage.py). A refused connect costs next to nothing.
    """
    from psycopg_pool import ConnectionPool
    from psycopg_pool.base import AttemptWithBackoff

    if delay_cap is None:  # psycopg_pool's own series, for the bench's side-by-side
        return ConnectionPool(url, **options)

    class CappedBackoff(AttemptWithBackoff):
        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, delay_cap)

    class Pool(ConnectionPool):
        # (A private hook of psycopg_pool 3.x: each reconnect series starts here with attempt=None.)
        def _add_connection(self, attempt: Any, growing: bool = False) -> None:
            super()._add_connection(attempt or CappedBackoff(timeout=self.reconnect_timeout), growing)

        # (Another: every new connection, the pool's reconnect attempts included, is made here.)
        def _connect(self, timeout: float | None = None) -> Any:
            try:
                conn = super()._connect(timeout)
            except Exception:
                if reachability is not None:
                    reachability.lost()
                raise
            if reachability is not None:
                reachability.reached()
            return conn

    return Pool(url, **options)


class PostgresDatabase(Database):
    backend = "postgresql"
    dialect = POSTGRES
    NOW = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        connect_timeout: float = 10.0,
        wait_timeout: float = 10.0,
        reconnect_delay_cap: float | None = RECONNECT_DELAY_CAP_SECONDS,
        sealer: PayloadSealer | None = None,
    ) -> None:
        self.sealer = sealer or ClearPayloads()
        self._url = url
        self._connect_timeout = connect_timeout
        self._wait_timeout = wait_timeout
        self.reachability = Reachability(on_lost=self._drop_broken_idle)
        # wait_for_commands' own connection (LISTEN holds a connection for as long as it listens:
        # never one of the pool's), kept from one wait to the next so no notification falls between.
        self._listener: Any = None
        self._listener_lock = threading.Lock()
        self._listener_closing = threading.Event()
        self.pool = _connection_pool(
            url,
            reconnect_delay_cap,
            self.reachability,
            open=False,
            min_size=1,
            max_size=max_size,
            # No check before each checkout (an extra round trip on every write): idle connections
            # are recycled, and one found broken fails its caller as "database away" and is dropped.
            max_idle=60,
            max_lifetime=1800,
            timeout=wait_timeout,  # a caller waits this long for a connection, not psycopg's 30 s
            kwargs={"connect_timeout": max(1, int(connect_timeout))},
            name="zapkeep",
        )

    # Row locks (see Database.SELECT_KEY_MARKER): SQLite runs one write transaction at a time anyway.
    SELECT_KEY_MARKER = Database.SELECT_KEY_MARKER + " FOR SHARE"
    SELECT_MARKER_TO_RESEAL = Database.SELECT_MARKER_TO_RESEAL + " FOR UPDATE"

    def _open(self) -> None:
        from psycopg_pool import PoolTimeout

        self.pool.open()
        try:
            self.pool.wait(timeout=self._connect_timeout)
        except PoolTimeout as exc:
            self.pool.close()
            raise DatabaseError(
                f"cannot connect to PostgreSQL within {self._connect_timeout:.0f} s\n"
                "Check DATABASE_URL and that the database is running."
            ) from exc

    def close(self) -> None:
        self._stop_listening()
        self.pool.close()

    @property
    def unreachable_since(self) -> datetime | None:
        return self.reachability.unreachable_since

    def _drop_broken_idle(self) -> None:
        """The connections idle in the pool when the database went away are broken too: replaced
        now (in the background), not one by one after it is back, each failing its caller and
        calling the database away again."""

        def check() -> None:
            try:
                self.pool.check()
            except Exception as exc:  # (the pool is closing)
                log.debug("checking the idle connections failed: %s", exc)

        threading.Thread(target=check, name="pool-check", daemon=True).start()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        from psycopg import OperationalError
        from psycopg.rows import dict_row

        conn = self._checkout()
        try:
            with conn, conn.transaction():  # (as the pool's own connection() does)
                cursor = conn.cursor(row_factory=dict_row)
                yield Transaction(cursor.execute, cursor.executemany)
        except OperationalError:
            if conn.broken:  # the server went away under it (not a statement refused)
                self.reachability.lost()
            raise
        finally:
            self.pool.putconn(conn)
        self.reachability.reached()

    def _checkout(self) -> Any:
        """A pooled connection: waited for up to the pool's timeout, or only briefly while the
        database is known to be away (then PoolTimeout, which the API answers with 503)."""
        from psycopg_pool import PoolTimeout

        deadline = time.monotonic() + self._wait_timeout
        while True:
            away = self.reachability.unreachable_since is not None
            left = deadline - time.monotonic()
            wait = min(left, AWAY_WAIT_SECONDS if away else WAIT_SLICE_SECONDS)
            try:
                return self.pool.getconn(timeout=max(wait, 0.001))
            except PoolTimeout:
                if away:
                    raise PoolTimeout("the database is unreachable") from None
                if time.monotonic() >= deadline:  # (busy, or away: the pool's attempts tell which)
                    raise PoolTimeout(f"no database connection within {self._wait_timeout:.0f} s") from None

    def json_param(self, text: str) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(text, dumps=_already_json)

    def _lock_for_migration(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))

    # Advisory locks, not a lock on the lease row: they cost no WAL, and a session's writes share
    # theirs while a take-over needs it alone. The check itself is in each write's own statement,
    # which (read committed) sees any take-over that committed before the lock was granted.
    HOLD_OFF_TAKE_OVERS = (
        "SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s)) AS locked, "
        "EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now"
    )
    LOCK_FOR_TAKE_OVER = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"

    def _one_snapshot(self, tx: Transaction) -> None:
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # (SQLite's transactions are serial)

    def _hold_off_take_overs(self, tx: Transaction, session_id: str) -> float:
        row = tx.execute(self.HOLD_OFF_TAKE_OVERS, (_LEASE_LOCK_SPACE, session_id)).fetchone()
        return row["now"]

    def _lock_for_take_over(self, tx: Transaction, session_id: str) -> None:
        tx.execute(self.LOCK_FOR_TAKE_OVER, (_LEASE_LOCK_SPACE, session_id))

    def _lock_events(self, tx: Transaction, session_id: str) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_EVENTS_LOCK_SPACE, session_id))

    # --- commands: announced at commit with NOTIFY, heard with LISTEN on a dedicated connection ---

    NOTIFY_COMMANDS = "SELECT pg_notify(%s, %s)"
    LISTEN_COMMANDS = f"LISTEN {COMMANDS_CHANNEL}"

    def _notify_commands(self, tx: Transaction, session_id: str) -> None:
        tx.execute(self.NOTIFY_COMMANDS, (COMMANDS_CHANNEL, session_id))  # (delivered at commit, never before)

    def wait_for_commands(self, timeout: float) -> bool:
        """True when a command was announced within ``timeout``, and also when listening has just
        (re)started: what was announced before was not heard, so the owner looks at once. While the
        database is away: False after ``timeout``; the next call connects again."""
        import psycopg

        with self._listener_lock:
            if self._listener_closing.is_set():
                self._close_listener()  # (if close() could not wait for this thread)
                return False
            if self._listener is None:
                try:
                    self._listener = self._listen()
                except psycopg.Error as exc:
                    log.debug("cannot listen for commands (trying again at the next wait): %s", exc)
                    self._listener_closing.wait(timeout)
                    return False
                return True
            try:
                return any(True for _ in self._listener.notifies(timeout=timeout, stop_after=1))
            except psycopg.Error as exc:  # the server went away under it
                log.debug("the connection listening for commands broke: %s", exc)
                self._close_listener()
                return True

    def _listen(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)))
        try:
            conn.execute(self.LISTEN_COMMANDS)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            conn.close()

    def _stop_listening(self) -> None:
        """End a wait in progress (a NOTIFY of our own wakes it) and close its connection."""
        self._listener_closing.set()
        if not self._listener_lock.acquire(blocking=False):
            try:
                with self.transaction() as tx:
                    tx.execute(self.NOTIFY_COMMANDS, (COMMANDS_CHANNEL, ""))
            except Exception as exc:  # (the database is away: the wait ends at its timeout)
                log.debug("could not wake the wait for commands: %s", exc)
            if not self._listener_lock.acquire(timeout=self._connect_timeout):
                return  # (a wait stuck on a dead connection: its thread closes nothing more after this)
        try:
            self._close_listener()
        finally:
            self._listener_lock.release()


def _already_json(text: str) -> str:
    return text
