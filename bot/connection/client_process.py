"""One long-lived child process runs neonize for the connection rounds of many sessions.

A neonize client costs ~0.6 MB in a process that already runs one; the Python process and Go
runtime around it cost ~55 MB. So every round of every session runs in one shared child (many
clients, one Go runtime), behind the same ``events.WhatsAppClient`` per round as before. Kept
from a process per round:
- neonize opens a store connection pool on every ``connect()`` and never closes it: a child takes
  at most ``ROUNDS_PER_CHILD`` rounds, or fewer once its descriptors pass ``DESCRIPTORS_PER_CHILD``;
  then new rounds go to a new child and the old one exits when its last round ends (it drains);
- a Go panic ends the whole child: every round it hosted ends with an error (each session
  reconnects once, in a fresh child, from its local store: no QR), never the daemon;
- neonize and its own SQLite stay out of the daemon's process;
- the child leaves when its stdin closes, so it never outlives a daemon killed with -9.

The pipe speaks JSON lines, each tagged with its round. Daemon -> child: ``{"op": "open", "round": r,
"store": path}``, ``{"op": "stop", "round": r}``, ``{"op": "handled", "round": r, "id": message_id}``,
``{"op": name, "round": r, "id": call, "args": [...]}``. Child -> daemon: ``{"round": r, "event": ...}``
(``bot.connection.events.to_wire``), ``{"round": r, "reply": call, "result": ...}`` or ``..."error": "..."}``,
and last ``{"round": r, "end": error}``.

    python -m bot.connection.client_process LOG_LEVEL       (started by the daemon, not by hand)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bot.process.children import module_command, start_child
from bot.connection import events
from bot.process.errors import CallTimeout, SendOutcomeUnknown, ZapkeepError

log = logging.getLogger("bot.client_process")  # pinned: the name operators see in log lines

STOP_GRACE_SECONDS = 10.0  # whatsmeow's stop() waits for a slow dial (up to 60 s): not that long
CALL_TIMEOUT_SECONDS = 60.0
# Messages handed to the daemon and not yet logged, at most; a handler waits this long for room (see serve()).
UNLOGGED_WINDOW = 16
HANDLED_WAIT_SECONDS = 5.0
MEDIA_CALLS = ("download", "send_media")
MEDIA_CALL_TIMEOUT_SECONDS = 300.0
# A child takes at most this many rounds, and none more once it holds this many descriptors (neonize
# leaks a store connection pool per connect: ~2 descriptors a failed dial, ~7 a live round).
ROUNDS_PER_CHILD = 200
DESCRIPTORS_PER_CHILD = 2000
# After its stdin closes, the child gives its rounds this long to end, then exits.
EXIT_GRACE_SECONDS = 3.0
# A round that did not stop when asked is left to end in its child (whatsmeow's stop waits for a
# hanging dial, up to a minute); if it has not ended after this long, its child is killed.
ABANDONED_ROUND_SECONDS = 90.0
# A Go crash this soon after the newest round of its process opened is blamed on that round: its
# session's next rounds run in a process of their own (a store that crashes Go at every connect
# would otherwise take every session of the shared process down at every retry), until one of
# them ends without a crash.
SUSPECT_SECONDS = 30.0
# Each round's lanes, each with workers of its own (per round, so that in the shared child one
# session's slow calls never hold up another's), so that nothing an API caller asks can hold up a
# customer's reply: texts, read receipts and typing in one; files (slow uploads) in another; number
# checks (as slow as WhatsApp's servers are to answer) in a third. The API lets 2 checks run at
# once; the lane has room for twice that, as a check the daemon gave up on (no answer within
# CALL_TIMEOUT_SECONDS) may hold its worker until whatsmeow's own timeout ends it.
LANES: dict[str, tuple[tuple[str, ...], int]] = {
    "call": (("send_text", "mark_read", "set_typing", "logout", "request_pairing_code"), 4),
    "media": (MEDIA_CALLS, 2),
    "check": (("check_numbers",), 4),
}
CALLS = tuple(op for ops, _ in LANES.values() for op in ops)
# whatsmeow's errors after the message node was sent, while it waited for the server's answer
# (ErrIQTimedOut, ErrIQDisconnected, a cancelled context): the customer may already have it.
AMBIGUOUS_SEND_ERROR = re.compile(r"timed out|deadline exceeded|disconnected before|context canceled", re.IGNORECASE)


class ClientCallError(ZapkeepError):
    """The client process could not do what was asked (the message is neonize's error)."""


@dataclass
class _Call:
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: str | None = None
    unknown: bool = False  # asked, and never answered: it may have happened


class ProcessClient:
    """``events.WhatsAppClient`` for one round, run by the real neonize client in a client process.

    Made by ``ClientProcesses`` (the daemon's factory); made alone, it has a child of its own
    for its one round (the tests of a round do that)."""

    def __init__(
        self,
        store_path: Path,
        sink: events.EventSink,
        *,
        log_level: int = logging.INFO,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        call_timeout_seconds: float = CALL_TIMEOUT_SECONDS,
        child: list[str] | None = None,
        processes: ClientProcesses | None = None,
    ) -> None:
        self.store_path = store_path
        self._sink = sink
        self._stop_grace = stop_grace_seconds
        self._call_timeout = call_timeout_seconds
        self._own_processes = processes is None
        self._processes = processes or ClientProcesses(log_level, child=child, rounds_per_child=1)
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._round: int | None = None
        self._stopped = False
        self._ended = threading.Event()
        self._end: str | None = None
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        """The client process this round runs in."""
        child = self._child
        return None if child is None else child.pid

    def run(self) -> str | None:
        with self._lock:
            if self._stopped:
                return None
            self._child, self._round = self._processes.open_round(self)
        try:
            self._ended.wait()
        finally:
            if self._own_processes:  # its own child: gone with the round, as are its descriptors
                self._processes.close()
        return self._end

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            child, round_id = self._child, self._round
        if child is None or self._ended.is_set():
            return
        child.write({"op": "stop", "round": round_id})
        if not self._ended.wait(self._stop_grace):
            # whatsmeow's stop waits for a hanging dial (up to a minute): the round is over for the
            # daemon now; its client ends in the child (whose other rounds go on).
            log.warning("the client did not stop within %.0f s; leaving it to end in its process", self._stop_grace)
            self._finish(f"the client did not stop within {self._stop_grace:.0f} s")
            self._processes.abandoned(child, round_id)  # type: ignore[arg-type]

    def send_text(self, to_jid: str, text: str) -> str:
        return str(self._send_call("send_text", to_jid, text))

    def _send_call(self, op: str, *args: object, timeout: float | None = None) -> object:
        try:
            return self._call(op, *args, timeout=timeout)
        except CallTimeout as exc:
            raise SendOutcomeUnknown(str(exc)) from None  # asked, and never answered: it may have gone
        except ClientCallError as exc:
            if AMBIGUOUS_SEND_ERROR.search(str(exc)):
                raise SendOutcomeUnknown(str(exc)) from None  # the message may be on its way already
            raise

    def logout(self) -> None:
        self._call("logout")

    def request_pairing_code(self, phone: str) -> str:
        return str(self._call("request_pairing_code", phone))

    def mark_read(self, chat_jid: str, sender_jid: str, message_id: str) -> None:
        self._call("mark_read", chat_jid, sender_jid, message_id)

    def set_typing(self, chat_jid: str, typing: bool) -> None:
        self._call("set_typing", chat_jid, typing)

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        return list(self._call("check_numbers", numbers))  # type: ignore[call-overload]

    def download(self, media: str) -> str:
        return str(self._call("download", media, timeout=MEDIA_CALL_TIMEOUT_SECONDS))

    def send_media(
        self, to_jid: str, kind: str, data: str, mimetype: str, file_name: str | None, caption: str | None
    ) -> str:
        # An upload of megabytes takes its time: a timeout while it is sent would leave it unknown.
        args = (to_jid, kind, data, mimetype, file_name, caption)
        return str(self._send_call("send_media", *args, timeout=MEDIA_CALL_TIMEOUT_SECONDS))

    def message_handled(self, message_id: str) -> None:
        child = self._child
        if child is not None and not child.exited:  # (an abandoned round's messages count too)
            child.write({"op": "handled", "round": self._round, "id": message_id})

    def _call(self, op: str, *args: object, timeout: float | None = None) -> object:
        with self._lock:
            child = self._child
            if child is None or self._ended.is_set() or self._stopped:
                raise ClientCallError(f"{op}: the client is not running")
            call_id = next(self._ids)
            call = self._calls[call_id] = _Call()
        try:
            child.write({"op": op, "round": self._round, "id": call_id, "args": list(args)})
            limit = timeout or self._call_timeout
            answered = call.done.wait(limit)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)
        if not answered:
            raise CallTimeout(f"{op}: no answer from the client within {limit:.0f} s")
        if call.error is not None:
            raise (SendOutcomeUnknown if call.unknown else ClientCallError)(f"{op}: {call.error}")
        return call.result

    def _deliver(self, message: dict[str, object]) -> None:
        """A line of the child's for this round (its reader thread)."""
        if "event" in message:
            self._sink(events.from_wire(message))
        elif "reply" in message:
            self._answer(message)

    def _answer(self, message: dict[str, object]) -> None:
        with self._lock:
            call = self._calls.get(int(message["reply"]))  # type: ignore[call-overload]
        if call is not None:
            call.result = message.get("result")
            error = message.get("error")
            call.error = None if error is None else str(error)
            call.done.set()

    def _finish(self, error: str | None) -> None:
        """The round is over for the daemon: ``run`` returns ``error``; unanswered calls may have happened."""
        with self._lock:
            if self._ended.is_set():
                return
            self._end = error
            self._ended.set()
            calls = list(self._calls.values())
        for call in calls:
            call.error, call.unknown = "the client process ended", True
            call.done.set()


