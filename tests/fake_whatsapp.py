"""A stand-in for WhatsApp's servers, speaking through a client with neonize's behaviour.

Only the network is fake: the client works on the real store file the runtime gave it,
creates whatsmeow's schema there as neonize does, writes the device row when "the phone"
scans the QR, deletes it on an unlink (as whatsmeow does), and delivers events one at a
time from its own thread, the way Go calls neonize's handlers, and like the client process lets
at most ``UNLOGGED_WINDOW`` received messages be with the daemon unlogged (see ``emit``).

By default it is kinder than whatsmeow in four ways; each has a switch on ``FakeWhatsApp`` that
makes it behave as whatsmeow does (issue 29):
- ``offline_backlog`` / ``store_writes_before_connected`` / ``connected_gate``: whatsmeow dispatches
  ``Connected`` only after its pre-key check (a store write, and a round trip that takes its
  time), while messages queued at the server while the client was away may be delivered before it;
- ``logged_out_before_wipe``: on an unlink whatsmeow dispatches ``LoggedOut``, then deletes the device;
- ``logout_error`` / ``logout_emits_logged_out``: whatsmeow's ``Logout`` emits no ``LoggedOut``, and
  when its request fails it raises and deletes nothing;
- ``send_gate`` / ``unknown_send_outcomes``: a send takes time, and may end with no answer (the
  customer may have the message all the same: the client process raises ``SendOutcomeUnknown``).
"""

from __future__ import annotations

import base64

import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot.connection import events
from bot.connection.client_process import HANDLED_WAIT_SECONDS, UNLOGGED_WINDOW, UnloggedWindow
from bot.process.errors import SendOutcomeUnknown
from tests.synthetic import DEVICE_JID, SMALL, fill_store


@dataclass
class SentMessage:
    to: str
    text: str  # a file's caption
    message_id: str
    kind: str = "text"
    data: bytes | None = None
    mimetype: str | None = None
    file_name: str | None = None
    session_id: str | None = None  # whose client sent it (the store's directory names the session)


