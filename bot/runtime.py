"""The daemon's runtime for one session: the state machine, the client's rounds, and the parts
it wires (``Backups``, ``Restores``, ``Pairing``, the ``SendGateway`` messaging sends through).

Threads, each with one job:
- ``supervisor`` runs one client round after another (``client.run()`` blocks), applies
  what must happen while no client has the store open (restore, wipe) and waits out the
  reconnect backoff between rounds;
- ``events`` takes the client's events off a queue (handlers run on Go's thread and must
  return at once) and updates the state;
- ``mirror`` copies every change of the local store into the database (``bot.session.mirror``);
- the APScheduler threads run the reconciliation, the history snapshots and the watchdogs.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler

from bot.connection import events

from bot.session import document as session_document
from bot.session.backups import BackupOutcome, Backups, SessionView
from bot.process.config import Config
from bot.process.errors import (
    SessionDocumentError,
    StateConflictError,
    StoredSessionUnreadable,
    ZapkeepError,
    first_line,
)
from bot.connection.gateway import SendGateway
from bot.session.lease import LeaseKeeper
from bot.metrics import Metrics
from bot.session.mirror import Mirror
from bot.connection.pairing import Pairing
from bot.session.persistence import BootOutcome, export_document, prepare_local_store, sync_session
from bot.session.restores import RestoreOutcome, RestoreRequest, Restores
from bot.session.sealing import require_known_keys
from bot.session.state import HISTORY_STATES, Readiness, SessionStatus, State, now, phone_of, readiness_of
from bot.session.store_worker import document_rows, prepare_store
from database import SESSION_CORRUPT, Database, Fence, SessionRecord

log = logging.getLogger(__name__)


class _Pending(enum.IntEnum):
    """Why the supervisor stopped the current client, applied before the next round.
    A more important reason is never overridden by a lesser one."""

    NEW_ROUND = 1
    RESTORE = 2
    LOGGED_OUT = 3
    REPLACED = 4
    DEMOTED = 5  # the lease is gone: this process must not talk to WhatsApp any more


def default_owner_id() -> str:
    """Who holds a lease, for humans: host, deployment (on Railway) and process."""
    deployment = os.environ.get("RAILWAY_DEPLOYMENT_ID", "-")[:12]
    return f"{socket.gethostname()}/{deployment}/{os.getpid()}"


@dataclass(frozen=True)
class Backoff:
    """Exponential with "equal jitter": each delay is in [ceiling/2, ceiling], ceiling capped."""

    base_seconds: float = 1.0
    cap_seconds: float = 60.0

    def delay(self, attempt: int, jitter: float) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempt - 1))
        return ceiling / 2 + ceiling / 2 * jitter


@dataclass(frozen=True)
class Timing:
    after_connect_seconds: float = 5.0  # then a reconciliation
    after_pair_seconds: float = 1.0  # then a full snapshot into history
    history_interval_seconds: float = 900.0  # at most this often while the store keeps changing
    mirror_poll_seconds: float = 5.0  # an idle mirror asks the store again this often (commits wake it at once)
    qr_round_seconds: float = 90.0  # no new QR for this long: whatsmeow gave up, start a new round
    qr_check_seconds: float = 5.0  # also how often the reconnect watchdog looks
    reconnect_watchdog_seconds: float = 180.0  # whatsmeow's own reconnect after a drop gets this long
    standby_poll_seconds: float = 1.0  # how often a standby daemon tries to take the lease


MessageHandler = Callable[[events.IncomingMessage], None]
Waiter = Callable[[float], None]


class Runtime:
    def __init__(
        self,
        config: Config,
        db: Database,
        client_factory: events.ClientFactory,
        *,
        backoff: Backoff = Backoff(),
        timing: Timing = Timing(),
        wait: Waiter | None = None,
        jitter: Callable[[], float] | None = None,
        owner_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
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
        self._pending: _Pending | None = None
        self._restore_request: RestoreRequest | None = None
        self._failures = 0
        self._mirror = Mirror(
            db,
            config.session_id,
            config.store_path,
            fence=lambda: self.fence,
            on_fenced=lambda exc, fence: self._lease.lose(str(exc), fence),
            poll_wait_seconds=timing.mirror_poll_seconds,
            on_batch=self.metrics.mirrored,
        )
        self._status = SessionStatus.initial(config.session_id)
        self._next_retry_at: float | None = None
        self.owner_id = owner_id or default_owner_id()
        self._lease = LeaseKeeper(
            db,
            config.session_id,
            self.owner_id,
            ttl_seconds=config.lease_ttl_seconds,
            renew_seconds=config.lease_renew_seconds,
            poll_seconds=timing.standby_poll_seconds,
            on_acquired=self._take_over,
            on_lost=self._demote,
            on_standby=self._enter_standby,
        )
        self._scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        self._deferred: dict[str, tuple[float, Callable[[str], None]]] = {}
        self._pairing = Pairing(config.session_id, config.pair_phone, self._set)
        self.backups = Backups(
            db,
            config.session_id,
            self._mirror,
            SessionView(
                fence=lambda: self.fence,
                state=lambda: self.state,
                status=lambda: self._status,
                update=self._set,
                lose=self._lease.lose,
            ),
        )
        self._restores = Restores(
            db,
            config.session_id,
            config.store_path,
            self._mirror,
            self.backups.lock,
            lambda: self.fence,
            self._lease.lose,
        )
        self.metrics.watch(self.status, db, config.session_id)
        self.gateway = SendGateway(self._live_client, self._round_client, self._not_connected, self._stopping)
        self._supervisor: threading.Thread | None = None
        self._event_thread = threading.Thread(target=self._consume_events, name="events", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lease (else stand by), boot, connect. Returns once the threads run; idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._set(owner_id=self.owner_id)
        self._scheduler.add_job(
            self.backups.reconcile,
            "interval",
            seconds=self.config.backup_interval_seconds,
            id="backup-interval",
            args=["interval"],
            replace_existing=True,
        )
        self._scheduler.add_job(
            self.backups.history,
            "interval",
            seconds=self._timing.history_interval_seconds,
            id="history-interval",
            args=["periodic"],
            replace_existing=True,
        )
        self._scheduler.add_job(
            self._watch_connection,
            "interval",
            seconds=self._timing.qr_check_seconds,
            id="connection-watch",
            replace_existing=True,
        )
        self._scheduler.add_job(self._lease.check, "interval", seconds=0.25, id="lease-watch", replace_existing=True)
        self._scheduler.add_job(self._run_deferred, "interval", seconds=0.25, id="deferred", replace_existing=True)
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
        try:
            self._scheduler.shutdown(wait=True)  # lets a running backup finish
        except Exception:
            log.exception("scheduler shutdown failed")
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

    # --- ownership -----------------------------------------------------------------------------

    @property
    def fence(self) -> Fence | None:
        return self._lease.fence

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
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
            self._supervisor.start()

    def _enter_standby(self) -> None:
        self._set(state=State.STANDBY, owns_session=False, fencing_token=None)

    def _demote(self, reason: str) -> None:
        """The lease is gone: stop talking to WhatsApp and stop writing."""
        self._set(state=State.STANDBY, owns_session=False, fencing_token=None, connected_since=None, last_error=reason)
        self._stop_client(_Pending.DEMOTED)

    def _boot(self) -> None:
        self._set(state=State.STARTING)
        # Checked at every take-over, not only at start: another instance (or a rekey) may have
        # moved the stored session to a key this one lacks. Then it must neither restore an older
        # snapshot it can read nor mirror under its own key: it gives the lease up (ConfigError).
        require_known_keys(self.db.key_ids(self.config.session_id), self.db.sealer, self.config.session_id)
        self._reseal()
        self._needs_restore = False
        try:
            result = prepare_local_store(self.db, self.config.session_id, self.config.store_path, self.fence)
        except StoredSessionUnreadable as exc:
            self._refuse_unreadable(exc)
            return
        except SessionDocumentError as exc:
            # Nothing stored can be restored; the local store was left as it was.
            log.error("session %s: %s", self.config.session_id, exc)
            self._set(last_error=first_line(exc), boot_error=first_line(exc))
            return
        log.info("session %s boot: %s", self.config.session_id, result.outcome.value)
        if result.outcome is not BootOutcome.PAIRING_NEEDED:
            self._set(jid=result.device_jid, phone=phone_of(result.device_jid))
        record = result.record  # loaded once, by the boot rule
        if result.outcome is BootOutcome.MIGRATED:
            record = self._store_migrated()
        if record is not None:
            self._set(
                last_backup_at=record.updated_at.replace(tzinfo=UTC),
                last_backup_size=record.size_bytes,
                last_backup_checksum=record.checksum,
                last_backup_version=record.version,
                push_name=record.push_name,
            )

    def _refuse_unreadable(self, exc: StoredSessionUnreadable) -> None:
        """Stored rows do not open: stay off WhatsApp and roll nothing back, loudly (the status,
        /readyz, a ``session.corrupt`` event), until an operator restores or imports on purpose."""
        session_id = self.config.session_id
        log.error("session %s: %s", session_id, exc)
        self._needs_restore = True
        record = self.db.load_session(session_id)  # (the head stays readable: the number is shown)
        jid = record.device_jid if record is not None else None
        self._set(
            jid=jid,
            phone=phone_of(jid),
            push_name=record.push_name if record is not None else None,
            last_error=first_line(exc),
            boot_error=first_line(exc),
            unreadable_rows=self._status.unreadable_rows + exc.rows,
            last_unreadable_at=now(),
        )
        action = "refused at boot: nothing rolled back; an operator restores a history version or imports"
        payload = {"unreadable_rows": exc.rows, "tables": exc.tables, "repaired": False, "action": action}
        try:
            self.db.record_event(session_id, SESSION_CORRUPT, None, payload)
        except Exception as event_error:  # (the status and /readyz still tell)
            log.error("session %s: session.corrupt event not recorded: %s", session_id, first_line(event_error))

    def _store_migrated(self) -> SessionRecord | None:
        """A paired local store met an empty database: stored whole and kept in history now, before
        connecting, so that the first snapshot does not wait for the shutdown or the periodic job."""
        try:
            sync_session(self.db, self.config.session_id, self.config.store_path, self.fence)
            self.backups.snapshot("migrated")
            return self.db.load_session(self.config.session_id)
        except Exception as exc:  # the mirror stores it once it runs; the snapshot follows then
            log.warning("session %s: storing the migrated store failed: %s", self.config.session_id, first_line(exc))
            self._schedule(self.backups.history, "after-pair", self._timing.after_pair_seconds)
            return None

    def _reseal(self) -> None:
        """Stored credentials not under the current key (in clear before a key was set, or under a
        rotated-out one) are re-encrypted by their owner, fenced, before anything reads them.
        Decrypting (no key, an old one given) is only ever done on purpose: ``python -m bot rekey``."""
        if self.db.sealer.key_id is None:
            return
        count = self.db.reseal(self.config.session_id, self.fence)
        if count.unreadable:
            log.error(
                "session %s: %d stored payloads do not decrypt (altered, or moved from another session or row); "
                "the restore refuses them",
                self.config.session_id,
                count.unreadable,
            )
        if count.rows or count.snapshots:
            log.info(
                "session %s: %d rows and %d history snapshots re-encrypted with %s",
                self.config.session_id,
                count.rows,
                count.snapshots,
                f"key {self.db.sealer.key_id}",
            )

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

    # --- the connection supervisor -----------------------------------------------------------------

    def _supervise(self) -> None:
        store_prepared = False
        while not self._stopping.is_set():
            with self._lock:
                pending, self._pending = self._pending, None
                self._wake.clear()  # whatever woke us is being handled now
                ending = pending in (_Pending.REPLACED, _Pending.DEMOTED) or not self._lease.fresh()
                self._supervisor_ending = ending
            if ending:
                self._fail_restore_request("the session was handed over before the restore could run")
                # Replaced: write nothing more. Demoted: the fence refuses any write anyway.
                try:
                    self._mirror.stop(flush=pending is None)
                except ZapkeepError as exc:
                    log.error("session %s: %s", self.config.session_id, exc)
                return  # never (re)connect without a lease that is surely still ours
            if pending is _Pending.LOGGED_OUT:
                self._wipe_session()
                self._needs_restore = False  # the unlinked session is gone: pairing again
                store_prepared = False
            if pending is _Pending.RESTORE:
                self._apply_restore()
            if self._needs_restore:  # no client, no mirror: nothing may write over what is stored
                self._set(state=State.RESTORE_NEEDED, connected_since=None)
                self._wake.wait()  # a restore, an import, a logout, a demotion or the shutdown
                continue
            if not store_prepared or not self.config.store_path.exists():
                store_prepared = self._prepare_store()
            if store_prepared:
                self._mirror.start()
            with self._lock:
                if self._stopping.is_set() or self._pending is not None:
                    continue
                held = self._held
                if not held:
                    self._pairing.new_round()
                    self._dropped_at = None
                    self._round += 1
                    self._live_round = self._round
                    self._client = self._client_factory(self.config.store_path, self._tagged_sink(self._round))
                    client = self._client
            if held:
                self._set(state=State.DISCONNECTED, connected_since=None, next_retry_in_seconds=None)
                self._wake.wait()  # start, restore, logout, a demotion or the shutdown
                continue
            if self.state is not State.RECONNECTING:
                self._set(state=State.CONNECTING)
            try:
                error = client.run()
            except Exception as exc:  # a broken client must not end the supervisor
                log.exception("session %s: client crashed", self.config.session_id)
                error = f"client crashed: {exc.__class__.__name__}"
            with self._lock:
                self._client = None  # (its round stays the live one until the next: its last words count)
                self._pairing.clear()
                if self._stopping.is_set() or self._pending is not None:
                    continue
            self._retry_later(error or "the connection closed")

    def _tagged_sink(self, round_number: int) -> events.EventSink:
        return lambda event: self._events.put((round_number, event))

    def _prepare_store(self) -> bool:
        try:
            prepare_store(self.config.store_path)
        except ZapkeepError as exc:
            log.error("session %s: cannot prepare the local store: %s", self.config.session_id, exc)
            return False
        return True

    def _retry_later(self, error: str) -> None:
        with self._lock:
            self._failures += 1
            delay = self._backoff.delay(self._failures, self._jitter())
            self._next_retry_at = time.monotonic() + delay
            self._set(state=State.RECONNECTING, last_error=error, reconnect_count=self._status.reconnect_count + 1)
        log.warning(
            "session %s: %s; retrying in %.1f s (attempt %d)", self.config.session_id, error, delay, self._failures
        )
        self._wait(delay)
        with self._lock:
            self._next_retry_at = None

    def _wait_for_wake(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _apply_restore(self) -> None:
        with self._lock:
            request, self._restore_request = self._restore_request, None
        if request is None:
            return
        try:
            request.outcome, stored = self._restores.apply(request)
            self._failures = 0
            self._needs_restore = False
            self._set(
                jid=stored.device_jid,
                phone=phone_of(stored.device_jid),
                push_name=stored.push_name,
                state=State.CONNECTING,
                boot_error=None,
            )
        except Exception as exc:
            log.error("session %s: restore failed, the local store is unchanged: %s", self.config.session_id, exc)
            request.error = exc
        finally:
            request.done.set()

    def _fail_restore_request(self, reason: str) -> None:
        with self._lock:
            request, self._restore_request = self._restore_request, None
        if request is not None:
            request.error = StateConflictError(reason)
            request.done.set()

    def _stop_client(self, pending: _Pending | None = None) -> None:
        self._finish_client_stop(self._claim_client_stop(pending))

    def _claim_client_stop(self, pending: _Pending | None) -> events.WhatsAppClient | None:
        with self._lock:
            if pending is not None and (self._pending is None or pending > self._pending):
                self._pending = pending
            self._live_round = None  # whatever the round still says is about a connection being closed
            return self._client

    def _finish_client_stop(self, client: events.WhatsAppClient | None) -> None:
        self._wake.set()  # cut a backoff wait short: the supervisor has work
        if client is not None:
            client.stop()

    def _wipe_session(self) -> None:
        self._restores.wipe()
        self._failures = 0
        self._set(jid=None, phone=None, push_name=None, connected_since=None, pairing_code=None)

    # --- operations for the admin API and CLI --------------------------------------------------------

    def restore(self, version: int | None = None, *, timeout: float = 120.0) -> RestoreOutcome:
        """Stop the client, rewrite the local store from the stored (or a historical) snapshot, reconnect."""
        _, text = export_document(self.db, self.config.session_id, version)  # NotFoundError when there is none
        kind = "current" if version is None else "history"
        return self._apply_live(RestoreRequest(kind, text, version), timeout)

    def import_document(self, document_text: str, *, timeout: float = 120.0) -> RestoreOutcome:
        """An admin's document becomes this live session: applied as a restore is (stop, rewrite,
        reconnect), so the running client never overwrites it with the state it replaced."""
        return self._apply_live(RestoreRequest("import", document_text), timeout)

    def _apply_live(self, request: RestoreRequest, timeout: float) -> RestoreOutcome:
        session_id = self.config.session_id
        if self.state in (State.REPLACED, State.STOPPED, State.STANDBY, State.STARTING):
            raise StateConflictError(f"session {session_id} is {self.state.value}; it cannot be restored here")
        # Check the whole document before stopping a live client for it: decoded, then built aside.
        document = session_document.validate_document(session_document.parse_document(request.document_text))
        if document.device_field("jid") is None:
            raise SessionDocumentError("the session document holds no paired device")
        if request.kind == "import":  # (the stored session and history were checked when they were stored)
            document_rows(request.document_text)
        with self._lock:
            self._restore_request = request
        self._stop_client(_Pending.RESTORE)
        if not request.done.wait(timeout):
            raise StateConflictError(f"session {session_id}: the restore did not finish within {timeout:.0f} s")
        if request.error is not None:
            raise request.error
        assert request.outcome is not None
        return request.outcome

    def logout(self) -> bool:
        """Unlink the device (when the servers can be reached), wipe, pair again. True: unlinked remotely."""
        if self.state in (State.REPLACED, State.STOPPED, State.STANDBY, State.STARTING):
            raise StateConflictError(f"session {self.config.session_id} is {self.state.value}; cannot log out")
        client = self._live_client()
        unlinked = False
        if client is not None:
            try:
                client.logout()
                unlinked = True
            except Exception as exc:
                log.warning("session %s: logout request failed (%s); wiping locally", self.config.session_id, exc)
        with self._lock:
            self._held = False  # unlinked: pairing again is the way back, whatever stop said before
            self._set(state=State.LOGGED_OUT, connected_since=None, last_error="logged out by an admin")
        self._stop_client(_Pending.LOGGED_OUT)
        return unlinked

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
                and self._pending not in (_Pending.REPLACED, _Pending.DEMOTED)
                and self.state is not State.REPLACED
            )
        if running:
            self._stop_client(_Pending.NEW_ROUND)
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
        self._stop_client(_Pending.NEW_ROUND)

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

    # --- events from the client -------------------------------------------------------------------

    def _consume_events(self) -> None:
        while (item := self._events.get()) is not None:
            round_number, event = item
            try:
                self._handle(event, round_number)
            except Exception:
                log.exception("session %s: handling %s failed", self.config.session_id, type(event).__name__)

    def _handle(self, event: events.ClientEvent, round_number: int) -> None:
        if isinstance(event, events.IncomingMessage):  # acknowledged by whatsmeow: handled whatever the round
            for handler in self.message_handlers:
                handler(event)
            return
        if isinstance(event, events.Receipt):  # about messages sent, whatever the round
            for on_receipt in self.receipt_handlers:
                on_receipt(event)
            return
        if isinstance(event, events.Paired):  # the device is in the store, whatever the round
            log.info("session %s: paired as %s", self.config.session_id, event.jid)
            with self._lock:
                self._pairing.clear()
                self._set(jid=event.jid, phone=phone_of(event.jid), pairing_code=None, boot_error=None)
            self._schedule(self.backups.history, "after-pair", self._timing.after_pair_seconds)
            return
        with self._lock:  # checked and applied at once: a stop cannot come in between
            if round_number != self._live_round:
                log.debug("session %s: ignoring %s from an ended round", self.config.session_id, type(event).__name__)
                return
            follow_up = self._apply(event)
        if follow_up is not None:
            follow_up()  # slow or outward work, outside the lock

    def _apply(self, event: events.ClientEvent) -> Callable[[], None] | None:
        """A connection event's change of state (under the lock); returns what to do after it."""
        match event:
            case events.QrCode(code=code):
                return self._on_qr(code)
            case events.PairingCode(code=code):
                self._set(pairing_code=code)
            case events.Connected():
                self._failures = 0
                self._pairing.clear()
                self._dropped_at = None
                self._set(state=State.CONNECTED, connected_since=now(), last_error=None, pairing_code=None)
                return self._after_connect
            case events.Disconnected():
                if self.state is State.CONNECTED:  # whatsmeow reconnects by itself from here
                    self._dropped_at = time.monotonic()
                    self._set(
                        state=State.RECONNECTING, connected_since=None, reconnect_count=self._status.reconnect_count + 1
                    )
            case events.LoggedOut(reason=reason):
                self._set(
                    state=State.LOGGED_OUT,
                    last_error=f"logged out from the phone ({reason or 'no reason'})",
                    connected_since=None,
                )
                client = self._claim_client_stop(_Pending.LOGGED_OUT)
                return lambda: self._finish_client_stop(client)
            case events.StreamReplaced():
                log.error(
                    "session %s: another client took over this session's stream; stopping, not reconnecting",
                    self.config.session_id,
                )
                self._set(
                    state=State.REPLACED,
                    connected_since=None,
                    last_error="stream replaced: another instance or device is using this session",
                )
                client = self._claim_client_stop(_Pending.REPLACED)
                return lambda: self._finish_client_stop(client)
            case events.TemporaryBan(code=code, expires_in_seconds=seconds):
                log.error("session %s: temporarily banned (%s) for %d s", self.config.session_id, code, seconds)
                self._set(last_error=f"temporarily banned ({code}), expires in {seconds} s")
            case events.ConnectFailure(reason=reason):
                self._set(last_error=f"connect failure: {reason}")
            case events.KeepAliveTimeout(error_count=count):
                self._set(last_error=f"keep-alive timeout ({count} missed)")
            case events.KeepAliveRestored():
                log.info("session %s: keep-alive restored", self.config.session_id)
        return None

    def _after_connect(self) -> None:
        self._schedule(self.backups.reconcile, "after-connect", self._timing.after_connect_seconds)
        for listener in self.connected_listeners:
            listener()

    def _on_qr(self, code: str) -> Callable[[], None] | None:
        if self._pending is not None:
            return None
        self._set(state=State.QR)
        return self._pairing.show(code, self._client)

    def _watch_connection(self) -> None:
        """Start a fresh round when whatsmeow gave up without saying so: its QR codes ran out
        (~60 s, then 20 s each), or its own reconnect after a drop has not succeeded for minutes."""
        with self._lock:
            qr_expired = self.state is State.QR and self._pairing.expired(self._timing.qr_round_seconds)
            stalled = (
                self.state is State.RECONNECTING
                and self._live_round is not None
                and self._dropped_at is not None
                and time.monotonic() - self._dropped_at > self._timing.reconnect_watchdog_seconds
            )
        if qr_expired:
            log.info("session %s: QR codes expired; starting a new pairing round", self.config.session_id)
            self._stop_client(_Pending.NEW_ROUND)
        elif stalled:
            log.warning(
                "session %s: no connection %.0f s after a drop; starting a new connection round",
                self.config.session_id,
                self._timing.reconnect_watchdog_seconds,
            )
            self._set(last_error="whatsmeow's reconnect stalled; started a new connection round")
            self._stop_client(_Pending.NEW_ROUND)

    # --- one-shot jobs ----------------------------------------------------------------------------------

    def backup_now(self, reason: str = "api") -> BackupOutcome | None:
        return self.backups.backup_now(reason)

    def _schedule(self, job: Callable[[str], None], kind: str, delay: float) -> None:
        """Runs job(kind) once, delay seconds from now; scheduling a kind again moves it."""
        # Not an APScheduler "date" job: the scheduler removes a fired one-shot job after running it,
        # and when that overlaps its shutdown it raises JobLookupError in its own thread.
        with self._lock:
            self._deferred[kind] = (time.monotonic() + delay, job)

    def _run_deferred(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(kind, job) for kind, (at, job) in self._deferred.items() if at <= now]
            for kind, _ in due:
                del self._deferred[kind]
        for kind, job in due:
            if not self._stopping.is_set():
                job(kind)