class _Child:
    """One client process (the daemon's side): its pipes, its reader thread, the rounds it hosts.
    ``rounds`` and the fields after it are guarded by the ``ClientProcesses`` lock."""

    def __init__(self, command: list[str], processes: ClientProcesses) -> None:
        self._processes = processes
        # Its own session: a Ctrl-C in the terminal reaches the daemon, which stops the rounds in order.
        self.process = start_child(command, own_session=True)
        self.pid = self.process.pid
        self.rounds: dict[int, ProcessClient] = {}  # every round whose events may still come
        self.opened_at: dict[int, float] = {}  # round -> time.monotonic() it opened
        self.live: set[int] = set()  # ... and those not yet over for the daemon
        self.opened = 0
        self.retiring = False  # no more rounds: it exits once the live ones end
        self.closing = False
        self.exited = False
        self._write_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, name=f"client-process-{self.pid}", daemon=True)
        self.reader.start()

    def descriptors(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:  # gone, or not Linux: the round limit still holds
            return 0

    def write(self, message: dict[str, object]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        # Bounded: a wedged child with a full pipe must not hold up a stop, or the other rounds for long.
        if not self._write_lock.acquire(timeout=STOP_GRACE_SECONDS):
            log.warning("the client process is not reading its commands")
            return
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (OSError, ValueError):  # the process is gone; its reader ends its rounds
            pass
        finally:
            self._write_lock.release()

    def close_input(self) -> None:
        """Its stdin closed: it stops what it still runs and exits."""
        stdin = self.process.stdin
        if stdin is not None and self._write_lock.acquire(timeout=STOP_GRACE_SECONDS):
            try:
                stdin.close()
            except OSError:
                pass
            finally:
                self._write_lock.release()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            for line in stdout:
                self._dispatch(line)
        finally:  # whatever happened here, its rounds end with it
            self.close_input()
            try:
                code = self.process.wait(EXIT_GRACE_SECONDS + STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
            stdout.close()
            self._processes.exited(self, f"the client process exited with code {code}")

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
            round_id = int(message["round"])
        except (ValueError, TypeError, KeyError) as exc:
            log.error("the client process sent a line this daemon cannot read: %s", exc)
            return
        client = self._processes.client_of(self, round_id)
        if client is None:
            return
        if "end" in message:
            end = message["end"]
            client._finish(None if end is None else str(end))
            self._processes.round_ended(self, round_id)
            return
        try:
            client._deliver(message)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("the client process sent a line this daemon cannot read: %s", exc)
            unreadable = _message_id_of(message)
            if unreadable is not None:  # never logged: its place in the window is given back
                client.message_handled(unreadable)


def _message_id_of(message: dict[str, object]) -> str | None:
    fields = message.get("fields")
    return str(fields["message_id"]) if isinstance(fields, dict) and "message_id" in fields else None


class ClientProcesses:
    """The daemon's client processes, and its ``events.ClientFactory``: each call is a round of a
    session, opened in the current child; a child that took ``rounds_per_child`` rounds or holds
    ``descriptors_per_child`` descriptors takes no more (the next round starts a new one) and
    exits once its last round has ended."""

    def __init__(
        self,
        log_level: int,
        *,
        child: list[str] | None = None,
        call_timeout_seconds: float = CALL_TIMEOUT_SECONDS,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        rounds_per_child: int = ROUNDS_PER_CHILD,
        descriptors_per_child: int = DESCRIPTORS_PER_CHILD,
    ) -> None:
        # The child's command line before LOG_LEVEL: the real client's (tests and benchmarks run a fake).
        self._command = [*(child or module_command("bot.connection.client_process")), str(log_level)]
        self._call_timeout = call_timeout_seconds
        self._stop_grace = stop_grace_seconds
        self._rounds_per_child = rounds_per_child
        self._descriptors_per_child = min(descriptors_per_child, _half_the_descriptor_limit())
        self._lock = threading.Lock()
        self._current: _Child | None = None
        self._children: list[_Child] = []
        self._ids = itertools.count(1)
        self._suspects: set[str] = set()  # store paths whose rounds run alone (see SUSPECT_SECONDS)

    def __call__(self, store_path: Path, sink: events.EventSink) -> events.WhatsAppClient:
        return ProcessClient(
            store_path,
            sink,
            processes=self,
            call_timeout_seconds=self._call_timeout,
            stop_grace_seconds=self._stop_grace,
        )

    def pids(self) -> list[int]:
        """The client processes running now."""
        with self._lock:
            return [child.pid for child in self._children]

    def open_round(self, client: ProcessClient) -> tuple[_Child, int]:
        with self._lock:
            child = self._current
            if str(client.store_path) in self._suspects:  # alone: a child that takes no other round
                child = _Child(self._command, self)
                child.retiring = True
                self._children.append(child)
            elif child is None or child.exited or self._full(child):
                if child is not None:
                    self._retire(child)
                child = self._current = _Child(self._command, self)
                self._children.append(child)
            round_id = next(self._ids)
            child.rounds[round_id] = client
            child.opened_at[round_id] = time.monotonic()
            child.live.add(round_id)
            child.opened += 1
        child.write({"op": "open", "round": round_id, "store": str(client.store_path)})
        return child, round_id

    def client_of(self, child: _Child, round_id: int) -> ProcessClient | None:
        with self._lock:
            return child.rounds.get(round_id)

    def round_ended(self, child: _Child, round_id: int) -> None:
        """The child said the round ended: nothing more of it will come."""
        with self._lock:
            client = child.rounds.pop(round_id, None)
            child.opened_at.pop(round_id, None)
            child.live.discard(round_id)
            if client is not None:
                self._suspects.discard(str(client.store_path))  # it ended without a crash
            if child is self._current and not child.live and self._full(child):
                self._retire(child)  # (no round would come to it: it may go now)
            close = self._drained(child)
        if close:
            child.close_input()

    def abandoned(self, child: _Child, round_id: int) -> None:
        """A round did not stop when asked: over for the daemon, while its client still ends in the child."""
        with self._lock:
            child.live.discard(round_id)
            close = self._drained(child)
        if close:
            child.close_input()
        timer = threading.Timer(ABANDONED_ROUND_SECONDS, self._kill_if_still_there, args=(child, round_id))
        timer.daemon = True
        timer.start()

    def _kill_if_still_there(self, child: _Child, round_id: int) -> None:
        with self._lock:
            wedged = round_id in child.rounds and not child.exited
        if wedged:  # a client that ignores stop is not left connected: its child's rounds reconnect
            log.error("a stopped client still runs after %.0f s; killing its client process", ABANDONED_ROUND_SECONDS)
            child.process.kill()

    def exited(self, child: _Child, reason: str) -> None:
        """The child is gone (a Go crash, a kill, or drained): every round it still hosted ends."""
        with self._lock:
            child.exited = True
            if self._current is child:
                self._current = None
            if not child.closing and child.opened_at:
                newest = max(child.opened_at, key=child.opened_at.__getitem__)
                if time.monotonic() - child.opened_at[newest] <= SUSPECT_SECONDS:
                    suspect = str(child.rounds[newest].store_path)
                    self._suspects.add(suspect)
                    log.error("the client of %s is suspected of the crash; its rounds run alone for now", suspect)
            clients = list(child.rounds.values())
            child.rounds.clear()
            child.live.clear()
            if child in self._children:
                self._children.remove(child)
        if clients and not child.closing:
            log.error("%s, ending %d round(s)", reason, len(clients))
        for client in clients:
            client._finish(reason)

    def close(self) -> None:
        """Every child told to stop its rounds and exit; waits for them (kills one that does not go)."""
        with self._lock:
            self._current = None
            children = list(self._children)
            for child in children:
                child.retiring = child.closing = True
        for child in children:
            child.close_input()
        for child in children:
            try:
                child.process.wait(EXIT_GRACE_SECONDS + 1)
            except subprocess.TimeoutExpired:
                child.process.kill()
            child.reader.join(EXIT_GRACE_SECONDS + STOP_GRACE_SECONDS)

    def _full(self, child: _Child) -> bool:
        return child.opened >= self._rounds_per_child or child.descriptors() >= self._descriptors_per_child

    def _retire(self, child: _Child) -> None:
        child.retiring = True
        if self._current is child:
            self._current = None

    def _drained(self, child: _Child) -> bool:
        """A retiring child with no live round closes its input now (once)."""
        if child.retiring and not child.live and not child.closing and not child.exited:
            child.closing = True
            return True
        return False


def _half_the_descriptor_limit() -> int:
    """Go raises a process's soft limit to the hard one: half of that leaves room for the live rounds."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return DESCRIPTORS_PER_CHILD if hard == resource.RLIM_INFINITY or hard <= 0 else hard // 2


def process_client_factory(
    log_level: int,
    child: list[str] | None = None,
    call_timeout_seconds: float = CALL_TIMEOUT_SECONDS,
    rounds_per_child: int = ROUNDS_PER_CHILD,
    descriptors_per_child: int = DESCRIPTORS_PER_CHILD,
) -> ClientProcesses:
    """The daemon's client factory: every session's rounds in shared client processes."""
    return ClientProcesses(
        log_level,
        child=child,
        call_timeout_seconds=call_timeout_seconds,
        rounds_per_child=rounds_per_child,
        descriptors_per_child=descriptors_per_child,
    )


# --- the child's side ------------------------------------------------------------------------------


ChildClientFactory = Callable[[Path, events.EventSink], events.WhatsAppClient]


class UnloggedWindow:
    """Messages with the daemon that it has not logged yet: at most ``size``. ``enter`` waits for
    room, ``wait`` seconds at most (then goes on without a place: whatsmeow is never held for good)."""

    def __init__(self, size: int, wait: float) -> None:
        self._room = threading.Semaphore(size)
        self._wait = wait
        self._lock = threading.Lock()
        self._placed: set[str] = set()

    def enter(self, message_id: str) -> None:
        if not self._room.acquire(timeout=self._wait):
            return
        with self._lock:
            if message_id not in self._placed:
                self._placed.add(message_id)
                return
        self._room.release()  # a redelivery of one already in the window: one place is enough

    def logged(self, message_id: str) -> None:
        with self._lock:
            placed = message_id in self._placed
            self._placed.discard(message_id)
        if placed:
            self._room.release()


@dataclass(frozen=True)
class _Round:
    client: events.WhatsAppClient
    window: UnloggedWindow
    lanes: dict[str, ThreadPoolExecutor]  # call name -> this round's lane


class _Rounds:
    """The child's rounds: each a client on its own thread, with its own window and lanes."""

    def __init__(self, client_factory: ChildClientFactory, output: IO[bytes]) -> None:
        self._factory = client_factory
        self._output = output
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._rounds: dict[int, _Round] = {}

    def emit(self, message: dict[str, object]) -> None:
        line = json.dumps(message, ensure_ascii=True).encode() + b"\n"
        with self._write_lock:
            try:
                self._output.write(line)
                self._output.flush()
            except (BrokenPipeError, ValueError):
                os._exit(0)  # the daemon is gone: so are its rounds

    def command(self, command: dict[str, object]) -> None:
        op, round_id = command.get("op"), command.get("round")
        if not isinstance(round_id, int):
            return
        if op == "open":
            self._open(round_id, Path(str(command.get("store"))))
            return
        with self._changed:
            found = self._rounds.get(round_id)
        if found is None:  # ended already: the daemon has failed its calls
            return
        if op == "stop":
            threading.Thread(target=found.client.stop, daemon=True).start()  # only this client
        elif op == "handled":
            found.window.logged(str(command.get("id")))
        elif op in CALLS:
            args = command.get("args")
            call = (round_id, found.client, command.get("id"), str(op), list(args) if isinstance(args, list) else [])
            found.lanes[str(op)].submit(self._answer, *call)

    def _open(self, round_id: int, store_path: Path) -> None:
        window = UnloggedWindow(UNLOGGED_WINDOW, HANDLED_WAIT_SECONDS)

        def sink(event: events.ClientEvent) -> None:
            if isinstance(event, events.IncomingMessage):
                window.enter(event.message_id)
            self.emit({"round": round_id, **events.to_wire(event)})

        try:
            client = self._factory(store_path, sink)
        except Exception as exc:
            self.emit({"round": round_id, "end": str(exc) or exc.__class__.__name__})
            return
        lanes: dict[str, ThreadPoolExecutor] = {}
        for name, (ops, workers) in LANES.items():
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-{round_id}")
            lanes.update(dict.fromkeys(ops, pool))
        found = _Round(client, window, lanes)
        with self._changed:
            self._rounds[round_id] = found
        threading.Thread(target=self._run, args=(round_id, found), name=f"round-{round_id}", daemon=True).start()

    def _run(self, round_id: int, found: _Round) -> None:
        try:
            error = found.client.run()
        except Exception as exc:
            error = str(exc) or exc.__class__.__name__
        with self._changed:
            self._rounds.pop(round_id, None)
            self._changed.notify_all()
        for pool in set(found.lanes.values()):
            pool.shutdown(wait=False)
        self.emit({"round": round_id, "end": error})

    def _answer(
        self, round_id: int, client: events.WhatsAppClient, call_id: object, op: str, args: list[object]
    ) -> None:
        try:
            self.emit({"round": round_id, "reply": call_id, "result": getattr(client, op)(*args)})
        except Exception as exc:
            self.emit({"round": round_id, "reply": call_id, "error": str(exc) or exc.__class__.__name__})

    def stop_all_and_exit(self) -> None:
        with self._changed:
            clients = [found.client for found in self._rounds.values()]
        for client in clients:
            threading.Thread(target=client.stop, daemon=True).start()
        with self._changed:
            self._changed.wait_for(lambda: not self._rounds, timeout=EXIT_GRACE_SECONDS)
        # neonize leaves non-daemon Go threads (and a log worker whose shutdown hangs) behind.
        os._exit(0)


def serve(client_factory: ChildClientFactory, commands: IO[bytes], output: IO[bytes]) -> None:
    """Run the rounds the daemon opens until its pipe closes; never returns (the process exits).

    whatsmeow acknowledges a message to the server before its handler runs, so what it has
    acknowledged and the daemon has not logged is lost if the daemon dies (kill -9, a crash).
    A message's handler therefore waits while ``UNLOGGED_WINDOW`` messages of its round are with
    the daemon unlogged (``HANDLED_WAIT_SECONDS`` at most): what can be lost is that window and
    neonize's buffer, instead of every message in the daemon's queue."""
    rounds = _Rounds(client_factory, output)
    for line in commands:
        try:
            command = json.loads(line)
        except ValueError:
            continue
        if isinstance(command, dict):
            rounds.command(command)
    # stdin closed: the daemon is gone, or done with this process. Stop every round, and leave soon.
    rounds.stop_all_and_exit()


def run_child(argv: list[str], client_factory: ChildClientFactory | None = None) -> None:
    """The child's entry point: ``LOG_LEVEL``; the real neonize client unless told otherwise."""
    from bot.process import logs

    level = int(argv[0])
    # The pipe gets a descriptor of its own; Go's stray prints to descriptor 1 ("Press Ctrl+C to
    # exit", "Login event: ...") go to the log instead of into the protocol.
    pipe = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logs.configure(level, os.environ.get("LOG_FORMAT", "text").strip().lower())  # the daemon's, checked at its boot
    if client_factory is None:
        from bot.connection import whatsapp  # neonize: only ever imported in this process

        whatsapp.configure_library_logging(level)
        client_factory = whatsapp.NeonizeClient
    serve(client_factory, sys.stdin.buffer, pipe)


if __name__ == "__main__":
    run_child(sys.argv[1:])