@dataclass
class FakeWhatsApp:
    schema_template: Path
    clients: list[FakeClient] = field(default_factory=list)
    connect_errors: list[str] = field(default_factory=list)
    sent: list[SentMessage] = field(default_factory=list)
    read: list[str] = field(default_factory=list)  # message ids marked read
    handled: list[str] = field(default_factory=list)  # message ids the daemon said it logged
    registered: set[str] = field(default_factory=set)  # phone numbers that are on WhatsApp
    number_checks: list[list[str]] = field(default_factory=list)  # the numbers of each check asked
    typing: list[tuple[str, bool]] = field(default_factory=list)
    send_failures: list[str] = field(default_factory=list)  # errors for the next sends
    files: dict[str, bytes] = field(default_factory=dict)  # on WhatsApp's media servers, by media reference
    connected: bool = True  # the servers answer; set False to make every connect fail
    offline_error: str = "failed to dial whatsapp web websocket: proxyconnect tcp: connection refused"
    # --- whatsmeow's harsher behaviours (see the module's docstring); off by default ---
    offline_backlog: list[events.IncomingMessage] = field(default_factory=list)  # delivered before Connected
    store_writes_before_connected: int = 0  # rows whatsmeow writes (its pre-key check) before Connected
    connected_gate: threading.Event | None = None  # Connected waits for it (a slow pre-key check)
    logged_out_before_wipe: bool = False  # unlink: LoggedOut first, the device deleted once it was handed over
    logout_error: str | None = None  # logout()'s request fails with this: nothing deleted, nothing emitted
    logout_emits_logged_out: bool = True  # False: as whatsmeow's Logout, which dispatches no LoggedOut
    send_gate: threading.Event | None = None  # sends wait for it (a slow send)
    unknown_send_outcomes: list[str] = field(default_factory=list)  # next sends: delivered, then no answer
    sends_started: list[str] = field(default_factory=list)  # every send's recipient, as it starts

    def factory(self, store_path: Path, sink: events.EventSink) -> FakeClient:
        client = FakeClient(self, store_path, sink)
        self.clients.append(client)
        return client

    def current(self, timeout: float = 10.0, session_id: str | None = None) -> FakeClient:
        """The client of the round now running (of that session, with several)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [
                c
                for c in self.clients
                if c.running.is_set() and not c.stopped.is_set() and session_id in (None, c.session_id)
            ]
            if running:
                return running[-1]
            time.sleep(0.01)
        raise AssertionError("no client is running")


class FakeClient:
    QR_PREFIX = "2@fakeqr"
    _ids = itertools.count(1)

    def __init__(self, network: FakeWhatsApp, store_path: Path, sink: events.EventSink) -> None:
        self.network = network
        self.store_path = store_path
        self._sink = sink
        self.running = threading.Event()
        self.stopped = threading.Event()
        self._outbox: queue.Queue[events.ClientEvent | _Marker | None] = queue.Queue()
        self._go_thread = threading.Thread(target=self._deliver, name="fake-go", daemon=True)
        # The client process's own window (one per round, as one process per round): received
        # messages with the daemon and not handed back yet.
        self._unlogged = UnloggedWindow(UNLOGGED_WINDOW, HANDLED_WAIT_SECONDS)
        self.qr_codes: list[str] = []
        self._crash: str | None = None

    @property
    def session_id(self) -> str:
        return self.store_path.parent.name

    # --- the client interface -----------------------------------------------------------

    def run(self) -> str | None:
        if self.network.connect_errors:
            return self.network.connect_errors.pop(0)
        if not self.network.connected:
            return self.network.offline_error
        self._create_schema()
        self._go_thread.start()
        self.running.set()
        if self.device_jid() is None:
            self.rotate_qr()
        else:
            if self.network.store_writes_before_connected:
                self.write_store(self.network.store_writes_before_connected)
            backlog, self.network.offline_backlog = self.network.offline_backlog, []
            for message in backlog:
                self.emit(message)
            gate = self.network.connected_gate
            while gate is not None and not gate.is_set() and not self.stopped.is_set():
                gate.wait(0.05)
            if not self.stopped.is_set():
                self.emit(events.Connected())
        self.stopped.wait()
        self._outbox.put(None)
        self._go_thread.join()  # like the client process: run() returns once every event is handed over
        return self._crash

    def crash(self) -> None:
        """A Go panic: the round ends at once, with the error the client process reports."""
        self._crash = "the client process exited with code 2"  # what a Go panic leaves
        self.stopped.set()

    def stop(self) -> None:
        self.stopped.set()

    def send_text(self, to_jid: str, text: str) -> str:
        if not self.running.is_set() or self.stopped.is_set():
            raise RuntimeError("client is nil")
        self.network.sends_started.append(to_jid)
        if self.network.send_gate is not None:
            self.network.send_gate.wait()
        if self.network.send_failures:
            raise RuntimeError(self.network.send_failures.pop(0))
        message_id = f"3EB0{next(self._ids):016X}"
        self.network.sent.append(SentMessage(to_jid, text, message_id, session_id=self.session_id))
        if self.network.unknown_send_outcomes:  # on its way to the customer; the answer never came back
            raise SendOutcomeUnknown(self.network.unknown_send_outcomes.pop(0))
        return message_id

    def send_media(
        self, to_jid: str, kind: str, data: str, mimetype: str, file_name: str | None, caption: str | None
    ) -> str:
        try:
            self.send_text(to_jid, caption or "")  # (the same checks and id; replaced below by the file)
        except SendOutcomeUnknown:
            self._as_file(kind, data, mimetype, file_name)
            raise
        return self._as_file(kind, data, mimetype, file_name)

    def _as_file(self, kind: str, data: str, mimetype: str, file_name: str | None) -> str:
        sent = self.network.sent.pop()
        to_jid, caption = sent.to, sent.text
        content = base64.b64decode(data)
        self.network.sent.append(
            SentMessage(to_jid, caption, sent.message_id, kind, content, mimetype, file_name, self.session_id)
        )
        return sent.message_id

    def download(self, media: str) -> str:
        if not self.running.is_set() or self.stopped.is_set():
            raise RuntimeError("client is nil")
        if media not in self.network.files:
            raise RuntimeError("failed to download media: 404 (expired on the server)")
        return base64.b64encode(self.network.files[media]).decode("ascii")

    def logout(self) -> None:
        if not self.running.is_set() or self.stopped.is_set():
            raise RuntimeError("client is nil")
        if self.network.logout_error is not None:  # whatsmeow: the request failed; nothing deleted
            raise RuntimeError(self.network.logout_error)
        if self.network.logout_emits_logged_out:
            self.unlink()
        else:
            self._delete_device()  # whatsmeow's Logout: the device deleted, no event

    def mark_read(self, chat_jid: str, sender_jid: str, message_id: str) -> None:
        if not self.running.is_set() or self.stopped.is_set():
            raise RuntimeError("client is nil")
        self.network.read.append(message_id)

    def set_typing(self, chat_jid: str, typing: bool) -> None:
        self.network.typing.append((chat_jid, typing))

    def message_handled(self, message_id: str) -> None:
        self.network.handled.append(message_id)
        self._unlogged.logged(message_id)

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        if not self.running.is_set() or self.stopped.is_set():
            raise RuntimeError("client is nil")
        self.network.number_checks.append(list(numbers))
        return [
            {"number": n, "on_whatsapp": n in self.network.registered, "jid": f"{n}@s.whatsapp.net"}
            if n in self.network.registered
            else {"number": n, "on_whatsapp": False, "jid": None}
            for n in numbers
        ]

    def request_pairing_code(self, phone: str) -> str:
        if not self.qr_codes:
            raise RuntimeError("client is nil")
        return "ABCD-EFGH"

    # --- what the phone and the servers do --------------------------------------------------

    def emit(self, event: events.ClientEvent) -> None:
        """The servers hand the client an event. A received message waits (5 s at most) while the
        window of unlogged messages is full, as the client process's handler does: whatsmeow takes
        no more meanwhile, and the rest wait at the server."""
        if isinstance(event, events.IncomingMessage):
            self._unlogged.enter(event.message_id)
        self._outbox.put(event)

    def rotate_qr(self) -> str:
        code = f"{self.QR_PREFIX}{len(self.qr_codes)},bm9pc2Uta2V5,aWRlbnRpdHk=,YWR2LXNlY3JldA=="
        self.qr_codes.append(code)
        self.emit(events.QrCode(code))
        return code

    def scan_qr(self) -> None:
        """The phone scanned the code: whatsmeow stores the device, then pairs and connects."""
        fill_store(self.store_path, SMALL)
        self.emit(events.Paired(jid=DEVICE_JID, platform="android"))
        self.emit(events.Connected())

    def write_store(self, rows: int = 5) -> None:
        """whatsmeow saving something (here: contacts) while connected."""
        conn = sqlite3.connect(self.store_path)
        with conn:
            start = conn.execute("SELECT COUNT(*) FROM whatsmeow_contacts").fetchone()[0]
            conn.executemany(
                "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
                [(DEVICE_JID, f"55319{n:08d}@s.whatsapp.net", f"Contato {n}") for n in range(start, start + rows)],
            )
        conn.close()

    def unlink(self) -> None:
        """Unlinked from the phone: whatsmeow deletes the device (cascading to its keys) and says so.
        With ``logged_out_before_wipe``, as whatsmeow orders it: ``LoggedOut`` is handed over first
        and the device deleted after, through the connection whatsmeow already had open."""
        if not self.network.logged_out_before_wipe:
            self._delete_device()
            self.emit(events.LoggedOut(reason="LOGGED_OUT"))
            return
        conn = self._open_store()
        self.emit(events.LoggedOut(reason="LOGGED_OUT"))
        self._outbox.put(_Marker(delivered := threading.Event()))
        delivered.wait(30)  # the daemon has the LoggedOut in hand
        with conn:
            conn.execute("DELETE FROM whatsmeow_device")
        conn.close()

    def _delete_device(self) -> None:
        conn = self._open_store()
        with conn:
            conn.execute("DELETE FROM whatsmeow_device")
        conn.close()

    def _open_store(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.store_path)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def device_jid(self) -> str | None:
        conn = sqlite3.connect(self.store_path)
        try:
            row = conn.execute("SELECT jid FROM whatsmeow_device").fetchone()
        finally:
            conn.close()
        return row[0] if row else None

    # --- internals -------------------------------------------------------------------------

    def _create_schema(self) -> None:
        """Like whatsmeow's upgrade on open: the schema appears in an empty store."""
        template = sqlite3.connect(self.network.schema_template)
        ddl = [sql for (sql,) in template.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")]
        version = template.execute("SELECT version, compat FROM whatsmeow_version").fetchone()
        template.close()
        conn = sqlite3.connect(self.store_path)
        with conn:
            if conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'whatsmeow_version'").fetchone()[0] == 0:
                for sql in ddl:
                    conn.execute(sql)
                conn.execute("INSERT INTO whatsmeow_version VALUES (?, ?)", version)
        conn.close()

    def _deliver(self) -> None:
        while (event := self._outbox.get()) is not None:
            if isinstance(event, _Marker):
                event.reached.set()
            else:
                self._sink(event)


@dataclass(frozen=True)
class _Marker:
    """Not an event: set once the fake's Go thread has handed over everything queued before it."""

    reached: threading.Event


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, message: str = "condition") -> None:
    """Poll until ``predicate`` holds. The deadline bounds a hang, it is not a speed: a machine
    whose cores are busy makes everything slower, never different (speeds are measured in bench/)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}")
