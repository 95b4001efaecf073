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
"""

from __future__ import annotations

import logging
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
from database import Command, Database, LiveState

log = logging.getLogger("bot.host")

CommandHandler = Callable[[Command], tuple[int, dict]]
LIVE_REFRESH_SECONDS = 30.0  # an owner re-publishes its sessions' state this often (a lost race heals)
COMMANDS_KEPT = timedelta(days=1)  # finished commands (their answers) are kept this long
COMMANDS_PRUNE_SECONDS = 3600.0
STOP_WORKERS = 128  # sessions shut down side by side: each may wait for its client (a hanging dial: 10 s) and its lease
START_WORKERS = 8  # ... and boot side by side: each restores its store and starts its client


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
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._started = False
        self._live_changed = threading.Event()
        self._live_lock = threading.Lock()  # taken under runtimes' locks: never holds another
        self._live_pending: dict[str, SessionStatus] = {}
        self._threads: list[threading.Thread] = []
        self._command_workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commands")

    # --- what other parts ask -------------------------------------------------------------------

    @property
    def default_session_id(self) -> str:
        return self.config.session_id

    def hosted(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

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
        with ThreadPoolExecutor(max_workers=START_WORKERS, thread_name_prefix="starting") as pool:
            list(pool.map(self._host, self._wanted()))  # each boot waits on its database and its store
        for target, name in ((self._sync, "host-sync"), (self._serve_commands, "commands"), (self._publish, "live")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Every session stopped (its last changes stored, its lease released), side by side."""
        self._stopping.set()
        self._live_changed.set()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            sessions = list(self._sessions.items())
        with ThreadPoolExecutor(max_workers=STOP_WORKERS, thread_name_prefix="stopping") as pool:
            list(pool.map(lambda item: self._stop_services(*item), sessions))
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
        try:
            if services is not None:
                if logout:
                    try:
                        services.runtime.logout()
                    except Exception as exc:  # not paired, not connected: nothing to unlink
                        log.info("session %s: not unlinked from the phone: %s", session_id, first_line(exc))
                self._stop_services(session_id, services)
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
        with logs.working_for(session_id):
            services.start()

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
        owned them: beside an owner, a delete goes through that owner)."""
        while not self._stopping.wait(self._timing.sync_seconds):
            hosted = set(self.hosted())  # before the database is read: a session created meanwhile is in both
            if self.config.single_session:
                wanted = set() if self._gone() else {self.config.session_id}
            else:
                try:
                    wanted = set(self.db.session_ids()[: self.config.max_sessions])
                except Exception as exc:  # the database is away: keep hosting what runs
                    log.debug("session list unavailable: %s", first_line(exc))
                    continue
            for session_id in sorted(wanted - hosted):
                if len(self.hosted()) < self.config.max_sessions:
                    self._host(session_id)
            for session_id in sorted(hosted - wanted):
                with self._lock:
                    services = None if session_id in self._deleting else self._sessions.pop(session_id, None)
                if services is not None:
                    log.info("session %s was deleted by another instance; stopping it here", session_id)
                    self._stop_services(session_id, services)
                    self._forget(session_id, keep_history=True)

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
        """The owned sessions' live state into the database, for every instance's API to read (and,
        now and then, the finished commands pruned)."""
        pruned = 0.0
        while not self._stopping.is_set():
            if time.monotonic() - pruned > COMMANDS_PRUNE_SECONDS:
                pruned = time.monotonic()
                self._prune_commands()
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
