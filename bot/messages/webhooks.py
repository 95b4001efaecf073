"""Webhooks: every event the database logged (``whatsapp_events``), POSTed to each WEBHOOK_URL,
signed, in order per chat, at least once, retried with backoff for more than a day.

Events are written in the transaction of what caused them (a message logged, a receipt, a
release), so a crash never loses one; this module only reads and delivers them, one thread per
endpoint, and only while this instance owns the session. A receiver that is down or slow delays
its own deliveries, never a reply: the chatbot does not wait for anything here.

Delivery body: ``{"id", "type", "time", "session_id", "data"}``. Headers: ``X-Zapkeep-Event``,
``X-Zapkeep-Event-Id`` and ``X-Zapkeep-Signature: t=<unix time>,v1=<hex>``, where ``v1`` is
HMAC-SHA256 over ``"<t>.<body>"`` with WEBHOOK_SECRET (see the README for a check).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from bot.process.errors import first_line
from bot.process.retry import RetrySchedule
from bot.session.state import SessionStatus, readiness_of
from bot.process.logs import session_thread
from database import BACKUP_FAILED, SESSION_STATE, Database, StoredEvent, is_unavailable

log = logging.getLogger("bot.webhooks")  # pinned: the name operators see in log lines

RETRY_SECONDS = (5, 15, 60, 300, 900, 1800, 3600)  # then every hour (a RetrySchedule's steps)
GIVE_UP_AFTER = timedelta(hours=26)  # "at least a day" of retries, then the event is given up
EVENT_RETENTION = timedelta(days=30)  # long past every retry; the event stream resumes within it
PRUNE_EVERY_SECONDS = 3600
# How often the journal looks for a failed backup in the status (a state change wakes it at once):
# reading the status five times a second cost a host of 100 sessions 500 reads a second, idle.
BACKUP_CHECK_SECONDS = 2.0
POST_TIMEOUT_SECONDS = 10.0  # an attempt's whole deadline: connect, send, status, headers and body
ERROR_CHARS = 200  # of what a receiver answered, kept in the last error (it may be anything)
POLL_SECONDS = 0.2  # how soon a new event is seen
BATCH = 500
PAGES_PER_PASS = 20  # events read past a waiting chat in one pass: 10,000


def endpoint_key(session_id: str, url: str) -> str:
    """How the database names a session's endpoint: a hash (a URL's path or query may hold a token)."""
    return hashlib.sha256(f"{session_id}\0{url}".encode()).hexdigest()[:32]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: urllib would follow it as a GET, without the body."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class _Deadline:
    """One endpoint's attempts, each with a deadline for the whole of it. A socket timeout is per
    read: a receiver that trickles a header line every few seconds would hold an attempt (and a
    shutdown) for ever. At the deadline, or at a stop, a watchdog thread shuts the attempt's
    connection down, which ends the read or write blocked on it at once."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._running = False
        self._ends_at = 0.0  # monotonic
        self._socket: socket.socket | None = None  # a duplicate of the attempt's socket: ours to close
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.cut = False  # the attempt was cut short: whatever it read, it is not delivered

    def begin(self, seconds: float) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="webhook-deadline", daemon=True)
                self._thread.start()
            self._running = True
            self._ends_at = time.monotonic() + seconds
            self.cut = self._stopped
            self._lock.notify()

    def end(self) -> None:
        with self._lock:
            self._running = False
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def stop(self) -> None:
        """Cut the attempt under way, and every later one at once: the dispatcher is stopping."""
        with self._lock:
            self._stopped = True
            self._cut()
            self._lock.notify()

    def connection(self, http_class: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        """``http_class``, with each socket it opens watched (before TLS wraps it: a handshake that
        trickles is cut too)."""

        def make(*args: object, **kwargs: object) -> http.client.HTTPConnection:
            conn = http_class(*args, **kwargs)  # type: ignore[arg-type]
            create = conn._create_connection  # type: ignore[attr-defined]
            conn._create_connection = lambda *a, **k: self._watched(create(*a, **k))  # type: ignore[attr-defined]
            return conn

        return make

    def _watched(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if self._running and self._socket is None:
                # A duplicate: closed only here, under the lock, its number is never another
                # socket's when the watchdog shuts it down; shutting it down ends the original too.
                self._socket = sock.dup()
                if self.cut:  # (the deadline passed while it connected)
                    self._shut()
        return sock

    def _watch(self) -> None:
        with self._lock:
            while not self._stopped:
                if not self._running or self.cut:
                    self._lock.wait()
                elif time.monotonic() >= self._ends_at:
                    self._cut()
                else:
                    self._lock.wait(self._ends_at - time.monotonic())

    def _cut(self) -> None:
        if self._running:
            self.cut = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the receiver closed it first


class _WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: object) -> http.client.HTTPResponse:
        return super().do_open(self._deadline.connection(http_class), req, **kwargs)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: object) -> http.client.HTTPResponse:
        return super().do_open(self._deadline.connection(http_class), req, **kwargs)


