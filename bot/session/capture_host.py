"""The daemon's side of the one capture child that serves the mirrors of every session.

A mirror used to start a child process of its own (about 9 MB of memory each, one process a number);
now every mirror of the daemon speaks to one shared ``python -m bot.session.capture_process`` over
its own channel (``MirrorProcess``, the name kept): requests are tagged with the channel and an id,
one reader thread hands each answer to the mirror waiting for it, and the child serves each store
from a thread of its own, so one session's long poll or slow scan never waits for another's.

The child lives while a mirror uses it: started by the first channel, ended (stdin closed) when the
last one closes, and it ends by itself when the daemon dies (end of input, also after a kill -9).
If it dies, every waiting request fails with ``MirrorProcessError``; each mirror closes its
channel and opens a new one, which starts a fresh child. Nothing is lost: change capture is durable
in each store's change log, read again from the last sequence the database holds.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bot.process.children import module_command, start_child
from bot.process.errors import ZapkeepError
from bot.session.change_capture import Batch


CLOSE_TIMEOUT = 30.0  # a store's thread finishes the read or trim under way first


class MirrorProcessError(ZapkeepError):
    """The capture child died, or failed on this mirror's store; the mirror opens its channel again."""


@dataclass
class _Waiting:
    done: threading.Event = field(default_factory=threading.Event)
    answer: bytes | None = None
    error: str | None = None


class CaptureChild:
    """One running capture child: its pipes, its reader thread, the requests waiting for answers."""

    def __init__(self) -> None:
        self._process = start_child(module_command("bot.session.capture_process"))
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}
        self._ended: str | None = None  # why the child is gone, once it is
        self.channels = 0  # open channels (counted by CaptureHost, under its lock)
        self._reader = threading.Thread(target=self._read, name="capture-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._ended is None

    def send(self, message: dict) -> None:
        """One line to the child; MirrorProcessError when it is gone."""
        line = json.dumps(message).encode() + b"\n"
        try:
            with self._write_lock:
                assert self._process.stdin is not None
                self._process.stdin.write(line)
                self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise MirrorProcessError(f"the mirror process is gone ({exc.__class__.__name__})") from exc

    def request(self, request_id: int, message: dict, timeout: float | None = None) -> bytes:
        """Send a request and wait for its answer (the JSON text)."""
        waiting = _Waiting()
        with self._lock:
            if self._ended is not None:
                raise MirrorProcessError(self._ended)
            self._waiting[request_id] = waiting
        try:
            self.send(message)
        except MirrorProcessError:
            with self._lock:
                self._waiting.pop(request_id, None)
            raise
        if not waiting.done.wait(timeout):
            with self._lock:
                self._waiting.pop(request_id, None)
            raise MirrorProcessError(f"the mirror process did not answer within {timeout:.0f} s")
        if waiting.error is not None:
            raise MirrorProcessError(waiting.error)
        assert waiting.answer is not None
        return waiting.answer

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            for line in stdout:
                head, _, body = line.partition(b" ")
                with self._lock:
                    waiting = self._waiting.pop(int(head), None)
                if waiting is not None:
                    waiting.answer = body
                    waiting.done.set()
        except (OSError, ValueError):
            pass  # (the pipe closed under us, or a garbled line: either way the child is done for)
        code = self._process.wait()
        with self._lock:
            self._ended = f"the mirror process exited with code {code}"
            waiting_now, self._waiting = list(self._waiting.values()), {}
        for waiting in waiting_now:
            waiting.error = self._ended
            waiting.done.set()

    def close(self) -> None:
        """End of input: the child closes every store and exits; killed if it has not within 5 s."""
        try:
            with self._write_lock:
                if self._process.stdin is not None:
                    self._process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()


class CaptureHost:
    """Hands out channels into the current capture child, starting one when there is none (or the
    last one died), and ending it when its last channel closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: CaptureChild | None = None
        self._ids = itertools.count(1)  # channel and request numbers, never reused

    def next_id(self) -> int:
        return next(self._ids)

    def attach(self) -> CaptureChild:
        with self._lock:
            if self._child is None or not self._child.alive:
                self._child = CaptureChild()
            self._child.channels += 1
            return self._child

    def detach(self, child: CaptureChild) -> None:
        with self._lock:
            child.channels -= 1
            if child.channels > 0:
                return
            if self._child is child:
                self._child = None
        child.close()  # (outside the lock: a new channel meanwhile starts a new child, never waits for this one)

    def child_pid(self) -> int | None:
        """The running child's process id (for measurements and tests)."""
        with self._lock:
            return self._child.pid if self._child is not None and self._child.alive else None


SHARED = CaptureHost()  # the daemon's one capture child (started by the first mirror, not at import)


class MirrorProcess:
    """One mirror's channel into the shared capture child: one store, one request at a time."""

    def __init__(self, store_path: Path, session_id: str = "", host: CaptureHost = SHARED) -> None:
        self._host = host
        self.channel = host.next_id()
        self._child: CaptureChild | None = host.attach()
        try:
            self._child.send({"channel": self.channel, "op": "open", "store": str(store_path), "session": session_id})
        except MirrorProcessError:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def request(self, payload: dict) -> Batch:
        child = self._child
        if child is None:
            raise MirrorProcessError("the channel is closed")
        request_id = self._host.next_id()
        answer = json.loads(child.request(request_id, {**payload, "channel": self.channel, "id": request_id}))
        if "error" in answer:
            raise MirrorProcessError(f"the mirror process failed on this store: {answer['error']}")
        return Batch.from_json(answer)

    def nudge(self) -> None:
        """End a waiting poll now."""
        child = self._child
        if child is not None:
            try:
                child.send({"channel": self.channel, "op": "nudge"})
            except MirrorProcessError:
                pass

    def close(self) -> None:
        """Let the store go in the child and wait until it has (its connection and watch closed:
        a restore may replace the store's files next); the child ends with its last channel."""
        child, self._child = self._child, None
        if child is None:
            return
        request_id = self._host.next_id()
        try:
            child.request(request_id, {"channel": self.channel, "op": "close", "id": request_id}, CLOSE_TIMEOUT)
        except MirrorProcessError:
            pass  # (gone: its connections went with it; stuck: the child is ended below if it was the last)
        self._host.detach(child)
