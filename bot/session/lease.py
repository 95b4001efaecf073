"""This process's ownership lease of one session: taken when free, renewed, given up in time.

Only the lease holder talks to WhatsApp and writes the session. The holder renews every
``renew_seconds``; if it cannot (the database is unreachable), ``check()`` declares the lease
lost once ``ttl - renew`` seconds have passed since the last renewal, before the lease can
expire in the database and another process take it. A lost lease is never renewed: the
process must acquire a new one, with a new fencing token.

A host sharing sessions with other instances (``bot.host``) keeps the leases itself: it renews all
of them in one statement (``renewed``/``refused`` report the outcome here) and decides which
sessions to take; such a keeper (``own_thread=False``) runs no thread and never retries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bot.process.errors import first_line
from bot.session.state import StandbyCause
from bot.process.logs import session_thread
from database import Database, Fence

log = logging.getLogger("bot.lease")  # pinned: the name operators see in log lines


class LeaseKeeper:
    def __init__(
        self,
        db: Database,
        session_id: str,
        owner_id: str,
        *,
        ttl_seconds: float,
        renew_seconds: float,
        poll_seconds: float,
        on_acquired: Callable[[Fence, float | None], None],
        on_lost: Callable[[str], None],
        on_standby: Callable[[], None],
        own_thread: bool = True,
    ) -> None:
        self.db = db
        self.session_id = session_id
        self.owner_id = owner_id
        self._ttl = ttl_seconds
        self._renew_every = renew_seconds
        self._poll_every = poll_seconds
        self._on_acquired = on_acquired  # (fence, seconds waited in standby); raising gives the lease up
        self._on_lost = on_lost
        self._on_standby = on_standby
        self._lock = threading.Lock()
        self._fence: Fence | None = None
        self._renewed_at = 0.0  # monotonic time of the last successful acquire or renewal
        self._attempted_at = 0.0  # ... and of the last attempt, successful or not
        self._standby_since: float | None = None
        self._standby_cause: StandbyCause | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._own_thread = own_thread
        self._thread = session_thread(session_id, self._run, "lease")

    @property
    def fence(self) -> Fence | None:
        return self._fence

    @property
    def standby_cause(self) -> StandbyCause | None:
        """Why the lease is not held (None while it is)."""
        return None if self._fence is not None else self._standby_cause

    def fresh(self) -> bool:
        """Held, and renewed recently enough that it cannot have expired in the database yet."""
        return self._fence is not None and time.monotonic() - self._renewed_at < self._ttl - self._renew_every

    def start(self) -> None:
        if self._own_thread:
            self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the lease stays held until released or expired)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def try_acquire(self) -> bool:
        """Take the lease if it is free (then ``on_acquired`` runs); else report standby."""
        # Timed from before the call: the database counts the lease's life from its statement, and
        # a slow answer must not make this process think the lease lasts longer than it does.
        requested = time.monotonic()
        try:
            fence = self.db.acquire_lease(self.session_id, self.owner_id, self._ttl)
        except Exception as exc:
            log.warning("session %s: cannot reach the database for the lease: %s", self.session_id, first_line(exc))
            self._standby(StandbyCause.DATABASE)
            return False
        if fence is None:
            self._standby(self._holder_cause())
            return False
        with self._lock:
            self._fence = fence
            self._renewed_at = self._attempted_at = requested
            waited = None if self._standby_since is None else time.monotonic() - self._standby_since
            self._standby_since = None
        if waited is not None:
            log.info(
                "session %s: took over after %.1f s in standby (fencing token %d)", self.session_id, waited, fence.token
            )
        try:
            self._on_acquired(fence, waited)
        except Exception as exc:
            log.error("session %s: taking over failed: %s", self.session_id, first_line(exc))
            self.lose(f"taking over failed: {first_line(exc)}", fence)
            try:  # no client was started yet: another instance (one with the key, say) may take it now
                self.db.release_lease(fence)
            except Exception as release_failure:  # the database is away: the lease runs out instead
                log.debug("releasing after a failed take-over: %s", release_failure)
            return False
        return True

    def lose(self, reason: str, fence: Fence | None = None, cause: StandbyCause = StandbyCause.LOST) -> None:
        """Give the lease up in this process. With ``fence``, only if that is still the one held: a
        late failure of an older lease's write says nothing about a newer lease."""
        with self._lock:
            if self._fence is None or (fence is not None and fence != self._fence):
                return
            self._fence = None
            self._standby_cause = cause
        log.error("session %s: %s", self.session_id, reason)
        self._on_lost(reason)
        self._wake.set()

    def overdue(self) -> bool:
        """Held here, and not renewed in time: ``check`` gives it up."""
        return self._fence is not None and not self.fresh()

    def check(self) -> None:
        """The watchdog, independent of renewals (which may hang on an unreachable database)."""
        if self._fence is not None and not self.fresh():
            self.lose(
                "cannot renew the lease (database unreachable); disconnected so that no "
                "other instance ever overlaps with this one",
                cause=StandbyCause.NOT_RENEWED,
            )

    def release(self) -> None:
        """Hand the session over at once (graceful shutdown, after the final backup)."""
        with self._lock:
            fence, self._fence = self._fence, None
        if fence is None:
            return
        try:
            if self.db.release_lease(fence):
                log.info("session %s: lease released", self.session_id)
        except Exception as exc:
            log.warning(
                "session %s: could not release the lease (it expires by itself): %s", self.session_id, first_line(exc)
            )

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._fence is None:
                if self.try_acquire():
                    continue
                delay = self._poll_every
            else:
                delay = self._renewal_delay()
            self._wake.wait(delay)
            self._wake.clear()
            if not self._stopping.is_set() and self._fence is not None:
                self._renew()

    def _renewal_delay(self) -> float:
        """Renewals are due ``renew_seconds`` after the last one, counted from when it was asked
        for: a take-over that spent that long restoring the session is renewed at once, not a whole
        interval later (by then the lease could have run out in the database). Behind schedule
        (failed renewals), one attempt a second."""
        now = time.monotonic()
        due = self._renewed_at + self._renew_every
        if due <= now:
            due = self._attempted_at + 1.0
        return max(0.0, due - now)

    def renewed(self, fence: Fence, requested_at: float) -> None:
        """The host renewed ``fence`` with a statement sent at ``requested_at`` (monotonic)."""
        with self._lock:
            if self._fence == fence:
                self._renewed_at = max(self._renewed_at, requested_at)
                self._attempted_at = max(self._attempted_at, requested_at)

    def refused(self, fence: Fence) -> None:
        """The host's renewal did not find ``fence`` valid: it expired or another instance took it."""
        self.lose("lease lost: another instance owns the session now", fence, StandbyCause.HELD_ELSEWHERE)

    def renew_now(self) -> bool:
        """Renew at once, on the lease thread (a long take-over held renewals up); true if the lease
        is held and fresh afterwards."""
        self._renew()
        return self.fresh()

    def _renew(self) -> None:
        fence = self._fence
        if fence is None:
            return  # lost meanwhile (the watchdog runs on another thread)
        requested = self._attempted_at = time.monotonic()  # (see try_acquire)
        try:
            renewed = self.db.renew_lease(fence, self._ttl)
        except Exception as exc:
            log.warning("session %s: lease renewal failed: %s", self.session_id, first_line(exc))
            return  # check() gives the lease up in time if this goes on
        if self._fence != fence:
            return  # lost while the call was under way: the old lease just runs out
        if renewed:
            self._renewed_at = requested
        else:
            self.lose("lease lost: another instance owns the session now", fence, StandbyCause.HELD_ELSEWHERE)

    def _holder_cause(self) -> StandbyCause:
        """The lease was not free: another instance's, or this one's own that it gave up when it
        could not renew it (it stays in the database until it runs out)."""
        try:
            holder = getattr(self.db.lease(self.session_id), "owner_id", None)
        except Exception:
            return StandbyCause.DATABASE
        return StandbyCause.OWN_LEASE if holder == self.owner_id else StandbyCause.HELD_ELSEWHERE

    def _standby(self, cause: StandbyCause) -> None:
        with self._lock:
            first_time = self._standby_since is None
            if first_time:
                self._standby_since = time.monotonic()
            self._standby_cause = cause
        self._on_standby()
        if first_time:
            log.info("session %s: standing by (%s)", self.session_id, cause.value)
