"""How the shared capture child waits, per store, for a commit or for the daemon's next word.

One child watches every session's store (``bot.session.capture_process``), a thread per store. A
store's thread waits on its ``Inbox`` (the daemon's requests and nudges for that store, put there
by the child's reader of stdin) and on its store's writes: one inotify descriptor for the whole
child (a watch per store directory, its events routed by file name to the inboxes), so a watched
store costs no descriptor of its own beyond SQLite's. Without inotify (not Linux) a waiting thread
looks at the store file's size and time every few ms instead.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from collections import deque
from pathlib import Path

POLL_INTERVAL_SECONDS = 0.005  # without inotify: how often a waiting poll looks at the store file (os.stat)
SAFETY_NET_SECONDS = 5.0  # with inotify, still look at the file this often (a missed wake-up costs that long)

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_WATCH_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

NUDGE = None  # what a nudge is in an inbox: it ends a waiting poll, it is no request


def store_signature(store_path: Path) -> tuple[int, ...] | None:
    """(size, mtime) of the store and its -wal: a commit changes it; None while there is no store."""
    parts: list[int] = []
    for path in (store_path, Path(f"{store_path}-wal")):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            if path == store_path:
                return None
            parts += [0, 0]
            continue
        parts += [stat.st_size, stat.st_mtime_ns]
    return tuple(parts)


class Inbox:
    """One store's requests (dicts, or ``NUDGE``) and whether its store was written, under one
    condition: its thread sleeps on it until either comes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[dict | None] = deque()
        self._written = False
        self._closed = False

    def put(self, item: dict | None) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def store_written(self) -> None:
        with self._cond:
            self._written = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> bool:
        """A line (a nudge, the next request) has arrived, or the store is being let go."""
        with self._cond:
            return bool(self._items) or self._closed

    def take_written(self) -> bool:
        with self._cond:
            written, self._written = self._written, False
            return written

    def written(self) -> bool:
        with self._cond:
            return self._written

    def wait(self, timeout: float) -> None:
        """Until something arrives, the store is written or ``timeout`` passes."""
        with self._cond:
            if not self._items and not self._written and not self._closed:
                self._cond.wait(timeout)

    def next(self) -> dict | bool | None:
        """The next item, waiting for it; False once closed (what was still queued is dropped)."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            return self._items.popleft()


class Notifier:
    """The child's one inotify descriptor and the thread that routes its events to the inboxes of
    the stores they concern; None of it when inotify is not there (see ``open``)."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc
        self._lock = threading.Lock()
        self._watches: dict[int, list[tuple[str, Inbox]]] = {}  # wd -> (store file name, inbox)
        self._thread = threading.Thread(target=self._route, name="capture-inotify", daemon=True)
        self._thread.start()

    @staticmethod
    def open() -> Notifier | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None  # not Linux: every watch polls instead
        return Notifier(fd, libc) if fd >= 0 else None

    def add(self, store_path: Path, inbox: Inbox) -> int | None:
        """Route writes to the store's files to ``inbox``; the watch's number, None if it failed."""
        with self._lock:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(store_path.parent), _WATCH_MASK)
            if wd < 0:
                return None
            self._watches.setdefault(wd, []).append((store_path.name, inbox))
            return wd

    def remove(self, wd: int, inbox: Inbox) -> None:
        """Stop routing to ``inbox``; the directory's watch goes with the last store in it."""
        with self._lock:
            left = [(name, i) for name, i in self._watches.get(wd, []) if i is not inbox]
            if left:
                self._watches[wd] = left
            elif self._watches.pop(wd, None) is not None:
                self._libc.inotify_rm_watch(self._fd, wd)  # (fails harmlessly when the directory is gone)

    def _route(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                return
            if not data:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode(errors="replace")
                offset += _EVENT.size + length
                with self._lock:
                    if mask & _IN_Q_OVERFLOW:  # events were lost: wake every store, each looks for itself
                        targets = [i for watchers in self._watches.values() for _, i in watchers]
                    elif mask & _IN_IGNORED:  # the directory is gone: its stores fall back to the safety net
                        targets = [i for _, i in self._watches.pop(wd, [])]
                    else:  # SQLite's files of a store all begin with its name (-wal, -shm, -journal)
                        targets = [i for store, i in self._watches.get(wd, []) if name.startswith(store)]
                for inbox in targets:
                    inbox.store_written()


class StoreWatch:
    """Waits for a write to one store (or an item in its inbox) without spending CPU."""

    def __init__(self, store_path: Path, inbox: Inbox, notifier: Notifier | None) -> None:
        self.store_path = store_path
        self.inbox = inbox
        self._notifier = notifier
        self._wd = notifier.add(store_path, inbox) if notifier is not None else None
        self._signature = store_signature(store_path)

    def arm(self) -> bool:
        """Forget what happened so far: call right before reading the store, so no later commit is
        missed. True when the store was written since the last call (a commit may be about to
        become visible: SQLite writes the WAL, then publishes the commit in shared memory, which
        inotify does not see)."""
        self._signature = store_signature(self.store_path)
        return self.inbox.take_written() if self._wd is not None else False

    def wait(self, timeout: float) -> str:
        """'changed', 'nudged' or 'timeout'."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self.inbox.pending():
                return "nudged"
            if self.inbox.written() or store_signature(self.store_path) != self._signature:
                return "changed"
            if remaining <= 0:
                return "timeout"
            self.inbox.wait(min(remaining, SAFETY_NET_SECONDS if self._wd is not None else POLL_INTERVAL_SECONDS))

    def close(self) -> None:
        if self._notifier is not None and self._wd is not None:
            self._notifier.remove(self._wd, self.inbox)
            self._wd = None
