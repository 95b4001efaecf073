"""A stand-in for WhatsApp's servers on loopback, for soaks of the real daemon process.

``FakeServer`` runs in the benchmark's process. The daemon runs unchanged except for its client
process, which is ``python -m tests.fake_network ADDRESS LOG_LEVEL``: the real pipe protocol
(``bot.connection.client_process.run_child``) around ``NetworkClient``, which talks to the server instead of
WhatsApp. ADDRESS is the server's HOST:PORT, or ``STORE=HOST:PORT;STORE=HOST:PORT...`` for
one server per session (a client process hosts the rounds of many). Behaviour kept from whatsmeow, because the soak measures what follows from it:
- a message is acknowledged to the server before the handler sees it (whatsmeow's default,
  ``SynchronousAck`` off; neonize does not expose it): the server forgets it at once; then it
  waits in neonize's buffer (about 100 events) for Python's handler, which runs one at a time;
- messages for a session with no connection wait at the server and arrive on the next connect;
- a drop is whatsmeow's own reconnect: Disconnected, a pause, Connected, on the same client;
- a second connection of the same device replaces the first (StreamReplaced).

Several sessions (numbers) at once: each client names its session (its store's directory) in its
hello, and the server keeps each session's connection and waiting messages apart; ``hosting()``
says which daemon processes have a live connection of each session (two at once: double hosting).

Wire, JSON lines. Server -> client: ``{"message": {...}}``, ``{"drop": seconds}``,
``{"sent": call, "id": ...}``, ``{"checked": call, "contacts": [...]}``, ``{"replaced": true}``.
Client -> server: ``{"hello": pid, "session": id, "daemon": its daemon's pid}``, ``{"ack": message_id}``, ``{"send": call, "to": ..., "text": ...}``,
``{"check": call, "numbers": [...]}``, ``{"read": message_id}``, ``{"back": true}`` (reconnected
after a drop).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.connection import events


@dataclass
class Sent:
    to: str
    text: str
    message_id: str
    connection: int
    session: str = "default"


@dataclass(eq=False)  # one per socket: compared (and hashed) by identity
class _Connection:
    number: int
    sock: socket.socket
    pid: int | None = None
    session: str = "default"
    daemon: int | None = None  # the daemon process whose client this is
    paused: bool = False  # dropped: whatsmeow is reconnecting
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: dict[str, object]) -> bool:
        try:
            with self.lock:
                self.sock.sendall(json.dumps(message).encode() + b"\n")
            return True
        except OSError:
            self.alive = False
            return False


class FakeServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Condition()
        # Per session: not yet acknowledged.
        self._waiting: collections.defaultdict[str | None, collections.deque[dict[str, object]]] = (
            collections.defaultdict(collections.deque)
        )
        self._in_flight: dict[str, dict[str, object]] = {}  # written to the connection, not yet acknowledged
        self.acknowledged: dict[str, dict[str, object]] = {}  # message id -> message: the server forgot them
        self.sent: list[Sent] = []
        self.read: set[str] = set()
        self.connections = 0
        self.replaced = 0  # connections a newer one replaced: two clients of one session at once
        self.replaced_sessions: collections.Counter[str] = collections.Counter()
        self._alive: set[_Connection] = set()  # every connection said hello and is not closed yet
        self.registered: set[str] = set()  # phone numbers that are on WhatsApp
        self.check_seconds = 0.0  # how long WhatsApp's servers take to answer a number check
        self.checks_asked = 0
        self._checks_held = False
        self._held_checks: list[tuple[_Connection, object, list[str]]] = []
        self._current: dict[str, _Connection] = {}  # per session
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._closed = False
        threading.Thread(target=self._accept, name="fake-wa-accept", daemon=True).start()
        threading.Thread(target=self._deliver, name="fake-wa-deliver", daemon=True).start()

    # --- what the benchmark does ---------------------------------------------------------------

    def customer_sends(self, message: dict[str, object], session: str | None = None) -> None:
        """``session``: the number written to; None: a server of one number (whichever is connected)."""
        with self._lock:
            message["_session"] = session
            self._waiting[session].append(message)
            self._lock.notify_all()

    def hosting(self) -> dict[str, set[int]]:
        """Per session, the daemon processes with a live connection of it now (more than one:
        two instances host the session at once)."""
        with self._lock:
            hosts: dict[str, set[int]] = collections.defaultdict(set)
            for connection in self._alive:
                if connection.alive and connection.daemon is not None:
                    hosts[connection.session].add(connection.daemon)
            return dict(hosts)

    def drop(self, seconds: float, session: str | None = None) -> bool:
        """The connection breaks; whatsmeow reconnects after ``seconds``. False: nobody connected."""
        with self._lock:
            connection = self._connection_of(session)
            if connection is None or connection.paused:
                return False
            connection.paused = True
        return connection.send({"drop": seconds})

    def hold_checks(self) -> None:
        """Number checks get no answer until ``release_checks``."""
        with self._lock:
            self._checks_held = True

    def release_checks(self) -> None:
        with self._lock:
            self._checks_held = False
            held, self._held_checks = self._held_checks, []
        for connection, call, numbers in held:
            self._answer_check(connection, call, numbers)

    def checks_waiting(self) -> int:
        with self._lock:
            return len(self._held_checks)

    def connected_pid(self, session: str | None = None) -> int | None:
        with self._lock:
            current = self._connection_of(session)
            return None if current is None or current.paused else current.pid

    def backlog(self) -> int:
        with self._lock:
            return sum(len(waiting) for waiting in self._waiting.values()) + len(self._in_flight)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            self._lock.notify_all()

    # --- internals -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            connection = _Connection(next(self._numbers), sock)
            threading.Thread(target=self._read, args=(connection,), name="fake-wa-conn", daemon=True).start()

    def _read(self, connection: _Connection) -> None:
        with connection.sock.makefile("rb") as lines:
            try:
                for line in lines:
                    self._on_line(connection, json.loads(line))
            except (OSError, ValueError):
                pass
        self._closed_connection(connection)

    def _on_line(self, connection: _Connection, message: dict[str, object]) -> None:
        if "hello" in message:
            with self._lock:
                connection.session = str(message.get("session", "default"))
                connection.daemon = message.get("daemon")  # type: ignore[assignment]
                previous = self._current.get(connection.session)
                self._current[connection.session] = connection
                connection.pid = int(message["hello"])  # type: ignore[arg-type]
                self.connections += 1
                self._alive.add(connection)
                self._lock.notify_all()
            if previous is not None and previous.alive:
                self.replaced += 1
                self.replaced_sessions[connection.session] += 1
                previous.send({"replaced": True})
                self._requeue(previous)
        elif "ack" in message:
            with self._lock:
                acked = self._in_flight.pop(str(message["ack"]), None)
                if acked is not None:
                    self.acknowledged[str(message["ack"])] = acked
        elif "send" in message:
            message_id = f"3EB0SOAK{next(self._ids):012d}"
            with self._lock:
                sent = Sent(str(message["to"]), str(message["text"]), message_id, connection.number, connection.session)
                self.sent.append(sent)
            connection.send({"sent": message["send"], "id": message_id})
        elif "check" in message:
            numbers = [str(n) for n in message["numbers"]]  # type: ignore[attr-defined]
            with self._lock:
                self.checks_asked += 1
                if self._checks_held:
                    self._held_checks.append((connection, message["check"], numbers))
                    return
            if self.check_seconds > 0:
                timer = threading.Timer(self.check_seconds, self._answer_check, (connection, message["check"], numbers))
                timer.daemon = True
                timer.start()
            else:
                self._answer_check(connection, message["check"], numbers)
        elif "read" in message:
            with self._lock:
                self.read.add(str(message["read"]))
        elif "back" in message:
            with self._lock:
                connection.paused = False
                self._lock.notify_all()

    def _answer_check(self, connection: _Connection, call: object, numbers: list[str]) -> None:
        contacts = [
            {
                "number": n,
                "on_whatsapp": n in self.registered,
                "jid": f"{n}@s.whatsapp.net" if n in self.registered else None,
            }
            for n in numbers
        ]
        connection.send({"checked": call, "contacts": contacts})

    def _closed_connection(self, connection: _Connection) -> None:
        connection.alive = False
        with self._lock:
            self._alive.discard(connection)
            if self._current.get(connection.session) is connection:
                del self._current[connection.session]
        self._requeue(connection)
        connection.sock.close()

    def _requeue(self, connection: _Connection) -> None:
        """What a connection was given but never acknowledged is delivered again, first and in order."""
        with self._lock:
            if self._current.get(connection.session) is connection:
                return
            pending = [m for m in self._in_flight.values() if m["_connection"] == connection.number]
            for message in reversed(pending):
                del self._in_flight[str(message["message_id"])]
                self._waiting[connection.session].appendleft(message)
            self._lock.notify_all()

    def _connection_of(self, session: str | None) -> _Connection | None:
        """The session's live connection; for None, the only one (a server of one number)."""
        if session is not None:
            return self._current.get(session)
        return next(iter(self._current.values())) if len(self._current) == 1 else None

    def _ready(self) -> tuple[_Connection, collections.deque[dict[str, object]]] | None:
        """A session with a message waiting and a connection to take it (not dropped, not flooded)."""
        for session, waiting in self._waiting.items():
            connection = self._connection_of(session)
            if waiting and connection is not None and not connection.paused:
                in_flight = sum(1 for m in self._in_flight.values() if m["_connection"] == connection.number)
                if in_flight <= 50:
                    return connection, waiting
        return None

    def _deliver(self) -> None:
        while not self._closed:
            with self._lock:
                while not self._closed and (ready := self._ready()) is None:
                    self._lock.wait(0.5)
                if self._closed or ready is None:
                    return
                connection, waiting = ready
                message = waiting.popleft()
                message["_connection"] = connection.number
                self._in_flight[str(message["message_id"])] = message
            wire = {k: v for k, v in message.items() if not k.startswith("_")}
            if not connection.send({"message": wire}):
                self._closed_connection(connection)


