"""The sessions this process hosts: which ones, each one's parts started and stopped, sessions
created and deleted, their live state published to the database, and the commands other instances
sent them executed.

With ``SESSION_ID`` set the host runs that one session (registered if missing), as the first
release did. Unset, it runs every session the database holds, up to ``MAX_SESSIONS`` (``default``
is created on a first boot with none), and keeps looking: a session created or deleted through
another instance's API is started or stopped here within ``sync_seconds``.

Each session is a ``bot.wiring.Services`` of its own (state machine, lease and fencing token,
mirror, outbox, chatbot, store at ``$DATA_DIR/sessions/<id>/``), so that nothing one session does
can block another; what can be shared is: the WhatsApp client process, the change-capture process,
the scheduler and the ticker, the metrics, the database pool.

Several replicas share the sessions (``SESSION_ID`` unset, issue 26): each instance beats in the
database, and renews every lease it holds in the same single statement (``renew_seconds``). Its fair
share is the sessions divided by the live instances (heartbeat younger than a lease's life), rounded
up, capped by ``MAX_SESSIONS``. While it owns fewer, it takes sessions whose lease is free or
expired, and builds their parts only then (no instance keeps a standby copy of a session it does
not own); while it owns more and another instance has room, it hands one session a round over
(stopped: last changes stored, lease released), so that a new replica gets its share within a
minute without a burst of reconnects. The lease and its fencing token stay the only truth.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.connection import events
from bot.messages.rules import Rules, load_rules
from bot.metrics import Metrics
from bot.process import logs
from bot.process.config import Config, is_valid_session_id
from bot.process.errors import ConfigError, SessionExists, SessionLimit, first_line
from bot.session.state import SessionStatus
from bot.wiring import Services, Timers, build_services, default_owner_id
from database import Command, Database, InstanceInfo, LeaseInfo, LiveState

log = logging.getLogger("bot.host")

CommandHandler = Callable[[Command], tuple[int, dict]]
LIVE_REFRESH_SECONDS = 30.0  # an owner re-publishes its sessions' state this often (a lost race heals)
COMMANDS_KEPT = timedelta(days=1)  # finished commands (their answers) are kept this long
COMMANDS_PRUNE_SECONDS = 3600.0
STOP_WORKERS = 128  # sessions shut down side by side: each may wait for its client (a hanging dial: 10 s) and its lease
START_WORKERS = 8  # ... and boot side by side: each restores its store and starts its client
TAKE_WORKERS = 8  # sessions taken side by side (each restores its store from the database first)
EXPIRY_MARGIN_SECONDS = 0.1  # a balancing round this long after a lease that is not renewed runs out


@dataclass(frozen=True)
class HostTiming:
    sync_seconds: float = 2.0  # how often the sessions in the database are compared with those hosted
    command_wait_seconds: float = 0.5  # SQLite's polling for commands (PostgreSQL is woken by NOTIFY)


class Host:
    def __init__(
        self,
        config: Config,
        db: Database,
        client_factory: events.ClientFactory,
        rules: Rules,
        *,
        host_timing: HostTiming = HostTiming(),
        owner_id: str | None = None,
        metrics: Metrics | None = None,
        build: Callable[..., Services] = build_services,
        **session_options: object,
    ) -> None:
        """``session_options``: passed to every session's ``build_services`` (tests shorten timers)."""
        self.config = config
        self.db = db
        self.instance_id = owner_id or default_owner_id()
        self.metrics = metrics or Metrics()
        self.command_handler: CommandHandler | None = None  # the API's replay of a command (set by the daemon)
        self._client_factory = client_factory
        self._rules = rules
        self._timing = host_timing
        self._build = build
        self._session_options = session_options
        self._timers = Timers.new()
        self._sessions: dict[str, Services] = {}
        self._deleting: set[str] = set()  # sessions whose traces are being removed
        self._starting: set[str] = set()  # sessions whose parts are starting (taking their lease)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._started = False
        self._live_changed = threading.Event()
        self._live_lock = threading.Lock()  # taken under runtimes' locks: never holds another
        self._live_pending: dict[str, SessionStatus] = {}
        self._threads: list[threading.Thread] = []
        self._command_workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commands")
        # Sharing sessions with other instances (SESSION_ID unset): the host keeps the leases.
        self.shares_sessions = not config.single_session
        self._session_options.setdefault("leases_kept_by_host", self.shares_sessions)
        self._leaving: dict[str, Services] = {}  # handed over or deleted, still stopping: still renewed
        self._leases_stopping = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._unowned_since: dict[str, float] = {}  # sessions seen with nobody's lease (monotonic)
        self._random = random.Random()
        self._next_round = host_timing.sync_seconds  # until the next balancing round
        self._signed_off = False  # stopping: leases renewed, no heartbeat
        self._renewing = threading.Lock()
        if self.shares_sessions:
            self.metrics.watch_owned(lambda: len(self.owned()))

    # --- what other parts ask -------------------------------------------------------------------

    @property
    def default_session_id(self) -> str:
        return self.config.session_id

    def hosted(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def owned(self) -> list[str]:
        """Sessions hosted here whose lease this instance holds now."""
        with self._lock:
            return sorted(sid for sid, s in self._sessions.items() if s.runtime.fence is not None)

    def services(self, session_id: str) -> Services | None:
        with self._lock:
            return self._sessions.get(session_id)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Host the sessions there are (the first boot creates one), then keep up with the database."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._timers.start()
        self._timers.scheduler.add_job(
            self._prune_commands,
            "interval",
            seconds=COMMANDS_PRUNE_SECONDS,
            id="prune-commands",
            next_run_time=datetime.now(UTC),
        )
        if self.shares_sessions:
            self._lease_thread = threading.Thread(target=self._keep_leases, name="leases", daemon=True)
            self._lease_thread.start()
            self._balance(self._wanted())
        else:
            with ThreadPoolExecutor(max_workers=START_WORKERS, thread_name_prefix="starting") as pool:
                list(pool.map(self._host, self._wanted()))  # each boot waits on its database and its store
        for target, name in ((self._sync, "host-sync"), (self._serve_commands, "commands"), (self._publish, "live")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Every session stopped (its last changes stored, its lease released), side by side."""
        self._stopping.set()  # (no session is taken from now on)
        if self._lease_thread is not None:
            self._sign_off()  # the others' share grows now: each session is taken as soon as it is released
        self._live_changed.set()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            sessions = list(self._sessions.items())
        with ThreadPoolExecutor(max_workers=STOP_WORKERS, thread_name_prefix="stopping") as pool:
            list(pool.map(lambda item: self._stop_services(*item), sessions))
        self._leases_stopping.set()  # renewed until each session's last write and release
        if self._lease_thread is not None:
            self._lease_thread.join(timeout=15)
        self._publish_pending()  # the last states ("stopped")
        self._command_workers.shutdown(wait=True)
        try:
            self._timers.stop()
        except Exception:
            log.exception("stopping the timers failed")

    # --- creating and deleting --------------------------------------------------------------------

    def create_session(self, session_id: str, pair_phone: str | None = None, rules: str | None = None) -> None:
        """Register a new session and, unless this daemon hosts one session only, start it here.
        ValueError: a bad id or rules file; SessionExists; SessionLimit."""
        if not is_valid_session_id(session_id):
            raise ValueError("session_id must be 1-100 letters, digits, '-' or '_'")
        if rules is not None:
            self._load_rules(rules)  # refused before anything is written
        with self._lock:
            if session_id in self._deleting:
                raise SessionExists(f"session {session_id} is being deleted; create it again in a moment")
            if not self.config.single_session and len(self._sessions) >= self.config.max_sessions:
                raise SessionLimit(f"this daemon hosts MAX_SESSIONS={self.config.max_sessions} sessions already")
            if not self.db.register_session(session_id, pair_phone=pair_phone, rules=rules):
                raise SessionExists(f"session {session_id} exists already")
            log.info("session %s created", session_id)
        if not self.config.single_session:
            self._host(session_id)  # (outside the lock: a boot takes a while, and the API reads the host meanwhile)

    def delete_session(self, session_id: str, logout: bool = False, purge: bool = False) -> bool:
        """Gone for good: its client stopped (unlinked from the phone with ``logout``), its local
        store wiped, its stored rows removed, a tombstone so that no instance brings it back; its
        history stays unless ``purge``. False: no such session."""
        with self._lock:  # no create of the same id, and no sync, until its traces are gone
            if session_id in self._deleting:
                raise SessionExists(f"session {session_id} is being deleted already")
            if not self.db.tombstone_session(session_id):
                return False
            self._deleting.add(session_id)
            services = self._sessions.pop(session_id, None)
            if services is not None:
                self._leaving[session_id] = services
        try:
            if services is not None:
                if logout:
                    try:
                        services.runtime.logout()
                    except Exception as exc:  # not paired, not connected: nothing to unlink
                        log.info("session %s: not unlinked from the phone: %s", session_id, first_line(exc))
                self._stop_services(session_id, services)
                with self._lock:
                    self._leaving.pop(session_id, None)
            self._forget(session_id, keep_history=not purge)
        finally:
            with self._lock:
                self._deleting.discard(session_id)
        log.info("session %s deleted%s", session_id, " with its history" if purge else "")
        return True

    # --- internals ------------------------------------------------------------------------------------

    def _wanted(self) -> list[str]:
        """The sessions this daemon should host, in the database's order."""
        if self.config.single_session:
            self.db.register_session(self.config.session_id, pair_phone=self.config.pair_phone)
            return [self.config.session_id]
        ids = self.db.session_ids()
        if not ids:
            self.db.register_session(self.config.session_id, pair_phone=self.config.pair_phone)
            ids = self.db.session_ids()
        if len(ids) > self.config.max_sessions:
            log.warning(
                "the database holds %d sessions; this daemon hosts the first MAX_SESSIONS=%d",
                len(ids),
                self.config.max_sessions,
            )
        return ids[: self.config.max_sessions]

    def _host(self, session_id: str) -> None:
        """Build and start one session (a bad rules file of its own leaves it unhosted, logged)."""
        with self._lock:
            if session_id in self._sessions or session_id in self._deleting or self._stopping.is_set():
                return
            registered = self.db.registered_session(session_id)
            pair_phone = registered.pair_phone if registered is not None else None
            if pair_phone is None and session_id == self.config.session_id:
                pair_phone = self.config.pair_phone
            try:
                rules = self._load_rules(registered.rules) if registered and registered.rules else self._rules
            except (ConfigError, ValueError) as exc:
                log.error("session %s not started: %s", session_id, exc)
                return
            config = replace(self.config, session_id=session_id, pair_phone=pair_phone)
            services = self._build(
                config,
                self.db,
                self._client_factory,
                rules,
                owner_id=self.instance_id,
                metrics=self.metrics,
                timers=self._timers,
                **self._session_options,
            )
            services.runtime.state_listeners.append(self._note_state)
            logs.track(session_id, lambda: services.runtime.state.value)
            self._sessions[session_id] = services
            self._starting.add(session_id)  # no lease yet: not one that was lost
        try:
            with logs.working_for(session_id):
                services.start()
        finally:
            with self._lock:
                self._starting.discard(session_id)

    def _stop_services(self, session_id: str, services: Services) -> None:
        try:
            with logs.working_for(session_id):
                services.stop()
        except Exception:
            log.exception("session %s: stopping failed", session_id)
        self._note_state(services.runtime.status())

    def _load_rules(self, relative: str) -> Rules:
        """A session's own rules: a file under the directory of BOT_REPLIES, named relative to it."""
        directory = self.config.bot_replies.parent.resolve()
        path = (directory / relative).resolve()
        if Path(relative).is_absolute() or directory not in path.parents:
            raise ValueError(f"rules must name a file under {directory}")
        return load_rules(path)

    def _forget(self, session_id: str, *, keep_history: bool) -> None:
        """A deleted session's traces, once its parts stopped (their last write included): its
        stored rows, its live state, its local store, its metrics."""
        self.metrics.unwatch(session_id)
        self.db.delete_session(session_id, keep_history=keep_history)
        self.db.clear_live(session_id)
        logs.track(session_id, None)
        shutil.rmtree(replace(self.config, session_id=session_id).session_dir, ignore_errors=True)

    def _sync(self) -> None:
        """Sessions created elsewhere start here; sessions deleted elsewhere stop (while nobody
        owned them: beside an owner, a delete goes through that owner). Sharing sessions with
        other instances, each round also balances them (``_balance``)."""
        while not self._stopping.wait(self._next_round):
            self._next_round = self._timing.sync_seconds
            hosted = set(self.hosted())  # before the database is read: a session created meanwhile is in both
            if self.config.single_session:
                wanted = set() if self._gone() else {self.config.session_id}
            else:
                try:
                    ids = self.db.session_ids()
                except Exception as exc:  # the database is away: keep hosting what runs
                    log.debug("session list unavailable: %s", first_line(exc))
                    continue
                wanted = set(ids)
            for session_id in sorted(hosted - wanted):
                with self._lock:
                    services = None if session_id in self._deleting else self._sessions.pop(session_id, None)
                    if services is not None:
                        self._leaving[session_id] = services
                if services is not None:
                    log.info("session %s was deleted by another instance; stopping it here", session_id)
                    self._stop_services(session_id, services)
                    with self._lock:
                        self._leaving.pop(session_id, None)
                    self._forget(session_id, keep_history=True)
            if self.shares_sessions:
                try:
                    self._balance(ids)
                except Exception as exc:  # the database is away: the leases' watchdog does the rest
                    log.debug("balancing skipped: %s", first_line(exc))
                continue
            for session_id in sorted(wanted - hosted):
                if len(self.hosted()) < self.config.max_sessions:
                    self._host(session_id)

    # --- sharing the sessions with other instances ---------------------------------------------------

    def fair_share(self, sessions: int, instances: int) -> int:
        """Sessions divided by live instances, rounded up, capped by MAX_SESSIONS."""
        return min(math.ceil(sessions / max(1, instances)), self.config.max_sessions)

    def _balance(self, wanted: list[str]) -> None:
        """One round: sessions whose lease this instance no longer holds are stopped (never kept
        standing by); then it takes free sessions while it owns fewer than its fair share, or hands
        one over while it owns more and another live instance has room."""
        for session_id, services in self._sessions_without_lease():
            log.info("session %s: not owned here any more; its parts stopped", session_id)
            self._set_aside(session_id, services)
        leases = {lease.session_id: lease for lease in self.db.leases()}
        instances = {i.instance_id: i for i in self.db.live_instances(self.config.lease_ttl_seconds)}
        # A live owner renews long before its leases run out: one about to run out is a crashed
        # owner's, free at that moment (the next round then, not up to a round later).
        running_out = [
            lease.expires_in_seconds
            for lease in leases.values()
            if lease.owner_id not in (None, self.instance_id) and 0 < lease.expires_in_seconds < self._next_round
        ]
        if running_out:
            self._next_round = min(running_out) + EXPIRY_MARGIN_SECONDS
        share = self.fair_share(len(wanted), len(instances.keys() | {self.instance_id}))
        owned = self.hosted()
        unowned = [sid for sid in wanted if sid not in owned and _free(leases.get(sid))]
        now = time.monotonic()
        self._unowned_since = {sid: self._unowned_since.get(sid, now) for sid in unowned}
        if len(owned) < share:
            self._random.shuffle(unowned)  # instances taking at once collide less
            self._take(unowned[: share - len(owned)])
            return
        # Over the share everywhere (other instances' MAX_SESSIONS): nobody else takes these.
        stranded_after = 2.0 * self.config.lease_ttl_seconds
        stranded = [sid for sid in unowned if now - self._unowned_since[sid] > stranded_after]
        if stranded and len(owned) < self.config.max_sessions:
            self._take(stranded[: self.config.max_sessions - len(owned)])
            return
        if len(owned) > share and self._someone_has_room(instances, share):
            self._hand_over(owned[-1], len(owned), share)

    def _someone_has_room(self, instances: dict[str, InstanceInfo], share: int) -> bool:
        return any(
            i.sessions_owned < min(share, i.max_sessions)
            for i in instances.values()
            if i.instance_id != self.instance_id
        )

    def _sessions_without_lease(self) -> list[tuple[str, Services]]:
        with self._lock:
            return [
                (sid, s) for sid, s in self._sessions.items() if s.runtime.fence is None and sid not in self._starting
            ]

    def _take(self, session_ids: list[str]) -> None:
        """Each session built and started here: its lease taken (else its parts are stopped at
        once), its store restored from the database, its client connected."""
        if not session_ids:
            return
        with ThreadPoolExecutor(max_workers=TAKE_WORKERS, thread_name_prefix="taking") as pool:
            list(pool.map(self._host, session_ids))
        for session_id in session_ids:
            services = self.services(session_id)
            if services is None:
                continue
            if services.runtime.fence is None:  # another instance was quicker, or the take-over failed
                self._set_aside(session_id, services)
            else:
                self.metrics.took_over()
                log.info("session %s taken (this instance owns %d)", session_id, len(self.hosted()))

    def _hand_over(self, session_id: str, owned: int, share: int) -> None:
        log.info(
            "session %s handed over: this instance owns %d sessions, its fair share is %d", session_id, owned, share
        )
        with self._lock:
            services = self._sessions.get(session_id)
        if services is not None:
            self._set_aside(session_id, services)

    def _set_aside(self, session_id: str, services: Services) -> None:
        """Stopped here (its last changes stored, its lease released, renewed until then)."""
        with self._lock:
            if self._sessions.get(session_id) is not services:
                return
            del self._sessions[session_id]
            self._leaving[session_id] = services
        try:
            self._stop_services(session_id, services)
        finally:
            with self._lock:
                self._leaving.pop(session_id, None)

    def _sign_off(self) -> None:
        """No more heartbeats (the leases are still renewed until released): the other instances
        count one fewer at once."""
        with self._renewing:  # a renewal under way would beat again after the row is gone
            self._signed_off = True
            try:
                self.db.leave(self.instance_id)
            except Exception as exc:
                log.warning("could not sign this instance off (its heartbeat runs out): %s", first_line(exc))

    def _keep_leases(self) -> None:
        """The heartbeat and every lease held, renewed in one statement every ``renew_seconds``;
        after a failure, again in a second (each session's watchdog gives its lease up in time)."""
        delay = 0.0
        while not self._leases_stopping.wait(delay):
            delay = self._renew_all()

    def _renew_all(self) -> float:
        with self._lock:
            keepers = [s.runtime.lease for s in (*self._sessions.values(), *self._leaving.values())]
        held = [(keeper, fence) for keeper in keepers if (fence := keeper.fence) is not None]
        requested = time.monotonic()  # the database counts the leases' life from its statement
        try:
            with self._renewing:
                renewed = self.db.beat_and_renew(
                    self.instance_id,
                    [fence for _, fence in held],
                    self.config.lease_ttl_seconds,
                    self.config.max_sessions,
                    beat=not self._signed_off,
                )
        except Exception as exc:
            log.warning("cannot renew the leases of %d sessions: %s", len(held), first_line(exc))
            return 1.0
        for keeper, fence in held:
            if fence.session_id in renewed:
                keeper.renewed(fence, requested)
            else:
                keeper.refused(fence)
        return float(self.config.lease_renew_seconds)

    def _gone(self) -> bool:
        try:
            return self.db.is_tombstoned(self.config.session_id)
        except Exception:
            return False

    def _serve_commands(self) -> None:
        """Executes what other instances' APIs asked of the sessions this one owns, each under its
        lease (a command is claimed only with a fence that still holds)."""
        while not self._stopping.is_set():
            try:
                self.db.wait_for_commands(self._timing.command_wait_seconds)
                with self._lock:
                    fences = [s.runtime.fence for s in self._sessions.values()]
                owned = [fence for fence in fences if fence is not None]
                if not owned or self.command_handler is None or self._stopping.is_set():
                    continue
                for command in self.db.claim_commands(self.instance_id, owned):
                    self._command_workers.submit(self._execute, command)
            except Exception as exc:  # the database is away: try again in a moment
                log.debug("commands unavailable: %s", first_line(exc))
                self._stopping.wait(1.0)

    def _execute(self, command: Command) -> None:
        handler = self.command_handler
        assert handler is not None
        try:
            status_code, answer = handler(command)
        except Exception as exc:
            log.error("command %d for session %s failed: %s", command.id, command.session_id, first_line(exc))
            status_code, answer = 500, {"success": False, "message": "internal error; see the owner's log"}
        log.info(
            "command %d for session %s: %s %s -> %d",
            command.id,
            command.session_id,
            command.method,
            command.path,
            status_code,
        )
        self.db.finish_command(command.id, status_code, answer)

    def _note_state(self, status: SessionStatus) -> None:
        """A state listener (under the runtime's lock): only takes note."""
        with self._live_lock:
            self._live_pending[status.session_id] = status
        self._live_changed.set()

    def _publish(self) -> None:
        """The owned sessions' live state into the database, for every instance's API to read."""
        while not self._stopping.is_set():
            if not self._live_changed.wait(LIVE_REFRESH_SECONDS):
                for session_id in self.hosted():
                    services = self.services(session_id)
                    status = services.runtime.status() if services is not None else None
                    if status is not None and status.owns_session:
                        with self._live_lock:
                            self._live_pending.setdefault(session_id, status)
            self._live_changed.clear()
            self._publish_pending()

    def _prune_commands(self) -> None:
        try:
            self.db.prune_commands(datetime.now(UTC) - COMMANDS_KEPT)
        except Exception as exc:
            log.debug("finished commands not pruned: %s", first_line(exc))

    def _publish_pending(self) -> None:
        with self._live_lock:
            pending, self._live_pending = self._live_pending, {}
        for status in pending.values():
            if not status.owns_session:
                continue  # only an owner speaks for a session (a released lease makes its row "not_running")
            try:
                self.db.publish_live(
                    LiveState(
                        session_id=status.session_id,
                        owner_id=self.instance_id,
                        state=status.state,
                        connected=status.connected,
                        phone=status.phone,
                        push_name=status.push_name,
                        last_error=status.last_error,
                    )
                )
            except Exception as exc:
                log.debug("live state of session %s not published: %s", status.session_id, first_line(exc))
                with self._live_lock:
                    self._live_pending.setdefault(status.session_id, status)


def _free(lease: LeaseInfo | None) -> bool:
    """Nobody holds the session: never owned, released, or run out."""
    return lease is None or lease.owner_id is None or lease.expires_in_seconds <= 0
