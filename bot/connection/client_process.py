"""Each WhatsApp connection round runs neonize in a child process of its own.

neonize's Go side opens a new store connection pool on every connect and never closes it, and a
Go panic takes its whole process down. A process per round gives every descriptor and byte back
when the round ends, keeps a crash inside the round, and keeps the daemon free of the second
SQLite (neonize's) that must never share a process with Python's.

The pipe speaks JSON lines. Child -> daemon: ``{"event": ...}`` (``bot.connection.events.to_wire``),
``{"reply": id, "result": ...}`` or ``{"reply": id, "error": "..."}``, and last ``{"end": error}``.
Daemon -> child: ``{"op": "stop"}`` or ``{"op": name, "id": id, "args": [...]}``. The child ends
its round when its stdin closes, so it never outlives a daemon killed with -9.

    python -m bot.connection.client_process STORE LOG_LEVEL       (started by the daemon, not by hand)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
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
_NO_END = object()
MEDIA_CALLS = ("download", "send_media")
MEDIA_CALL_TIMEOUT_SECONDS = 300.0
# The child's lanes, each with workers of its own, so that nothing an API caller asks can hold up a
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
    """``events.WhatsAppClient`` over a child process running the real neonize client."""

    def __init__(
        self,
        store_path: Path,
        sink: events.EventSink,
        *,
        log_level: int = logging.INFO,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        call_timeout_seconds: float = CALL_TIMEOUT_SECONDS,
        child: list[str] | None = None,
    ) -> None:
        # The child's command line before STORE LOG_LEVEL: the real client's (benchmarks run a fake).
        child = child or module_command("bot.connection.client_process")
        self._command = [*child, str(store_path), str(log_level)]
        self._sink = sink
        self._stop_grace = stop_grace_seconds
        self._call_timeout = call_timeout_seconds
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def run(self) -> str | None:
        with self._lock:
            if self._stopped:
                return None
            # Its own session: a Ctrl-C in the terminal reaches the daemon, which stops the round in order.
            self._process = start_child(self._command, own_session=True)
            process = self._process
        assert process.stdout is not None
        end: object = _NO_END
        try:
            for line in process.stdout:
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not a JSON object")
                    if "event" in message:
                        self._sink(events.from_wire(message))
                    elif "reply" in message:
                        self._answer(message)
                    elif "end" in message:
                        end = message["end"]
                except (ValueError, TypeError, KeyError) as exc:
                    log.error("the client process sent a line this daemon cannot read: %s", exc)
                    unreadable = _message_id_of(line)
                    if unreadable is not None:  # never logged: its place in the window is given back
                        self.message_handled(unreadable)
        finally:  # whatever happened here, the round's process and pipes end with it
            if process.poll() is None:
                process.kill()
            code = process.wait()
            process.stdout.close()
            if process.stdin is not None and self._write_lock.acquire(timeout=STOP_GRACE_SECONDS):
                try:
                    process.stdin.close()
                finally:
                    self._write_lock.release()
            self._fail_calls("the client process ended")
        if end is not _NO_END:
            return None if end is None else str(end)
        return f"the client process exited with code {code}"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            process = self._process
        if process is None or process.poll() is not None:
            return
        self._write({"op": "stop"})
        try:
            process.wait(self._stop_grace)
        except subprocess.TimeoutExpired:
            log.warning("the client process did not stop within %.0f s; killing it", self._stop_grace)
            process.kill()
            process.wait()

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
        with self._lock:
            running = self._process is not None and self._process.poll() is None
        if running:
            self._write({"op": "handled", "id": message_id})

    def _call(self, op: str, *args: object, timeout: float | None = None) -> object:
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None or self._stopped:
                raise ClientCallError(f"{op}: the client is not running")
            call_id = next(self._ids)
            call = self._calls[call_id] = _Call()
        try:
            self._write({"op": op, "id": call_id, "args": list(args)})
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

    def _answer(self, message: dict[str, object]) -> None:
        with self._lock:
            call = self._calls.get(int(message["reply"]))  # type: ignore[call-overload]
        if call is not None:
            call.result = message.get("result")
            error = message.get("error")
            call.error = None if error is None else str(error)
            call.done.set()

    def _fail_calls(self, reason: str) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.error, call.unknown = reason, True
            call.done.set()

    def _write(self, message: dict[str, object]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        # Bounded: a wedged child with a full pipe must not hold up stop(), which kills it next.
        if not self._write_lock.acquire(timeout=STOP_GRACE_SECONDS):
            log.warning("the client process is not reading its commands")
            return
        try:
            process.stdin.write(json.dumps(message).encode() + b"\n")
            process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the process is gone; run() reports how it ended
            pass
        finally:
            self._write_lock.release()


def _message_id_of(line: bytes) -> str | None:
    try:
        fields = json.loads(line)["fields"]
        return str(fields["message_id"]) if isinstance(fields, dict) and "message_id" in fields else None
    except (ValueError, TypeError, KeyError):
        return None


def process_client_factory(
    log_level: int, child: list[str] | None = None, call_timeout_seconds: float = CALL_TIMEOUT_SECONDS
) -> events.ClientFactory:
    def factory(store_path: Path, sink: events.EventSink) -> events.WhatsAppClient:
        return ProcessClient(
            store_path, sink, log_level=log_level, call_timeout_seconds=call_timeout_seconds, child=child
        )

    return factory


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


def serve(client_factory: ChildClientFactory, store_path: Path, commands: IO[bytes], output: IO[bytes]) -> None:
    """Run one round of a client on store_path; never returns (the process exits).

    whatsmeow acknowledges a message to the server before its handler runs, so what it has
    acknowledged and the daemon has not logged is lost if the daemon dies (kill -9, a crash).
    A message's handler therefore waits while ``UNLOGGED_WINDOW`` messages are with the daemon
    unlogged (``HANDLED_WAIT_SECONDS`` at most): what can be lost is that window and neonize's
    buffer, instead of every message in the daemon's queue."""
    write_lock = threading.Lock()
    window = UnloggedWindow(UNLOGGED_WINDOW, HANDLED_WAIT_SECONDS)

    def emit(message: dict[str, object]) -> None:
        line = json.dumps(message, ensure_ascii=True).encode() + b"\n"
        with write_lock:
            try:
                output.write(line)
                output.flush()
            except (BrokenPipeError, ValueError):
                os._exit(0)  # the daemon is gone: so is this round

    def sink(event: events.ClientEvent) -> None:
        if not isinstance(event, events.IncomingMessage):
            emit(events.to_wire(event))
            return
        window.enter(event.message_id)
        emit(events.to_wire(event))

    client = client_factory(store_path, sink)
    lanes: dict[str, ThreadPoolExecutor] = {}
    for name, (ops, workers) in LANES.items():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        lanes.update(dict.fromkeys(ops, pool))

    def answer(call_id: object, op: str, args: list[object]) -> None:
        try:
            emit({"reply": call_id, "result": getattr(client, op)(*args)})
        except Exception as exc:
            emit({"reply": call_id, "error": str(exc) or exc.__class__.__name__})

    def read_commands() -> None:
        for line in commands:
            try:
                command = json.loads(line)
            except ValueError:
                continue
            op = command.get("op")
            if op == "stop":
                threading.Thread(target=client.stop, daemon=True).start()
            elif op == "handled":
                window.logged(str(command.get("id")))
            elif op in CALLS:
                lanes[op].submit(answer, command.get("id"), op, list(command.get("args", [])))
        # stdin closed: the daemon is gone. Stop the round, and leave soon whether it stops or not.
        threading.Thread(target=client.stop, daemon=True).start()
        threading.Timer(3.0, os._exit, args=(0,)).start()

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    error = client.run()
    emit({"end": error})
    # neonize leaves non-daemon Go threads (and a log worker whose shutdown hangs) behind.
    os._exit(0)


def run_child(argv: list[str], client_factory: ChildClientFactory | None = None) -> None:
    """The child's entry point: ``STORE LOG_LEVEL``; the real neonize client unless told otherwise."""
    from bot.process import logs

    store_path, level = Path(argv[0]), int(argv[1])
    # The pipe gets a descriptor of its own; Go's stray prints to descriptor 1 ("Press Ctrl+C to
    # exit", "Login event: ...") go to the log instead of into the protocol.
    pipe = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logs.configure(level, os.environ.get("LOG_FORMAT", "text").strip().lower())  # the daemon's, checked at its boot
    if client_factory is None:
        from bot.connection import whatsapp  # neonize: only ever imported in this process

        whatsapp.configure_library_logging(level)
        client_factory = whatsapp.NeonizeClient
    serve(client_factory, store_path, sys.stdin.buffer, pipe)


if __name__ == "__main__":
    run_child(sys.argv[1:])