def failure_of(exc: BaseException) -> str:
    """What an attempt's exception says, in one printable line of ERROR_CHARS at most: a receiver
    may answer anything, and the status, the database and the log show this."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    text = first_line(exc)
    if isinstance(exc, http.client.HTTPException):  # its text alone may be the receiver's bytes
        text = f"malformed answer ({exc.__class__.__name__}): {text}"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def body_of(event: StoredEvent) -> bytes:
    """The JSON body of one delivery (the payload is spliced in as stored)."""
    head = json.dumps(
        {"id": event.id, "type": event.event_type, "time": event.created_at.isoformat(), "session_id": event.session_id}
    )
    return (head[:-1] + ', "data": ' + event.payload + "}").encode()


@dataclass
class EndpointStatus:
    url: str  # scheme, host and path only: never credentials or a query string
    settled_through: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    retrying: int = 0  # events waiting for their next attempt
    last_delivered_at: datetime | None = None
    last_error: str | None = None
    failing_since: datetime | None = None


@dataclass
class Endpoint:
    session_id: str
    url: str
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = endpoint_key(self.session_id, self.url)

    @property
    def shown(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


class Dispatcher:
    """Delivers one endpoint's events. Each pass reads the events after what the endpoint has
    settled, tries each chat's oldest open event (a chat whose oldest is waiting for a retry waits
    with it: order per chat), and moves the settled mark past what is done."""

    def __init__(
        self,
        db: Database,
        session_id: str,
        url: str,
        secret: str,
        *,
        event_types: tuple[str, ...],
        owns_session: Callable[[], bool],
        retry_seconds: tuple[float, ...] = RETRY_SECONDS,
        post_timeout: float = POST_TIMEOUT_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.session_id = session_id
        self.endpoint = Endpoint(session_id, url)
        self._secret = secret
        self._types = set(event_types)
        self._owns_session = owns_session
        self._retry = RetrySchedule(tuple(retry_seconds))
        self._timeout = post_timeout
        self._clock = clock
        self._stopping = threading.Event()
        self._thread = session_thread(session_id, self._run, "webhook")
        self._deadline = _Deadline()
        self._retrying: set[int] = set()  # events waiting for a retry, as this pass knows them
        self._opener = urllib.request.build_opener(
            _NoRedirects, _WatchedHTTP(self._deadline), _WatchedHTTPS(self._deadline)
        )
        self.status = EndpointStatus(self.endpoint.shown)
        self._registered = False

    def start(self) -> None:
        """Before the session's first event: a new endpoint gets everything from this start on."""
        try:
            self._settled_mark()
        except Exception as exc:  # the database is away: the thread registers once it is back
            log.warning("webhook %s: %s", self.endpoint.shown, first_line(exc))
        self._thread.start()

    def _settled_mark(self) -> int:
        """Read at every pass: another instance may have owned the session meanwhile and moved it."""
        if not self._registered:
            mark = self.db.register_endpoint(self.endpoint.key, self.session_id)
            self._registered = True
        else:
            mark = self.db.settled_through(self.endpoint.key, self.session_id)
        self.status.settled_through = mark
        return mark

    def stop(self) -> None:
        """At once: an attempt under way is cut short (not counted: the next start delivers its event)."""
        self._stopping.set()
        self._deadline.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self._owns_session() and self.deliver_once()
            except Exception as exc:  # the database is away: try again in a moment
                log.warning("webhook %s: %s", self.endpoint.shown, first_line(exc))
                busy = False
            if not busy:
                self._stopping.wait(POLL_SECONDS)

    def deliver_once(self) -> bool:
        """One pass; True when it delivered or settled something (another pass may find more)."""
        after = self._settled_mark()
        events = self.db.events_after(self.session_id, after, BATCH)
        if not events:
            self.status.retrying = 0  # (an event waiting for a retry is after the mark)
            return False
        # Past a chat that waits for a retry, later pages are read too: other chats go on.
        for _ in range(PAGES_PER_PASS - 1):
            if len(events) % BATCH:
                break
            more = self.db.events_after(self.session_id, events[-1].id, BATCH)
            if not more:
                break
            events += more
        tried, settled = self.db.open_deliveries(self.endpoint.key, after)
        self._retrying = set(tried)
        now = self._clock()
        waiting: set[str] = set()  # chats whose oldest open event is not delivered yet
        delivered: list[int] = []  # written at the end of the pass, with the new mark
        progressed = False
        for event in events:
            chat = event.chat_jid or ""
            if event.id in settled or event.event_type not in self._types:
                continue
            if chat in waiting or self._stopping.is_set() or not self._owns_session():
                waiting.add(chat)  # (demoted meanwhile: the new owner delivers it)
                continue
            earlier = tried.get(event.id)
            if earlier is not None and earlier.next_attempt_at is not None and earlier.next_attempt_at > now:
                waiting.add(chat)
                continue
            attempts = (earlier.attempts if earlier else 0) + 1
            error = self._post(event)
            if error is None:
                delivered.append(event.id)
                settled.add(event.id)
                self._retrying.discard(event.id)
                self._delivered()
                progressed = True
                continue
            if self._stopping.is_set():  # cut short by stop(): not the receiver's failure
                waiting.add(chat)
                continue
            given_up = now - event.created_at > GIVE_UP_AFTER
            delay = self._retry.delay(attempts)
            self.db.record_delivery(
                self.endpoint.key,
                event.id,
                attempts=attempts,
                delivered=False,
                next_attempt_at=self._clock() + timedelta(seconds=delay),  # (from its end: it may have taken 10 s)
                error=error,
                given_up=given_up,
            )
            if given_up:
                settled.add(event.id)
                self._retrying.discard(event.id)
                progressed = True
            else:
                waiting.add(chat)
                self._retrying.add(event.id)
            self._failed(event, error, given_up)
        self.status.retrying = len(self._retrying)
        open_ids = [e.id for e in events if e.id not in settled and e.event_type in self._types]
        mark = (min(open_ids) - 1) if open_ids else events[-1].id
        if mark > after or delivered:
            # (a crash before this line delivers this pass's events again: at least once)
            self.db.settle(self.endpoint.key, self.session_id, max(mark, after), [i for i in delivered if i > mark])
            self.status.settled_through = max(mark, after)
            progressed = True
        return progressed

    def _post(self, event: StoredEvent) -> str | None:
        """None when the endpoint took it (2xx) within the deadline; else why not. Every way an
        attempt can fail ends here as an answer, so that the caller counts it and backs off."""
        body = body_of(event)
        request = urllib.request.Request(
            self.endpoint.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "zapkeep-webhooks",
                "X-Zapkeep-Event": event.event_type,
                "X-Zapkeep-Event-Id": str(event.id),
                "X-Zapkeep-Signature": sign(self._secret, int(time.time()), body),
            },
        )
        self._deadline.begin(self._timeout)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                response.read(65536)
            error = None
        except urllib.error.HTTPError as exc:
            exc.close()
            error = failure_of(exc)
        except Exception as exc:  # refused, reset, timed out, DNS, TLS, an answer http.client refuses...
            error = failure_of(exc)
        finally:
            self._deadline.end()
        if self._deadline.cut:  # (a cut can end a read as if the answer were complete)
            return f"no complete answer within {self._timeout:g} s"
        return error

    def _delivered(self) -> None:
        status = self.status
        status.delivered += 1
        status.last_delivered_at = self._clock()
        if self._retrying:
            return  # still failing while an event waits for a retry (the console says so)
        if status.failing_since is not None:
            log.info("webhook %s: delivering again", self.endpoint.shown)
        status.failing_since = None
        status.last_error = None

    def _failed(self, event: StoredEvent, error: str, given_up: bool) -> None:
        status = self.status
        status.failed_attempts += 1
        status.last_error = error
        if status.failing_since is None:
            status.failing_since = self._clock()
            log.warning("webhook %s: delivery failed (%s); retrying with backoff", self.endpoint.shown, error)
        if given_up:
            status.given_up += 1
            log.error(
                "webhook %s: event %d (%s) given up after a day of retries",
                self.endpoint.shown,
                event.id,
                event.event_type,
            )


