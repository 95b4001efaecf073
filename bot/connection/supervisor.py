"""The connection supervisor, one part of the runtime: the client's rounds one after another, the
events they deliver applied to the state, and the watchdog that starts a fresh round when whatsmeow
gave up without saying so.

``ConnectionSupervisor`` is a part of ``bot.runtime.Runtime`` (a base class of it), not an object of
its own: its methods read and change the runtime's state under the runtime's one lock, exactly as
they did inside the runtime; splitting that state between two objects would split the lock."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from bot.connection import events
from bot.process.errors import StateConflictError, ZapkeepError, headline
from bot.session.state import State, now, phone_of
from bot.session.store_worker import prepare_store

log = logging.getLogger("bot.runtime")  # the runtime's log lines, unchanged by the move


class Pending(enum.IntEnum):
    """Why the supervisor stopped the current client, applied before the next round.
    A more important reason is never overridden by a lesser one."""

    NEW_ROUND = 1
    RESTORE = 2
    LOGGED_OUT = 3
    REPLACED = 4
    DEMOTED = 5  # the lease is gone: this process must not talk to WhatsApp any more


class ConnectionSupervisor:
    """The rounds (thread ``supervisor``) and the events (thread ``events``) of a ``Runtime``."""

    # --- the connection supervisor -----------------------------------------------------------------

    def _supervise(self) -> None:
        store_prepared = False
        while not self._stopping.is_set():
            with self._lock:
                pending, self._pending = self._pending, None
                self._wake.clear()  # whatever woke us is being handled now
                ending = pending in (Pending.REPLACED, Pending.DEMOTED) or not self._lease.fresh()
                self._supervisor_ending = ending
            if ending:
                self._fail_restore_request("the session was handed over before the restore could run")
                # Replaced: write nothing more. Demoted: the fence refuses any write anyway.
                try:
                    self._mirror.stop(flush=pending is None)
                except ZapkeepError as exc:
                    log.error("session %s: %s", self.config.session_id, exc)
                return  # never (re)connect without a lease that is surely still ours
            if pending is Pending.LOGGED_OUT:
                self._wipe_session()
                self._needs_restore = False  # the unlinked session is gone: pairing again
                store_prepared = False
            if pending is Pending.RESTORE:
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
            "session %s: %s; retrying in %.1f s (attempt %d)",
            self.config.session_id,
            headline(error),
            delay,
            self._failures,
        )
        log.debug("session %s: the round ended with: %s", self.config.session_id, error)
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

    def _stop_client(self, pending: Pending | None = None) -> None:
        self._finish_client_stop(self._claim_client_stop(pending))

    def _claim_client_stop(self, pending: Pending | None) -> events.WhatsAppClient | None:
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
                client = self._claim_client_stop(Pending.LOGGED_OUT)
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
                client = self._claim_client_stop(Pending.REPLACED)
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
            self._stop_client(Pending.NEW_ROUND)
        elif stalled:
            log.warning(
                "session %s: no connection %.0f s after a drop; starting a new connection round",
                self.config.session_id,
                self._timing.reconnect_watchdog_seconds,
            )
            self._set(last_error="whatsmeow's reconnect stalled; started a new connection round")
            self._stop_client(Pending.NEW_ROUND)