# --- the client process's side ---------------------------------------------------------------------


NEONIZE_BUFFER = 100
IQ_TIMEOUT_SECONDS = 75.0  # the fake's stand-in for whatsmeow's own limit on an info query


class NetworkClient:
    """``events.WhatsAppClient`` for one round, talking to ``FakeServer``. It writes the store
    as whatsmeow does while connected (a contact row per new sender)."""

    def __init__(self, address: str, store_path: Path, sink: events.EventSink) -> None:
        host, port = address.rsplit(":", 1)
        self._address = (host, int(port))
        self._store_path = store_path
        self._sink = sink
        self._sock: socket.socket | None = None
        self._write_lock = threading.Lock()
        self._calls: dict[int, tuple[threading.Event, list[object]]] = {}
        self._ids = itertools.count(1)
        self._stopped = threading.Event()
        self._store: sqlite3.Connection | None = None
        self._contacts: set[str] = set()
        self._buffer: queue.Queue[dict[str, object] | None] = queue.Queue(NEONIZE_BUFFER)

    def run(self) -> str | None:
        if self._stopped.is_set():
            return None
        try:
            self._sock = socket.create_connection(self._address, timeout=5)
            self._sock.settimeout(None)
        except OSError as exc:
            return f"failed to dial whatsapp web websocket: {exc}"
        self._store = sqlite3.connect(self._store_path, check_same_thread=False)
        device = self._store.execute("SELECT jid FROM whatsmeow_device").fetchone()
        if device is None:
            return "the fake server pairs no new device"
        self._device = device[0]
        # The session is its store's directory ($DATA_DIR/sessions/<id>/); the daemon, this process's parent.
        self._send({"hello": os.getpid(), "session": self._store_path.parent.name, "daemon": os.getppid()})
        self._sink(events.Connected())
        handler = threading.Thread(target=self._handle_messages, name="python-handler", daemon=True)
        handler.start()
        error: str | None = "websocket disconnected"
        with self._sock.makefile("rb") as lines:
            try:
                for line in lines:
                    message = json.loads(line)
                    if "message" in message:
                        self._receive(message["message"])
                    elif "drop" in message:
                        threading.Thread(target=self._reconnect, args=(float(message["drop"]),), daemon=True).start()
                    elif "sent" in message:
                        self._answer(int(message["sent"]), str(message["id"]))
                    elif "checked" in message:
                        self._answer(int(message["checked"]), message["contacts"])
                    elif "replaced" in message:
                        self._sink(events.StreamReplaced())
                        error = None
                        break
            except (OSError, ValueError):
                pass
        if self._stopped.is_set():
            error = None
        self._buffer.put(None)
        handler.join()
        self._close()
        return error

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def send_text(self, to_jid: str, text: str) -> str:
        return str(self._ask({"to": to_jid, "text": text}, "send", 30, "websocket not connected"))

    def mark_read(self, chat_jid: str, sender_jid: str, message_id: str) -> None:
        self._send({"read": message_id})

    def set_typing(self, chat_jid: str, typing: bool) -> None:
        pass

    def logout(self) -> None:
        raise RuntimeError("the fake server does not unlink")

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        # As long as the servers take (whatsmeow's info query gives up after its own timeout).
        return list(self._ask({"numbers": numbers}, "check", IQ_TIMEOUT_SECONDS, "info query timed out"))  # type: ignore[call-overload]

    def _ask(self, fields: dict[str, object], kind: str, timeout: float, error: str) -> object:
        call = next(self._ids)
        done: threading.Event = threading.Event()
        result: list[object] = []
        self._calls[call] = (done, result)
        if not self._send({kind: call, **fields}) or not done.wait(timeout):
            self._calls.pop(call, None)
            raise RuntimeError(error)
        return result[0]

    def request_pairing_code(self, phone: str) -> str:
        raise RuntimeError("the fake server pairs no new device")

    def _receive(self, message: dict[str, object]) -> None:
        self._send({"ack": message["message_id"]})  # whatsmeow acknowledges before the handler runs
        self._buffer.put(message)  # full: whatsmeow waits, and acknowledges nothing more

    def _handle_messages(self) -> None:
        while (message := self._buffer.get()) is not None:
            self._handle(message)

    def _handle(self, message: dict[str, object]) -> None:
        sender = str(message["sender"])
        if sender not in self._contacts and self._store is not None:  # whatsmeow saves the push name
            with self._store:
                self._store.execute(
                    "INSERT OR REPLACE INTO whatsmeow_contacts (our_jid, their_jid, push_name) VALUES (?, ?, ?)",
                    (self._device, sender, str(message["push_name"])),
                )
            self._contacts.add(sender)
        self._sink(events.IncomingMessage(**message))  # type: ignore[arg-type]

    def _reconnect(self, seconds: float) -> None:
        self._sink(events.Disconnected())
        time.sleep(seconds)
        if not self._stopped.is_set() and self._send({"back": True}):
            self._sink(events.Connected())

    def _answer(self, call: int, answer: object) -> None:
        done, result = self._calls.pop(call, (None, None))
        if done is not None and result is not None:
            result.append(answer)
            done.set()

    def _send(self, message: dict[str, object]) -> bool:
        if self._sock is None:
            return False
        try:
            with self._write_lock:
                self._sock.sendall(json.dumps(message).encode() + b"\n")
            return True
        except OSError:
            return False

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._store is not None:
            self._store.close()
            self._store = None


if __name__ == "__main__":
    from bot.connection import client_process

    if os.environ.get("ZAPKEEP_SOAK_NO_HAND_BACK") == "1":  # the soak's comparison: as before the hand-back
        client_process.HANDLED_WAIT_SECONDS = 0.0
    if os.environ.get("ZAPKEEP_BENCH_SHARED_LANE") == "1":  # bench_stalls's "before": one lane of 4 but files
        calls = tuple(
            op for ops, _ in client_process.LANES.values() for op in ops if op not in client_process.MEDIA_CALLS
        )
        client_process.LANES = {"call": (calls, 4), "media": (client_process.MEDIA_CALLS, 2)}
    servers = dict(entry.rsplit("=", 1) for entry in sys.argv[1].split(";")) if "=" in sys.argv[1] else {}
    client_process.run_child(
        sys.argv[2:], lambda store, sink: NetworkClient(servers.get(str(store), sys.argv[1]), store, sink)
    )