class StateJournal:
    """Writes the events whose cause is not a database write: every state change of the session
    (``session.state``, with the reason in words), told by the runtime as it happens, and a backup
    that failed (``backup.failed``), seen in its status. Kept in memory until the database takes them."""

    def __init__(self, db: Database, session_id: str, status: Callable[[], SessionStatus]) -> None:
        self.db = db
        self.session_id = session_id
        self._status = status
        self._noted: queue.SimpleQueue[tuple[str, dict]] = queue.SimpleQueue()
        self._pending: list[tuple[str, dict]] = []
        self._previous_state: str | None = None
        self._backup_error: str | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = session_thread(session_id, self._run, "state-journal")

    def on_state(self, status: SessionStatus) -> None:
        """A runtime state listener (called under the runtime's lock: it only takes note)."""
        payload = {
            "state": status.state,
            "previous": self._previous_state,
            "reason": readiness_of(status).reason,
            "last_error": status.last_error,
            "owner_id": status.owner_id,  # every instance tells its own state: a standby says so
            "owns_session": status.owns_session,
        }
        self._previous_state = status.state
        self._noted.put((SESSION_STATE, payload))
        self._wake.set()

    def start(self) -> None:
        self.on_state(self._status())  # the state it starts in
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.write()  # the last states (stopped), when the database still answers

    def _run(self) -> None:
        pruned = 0.0
        while not self._stopping.is_set():
            self._wake.wait(BACKUP_CHECK_SECONDS)
            self._wake.clear()
            if self._stopping.is_set():
                return
            if time.monotonic() - pruned > PRUNE_EVERY_SECONDS:
                pruned = time.monotonic()
                try:
                    self.db.prune_events(self.session_id, datetime.now(UTC) - EVENT_RETENTION)
                except Exception as exc:
                    log.warning("session %s: pruning old events failed: %s", self.session_id, first_line(exc))
            error = self._status().last_backup_error
            if error is not None and error != self._backup_error:
                self._noted.put((BACKUP_FAILED, {"error": error}))
            self._backup_error = error
            self.write()

    def write(self) -> None:
        while not self._noted.empty():
            self._pending.append(self._noted.get())
        while self._pending:
            event_type, payload = self._pending[0]
            try:
                self.db.record_event(self.session_id, event_type, None, payload)
            except Exception as exc:
                if is_unavailable(exc):
                    return  # the database is away: the events wait here until it is back
                log.error("session %s: %s event refused: %s", self.session_id, event_type, first_line(exc))
            self._pending.pop(0)
