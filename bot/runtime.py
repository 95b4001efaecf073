"""The daemon's runtime for one session: the state machine, the lease, the lifecycle and the
operations the admin API and the CLI call. Its parts (``Backups``, ``Restores``, ``Pairing``, the
``SendGateway`` messaging sends through, the mirror, the lease keeper, the scheduler) are built by
``bot.wiring``; the runtime receives them.

Threads, each with one job:
- ``supervisor`` runs one client round after another (``client.run()`` blocks), applies
  what must happen while no client has the store open (restore, wipe) and waits out the
  reconnect backoff between rounds (``bot.connection.supervisor``);
- ``events`` takes the client's events off a queue (handlers run on Go's thread and must
  return at once) and updates the state;
- ``mirror`` copies every change of the local store into the database (``bot.session.mirror``);
- the APScheduler threads run the reconciliation, the history snapshots and the connection
  watchdog; the ticker runs the lease watchdog and the one-shot jobs. Both are shared by every
  session of a host (``bot.host``); a runtime on its own gets its own.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from apscheduler.schedulers.background import BackgroundScheduler

from bot.connection import events
from bot.session.backups import BackupOutcome, Backups
from bot.process.config import Config
from bot.connection.supervisor import ConnectionSupervisor, Pending
from bot.process.errors import StateConflictError, ZapkeepError, first_line
from bot.connection.gateway import SendGateway
from bot.session.lease import LeaseKeeper
from bot.metrics import Metrics
from bot.session.mirror import Mirror
from bot.connection.pairing import Pairing
from bot.process.deferred import DeferredJobs
from bot.process.ticker import Ticker
from bot.process.retry import RetrySchedule
from bot.session.restores import RestoreRequest, Restores
from bot.session.boot import SessionBoot
from bot.session.live_restore import LiveRestore
from bot.session.state import HISTORY_STATES, Readiness, SessionStatus, State, now, readiness_of
from bot.process.logs import session_thread, working_for
from database import Database, Fence

log = logging.getLogger(__name__)

# Reconnect rounds: 1, 2, 4 ... 60 s, each drawn in [half, whole] ("equal jitter").
RECONNECT = RetrySchedule.exponential(first=1.0, cap=60.0)


@dataclass(frozen=True)
class Timing:
    after_connect_seconds: float = 5.0  # then a reconciliation
    after_pair_seconds: float = 1.0  # then a full snapshot into history
    history_interval_seconds: float = 900.0  # at most this often while the store keeps changing
    mirror_poll_seconds: float = 30.0  # an idle mirror asks the store again this often (commits wake it at once)
    qr_round_seconds: float = 90.0  # no new QR for this long: whatsmeow gave up, start a new round
    qr_check_seconds: float = 5.0  # also how often the reconnect watchdog looks
    reconnect_watchdog_seconds: float = 180.0  # whatsmeow's own reconnect after a drop gets this long
    standby_poll_seconds: float = 1.0  # how often a standby daemon tries to take the lease


MessageHandler = Callable[[events.IncomingMessage], None]
Waiter = Callable[[float], None]


@dataclass(frozen=True)
class RuntimeParts:
    """What a runtime works with; ``bot.wiring`` builds them (with the runtime's own callbacks)."""

    metrics: Metrics
    mirror: Mirror
    lease: LeaseKeeper
    scheduler: BackgroundScheduler
    pairing: Pairing
    backups: Backups
    restores: Restores
    gateway: SendGateway
    ticker: Ticker
    owns_timers: bool = True  # the scheduler and the ticker are this runtime's alone: it stops them


class Runtime(ConnectionSupervisor, LiveRestore, SessionBoot):
    """One session. The connection rounds and the client's events (``ConnectionSupervisor``), the
    live restore and logout (``LiveRestore``) and the boot (``SessionBoot``) are its parts in
    modules of their own; they share its state and its one lock."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client_factory: events.ClientFactory,
        parts: Callable[[Runtime], RuntimeParts],
        *,
        owner_id: str,
        backoff: RetrySchedule = RECONNECT,
        timing: Timing = Timing(),
        wait: Waiter | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        """``parts``: builds the parts from this runtime's callbacks (``bot.wiring``)."""
        self.config = config
        self.db = db
        self._client_factory = client_factory
        self._backoff = backoff
        self._timing = timing
        self._wait = wait or self._wait_for_wake
        self._jitter = jitter or random.Random().random  # its own generator: the global one is shared
        self.message_handlers: list[MessageHandler] = []
        self.receipt_handlers: list[Callable[[events.Receipt], None]] = []  # e.g. the outbox: sent -> read
        self.connected_listeners: list[Callable[[], None]] = []  # e.g. the outbox: send what waited
        # Told every change of state, under the runtime's lock: they must only take note (a queue).
        self.state_listeners: list[Callable[[SessionStatus], None]] = []
        self.take_over_listeners: list[Callable[[], None]] = []  # the lease is ours, before connecting

        self._lock = threading.RLock()
        self._events: queue.Queue[tuple[int, events.ClientEvent] | None] = queue.Queue()
        self._round = 0  # numbers the client rounds; the events of each are tagged with it
        self._live_round: int | None = None  # the round whose events describe the connection now
        self._held = False  # an operator stopped the client: no rounds until started again
        self._needs_restore = False  # the stored rows do not open: no rounds until an operator restores
        self._state_at_shutdown = State.STARTING
        self._supervisor_ending = False  # the supervisor is leaving (replaced, demoted): no new rounds from it
        self._dropped_at: float | None = None  # the live round lost its connection (whatsmeow reconnects)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._client: events.WhatsAppClient | None = None
        self._pending: Pending | None = None
        self._restore_request: RestoreRequest | None = None
        self._failures = 0
        self._status = SessionStatus.initial(config.session_id)
        self._next_retry_at: float | None = None
        self.owner_id = owner_id
        self._deferred = DeferredJobs(self._lock, self._stopping)
        built = parts(self)
        self.metrics = built.metrics
        self._mirror = built.mirror
        self._lease = built.lease
        self._scheduler = built.scheduler
        self._pairing = built.pairing
        self.backups = built.backups
        self._restores = built.restores
        self.gateway = built.gateway
        self._ticker = built.ticker
        self._owns_timers = built.owns_timers
        self._jobs_running = 0  # this session's scheduled jobs under way (see _job)
        self._jobs_done = threading.Condition(self._lock)
        self._supervisor: threading.Thread | None = None
        self._event_thread = session_thread(config.session_id, self._consume_events, "events")

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lease (else stand by), boot, connect. Returns once the threads run; idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._set(owner_id=self.owner_id)
        sid = self.config.session_id
        jobs: list[tuple[Callable[..., None], float, str, list[str]]] = [
            (self.backups.reconcile, self.config.backup_interval_seconds, "backup-interval", ["interval"]),
            (self.backups.history, self._timing.history_interval_seconds, "history-interval", ["periodic"]),
        ]
        for function, seconds, name, args in jobs:
            self._scheduler.add_job(
                self._job,
                "interval",
                seconds=seconds,
                id=f"{sid}:{name}",
                args=[function, *args],
                replace_existing=True,
            )
        self._ticker.add(sid, self._tick)
        self._ticker.add(f"{sid}:connection-watch", self._watch_soon, every=self._timing.qr_check_seconds)
        if self._owns_timers:
            self._scheduler.start()
        self._event_thread.start()
        self._lease.try_acquire()  # the common case boots before start() returns
        self._lease.start()

    def stop_receiving(self) -> None:
        """A shutdown's first step: no more rounds, the client disconnected, and every event it
        delivered handled (each message received is with the message handlers). Idempotent."""
        with self._lock:
            if self._stopping.is_set() or not self._started:
                self._stopping.set()
                return
            self._stopping.set()
        log.info("stopping session %s", self.config.session_id)
        self._stop_jobs()
        self._wake.set()
        self._stop_client()
        if self._supervisor is not None:
            self._supervisor.join(timeout=15)
        self._events.put(None)
        self._event_thread.join(timeout=15)
        with self._lock:
            self._state_at_shutdown = self.state
            self._set(state=State.STOPPED, connected_since=None)  # nothing is sent any more

    def stop(self) -> None:
        """The whole shutdown: receiving stopped, the last changes stored, the lease released.
        Idempotent; never raises."""
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        self.stop_receiving()
        try:
            self._mirror.stop()  # what whatsmeow wrote last is mirrored
        except ZapkeepError as exc:
            log.error("session %s: %s", self.config.session_id, exc)
        if self.fence is not None and self._state_at_shutdown in HISTORY_STATES | {State.STARTING}:
            # Every change is stored already: a full snapshot only when the newest is old (a redeploy
            # several times a day must neither wait for one nor push the older ones out of history).
            self.backups.snapshot("shutdown", unless_newer_than=self._timing.history_interval_seconds)
        self._lease.stop()  # renewed until the last write; stopped so that nothing re-acquires it
        if self._supervisor is not None and self._supervisor.is_alive():
            # Its client may still talk to WhatsApp: another instance must not take over until the lease runs out.
            log.error(
                "session %s: the connection round did not end; the lease is left to expire", self.config.session_id
            )
        else:
            self._lease.release()
        self._set(owns_session=False, fencing_token=None, state=State.STOPPED, connected=False)

    # --- periodic jobs (on timers shared with the host's other sessions) -----------------------

    def _job(self, function: Callable[..., None], *args: object) -> None:
        """Runs one of this session's jobs, unless it is stopping; counted, so that a shutdown
        lets a running backup finish."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._jobs_running += 1
        try:
            with working_for(self.config.session_id):
                function(*args)
        finally:
            with self._lock:
                self._jobs_running -= 1
                self._jobs_done.notify_all()

    def _tick(self) -> None:
        if self._lease.overdue():  # giving it up stops the client, which may wait: on a worker
            self._ticker.submit(self._lease.check)
        for job, kind in self._deferred.take_due():
            self._ticker.submit(self._job, job, kind)

    def _watch_soon(self) -> None:
        """The connection watchdog, on a worker: stopping a stalled round may wait for its client."""
        self._ticker.submit(self._job, self._watch_connection)

    def _stop_jobs(self) -> None:
        """No new jobs of this session (``_stopping`` is set); the running ones finish first."""
        sid = self.config.session_id
        self._ticker.remove(sid)
        self._ticker.remove(f"{sid}:connection-watch")
        for name in ("backup-interval", "history-interval"):
            try:
                self._scheduler.remove_job(f"{sid}:{name}")
            except Exception:  # JobLookupError: never added (stopped before it started)
                pass
        with self._lock:
            self._jobs_done.wait_for(lambda: self._jobs_running == 0, timeout=120)
        if self._owns_timers:
            try:
                self._scheduler.shutdown(wait=True)
            except Exception:
                log.exception("scheduler shutdown failed")
            self._ticker.stop()

    # --- ownership -----------------------------------------------------------------------------

    @property
    def fence(self) -> Fence | None:
        return self._lease.fence

    @property
    def lease(self) -> LeaseKeeper:
        """The session's lease keeper (a host renews the leases of all its sessions at once)."""
        return self._lease

    def _take_over(self, fence: Fence, waited: float | None) -> None:
        """The lease is ours: restore the latest snapshot, then connect."""
        if self._stopping.is_set():
            return  # shutting down: the lease is released in a moment
        self._set(owns_session=True, fencing_token=fence.token, handover_seconds=waited)
        previous = self._supervisor
        if previous is not None:
            # A demoted round's supervisor is on its way out; its client may still hold the store,
            # which the boot may replace: wait for it first.
            previous.join(timeout=60)
            if previous.is_alive():
                self._lease.lose("the previous connection round did not end; not taking over yet", fence)
                return
        self._boot()
        for listener in self.take_over_listeners:
            try:
                listener()
            except Exception as exc:  # e.g. the database blinked: not a reason to stay offline
                log.error("session %s: take-over step failed: %s", self.config.session_id, first_line(exc))
        # Renewals wait on this thread while the session is restored, which (a big session, a slow
        # database, a busy machine) can outlast the lease's fresh window; the supervisor never
        # connects on a lease that may have run out, and would end at once, leaving the session
        # owned and never connected.
        if not self._lease.renew_now():
            self._lease.lose("the lease could not be renewed after taking over; taking it again", fence)
            return
        self._start_supervisor()

    def _start_supervisor(self) -> None:
        with self._lock:
            if self._stopping.is_set() or (self._supervisor is not None and self._supervisor.is_alive()):
                return  # one supervisor at a time: two would run two clients on one session
            self._set(state=State.RESTORE_NEEDED if self._needs_restore else State.CONNECTING)
            self._pending = None
            self._supervisor_ending = False
            self._supervisor = session_thread(self.config.session_id, self._supervise, "supervisor")
            self._supervisor.start()

    def _enter_standby(self) -> None:
        self._set(state=State.STANDBY, owns_session=False, fencing_token=None)

    def _demote(self, reason: str) -> None:
        """The lease is gone: stop talking to WhatsApp and stop writing."""
        self._set(state=State.STANDBY, owns_session=False, fencing_token=None, connected_since=None, last_error=reason)
        self._stop_client(Pending.DEMOTED)

    # --- status ---------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return State(self._status.state)

    def status(self) -> SessionStatus:
        with self._lock:
            retry = None if self._next_retry_at is None else max(0.0, self._next_retry_at - time.monotonic())
            mirror = self._mirror.status()
            cause = self._lease.standby_cause if self.state is State.STANDBY else None
            return replace(
                self._status,
                mirror_running=mirror.running,
                mirror_sequence=mirror.sequence,
                last_mirrored_at=mirror.last_mirrored_at,
                mirror_pending_changes=mirror.pending_changes,
                last_reconcile_at=mirror.last_reconcile_at,
                last_reconcile_result=mirror.last_reconcile_result,
                unreadable_rows=self._status.unreadable_rows + mirror.unreadable_rows,
                last_unreadable_at=mirror.last_unreadable_at or self._status.last_unreadable_at,
                last_backup_at=mirror.last_mirrored_at or self._status.last_backup_at,
                last_backup_error=mirror.last_error or self._status.last_backup_error,
                uptime_seconds=round((now() - self._status.started_at).total_seconds(), 1),
                qr_available=self._pairing.qr is not None,
                qr_expires_at=self._pairing.qr_expires_at,
                next_retry_in_seconds=None if retry is None else round(retry, 1),
                standby_cause=None if cause is None else cause.value,
                database_unreachable_since=self.db.unreachable_since,
            )

    def qr_code(self) -> str | None:
        with self._lock:
            return self._pairing.qr

    def request_pairing_code(self, phone: str) -> str:
        """Link by phone number instead of the QR (WhatsApp > Linked devices > Link with phone
        number): the 8-character code for ``phone``, while a QR code is pending."""
        with self._lock:
            client = self._client if self.state is State.QR else None
        if client is None:
            raise StateConflictError(
                f"session {self.config.session_id} is {self.state.value}; a pairing code needs a pending QR code"
            )
        code = client.request_pairing_code(phone)  # (neonize may take a while: never under the lock)
        self._set(pairing_code=code)
        log.warning("session %s: pairing code requested over the API for %s", self.config.session_id, phone)
        return code

    def _set(self, **changes: object) -> None:
        with self._lock:
            if "state" in changes and isinstance(changes["state"], State):
                new_state = changes["state"]
                changed = new_state.value != self._status.state
                if changed:
                    log.info("session %s: %s -> %s", self.config.session_id, self._status.state, new_state.value)
                changes["state"] = new_state.value
                changes.setdefault("connected", new_state is State.CONNECTED)
            else:
                changed = False
            self._status = replace(self._status, **changes)
            if changed:
                for listener in self.state_listeners:
                    listener(self._status)

    # --- operations for the admin API and CLI --------------------------------------------------------

    def reconnect(self) -> None:
        """A fresh connection round now: after a stall, or to take the stream back after "replaced"."""
        self._require_owner("reconnect")
        with self._lock:
            self._held = False
            self._failures = 0
            supervisor = self._supervisor
            running = (
                supervisor is not None
                and supervisor.is_alive()
                and not self._supervisor_ending
                and self._pending not in (Pending.REPLACED, Pending.DEMOTED)
                and self.state is not State.REPLACED
            )
        if running:
            self._stop_client(Pending.NEW_ROUND)
            return
        if supervisor is not None:  # after "replaced" its supervisor is on its way out, or gone
            supervisor.join(timeout=30)
            if supervisor.is_alive():
                raise StateConflictError("the replaced connection round has not ended yet; try again")
        self._start_supervisor()

    def stop_connection(self) -> None:
        """Disconnect and stay disconnected, still paired, until ``start_connection``."""
        self._require_owner("stop")
        with self._lock:
            self._held = True
            if self.state is State.REPLACED:  # no round runs: nothing to stop, but the state says what holds
                self._set(state=State.DISCONNECTED)
        self._stop_client(Pending.NEW_ROUND)

    def start_connection(self) -> bool:
        """Undo ``stop_connection`` (and, like ``reconnect``, leave "replaced"). A healthy
        connection is left alone: False, nothing was done (a new round would drop it for nothing)."""
        self._require_owner("start")
        with self._lock:
            supervisor = self._supervisor
            healthy = (
                not self._held
                and self.state is State.CONNECTED
                and self._pending is None
                and not self._supervisor_ending
                and supervisor is not None
                and supervisor.is_alive()
            )
        if healthy:
            return False
        self.reconnect()
        return True

    def _require_owner(self, action: str) -> None:
        if self.state in (State.STOPPED, State.STANDBY, State.STARTING) or self.fence is None:
            raise StateConflictError(f"session {self.config.session_id} is {self.state.value}; cannot {action}")

    def readiness(self) -> Readiness:
        return readiness_of(self.status())

    def _live_client(self) -> events.WhatsAppClient | None:
        with self._lock:
            return self._client if self.state is State.CONNECTED else None

    def _round_client(self) -> events.WhatsAppClient | None:
        with self._lock:
            return self._client

    def _not_connected(self) -> str:
        return f"session {self.config.session_id} is not connected ({self.state.value})"

    # --- one-shot jobs ----------------------------------------------------------------------------------

    def stored_copy_deleted(self) -> None:
        """An operator deleted the stored copy through this owner: the mirror stores the whole
        session again at its next change, rather than a reconciliation "repairing" rows that change
        capture never missed."""
        self._mirror.stored_deleted()

    def backup_now(self, reason: str = "api") -> BackupOutcome | None:
        return self.backups.backup_now(reason)

    def _schedule(self, job: Callable[[str], None], kind: str, delay: float) -> None:
        self._deferred.schedule(job, kind, delay)
