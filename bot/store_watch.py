"""Noticing that whatsmeow changed its store, cheaply and without opening it.

The live store belongs to neonize's own SQLite: this process may only ``os.stat`` it (size
and modification time of the file and of its ``-wal``). Changes are debounced: each one
pushes the backup back by ``debounce`` seconds, but a store that never stops changing is
still backed up ``max_delay`` seconds after its first unsaved change.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

Signature = tuple[int, ...]


def store_signature(store_path: Path) -> Signature | None:
    """(size, mtime) of the store and its -wal; None while there is no store."""
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


class StoreWatcher:
    def __init__(self, store_path: Path, *, max_delay: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store_path = store_path
        self._max_delay = max_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: Signature | None = None
        self._pending_since: float | None = None

    def poll(self) -> bool:
        """True when the store changed and the debounced backup should be (re)scheduled."""
        signature = store_signature(self.store_path)
        now = self._clock()
        with self._lock:
            if signature == self._seen:
                return False
            first_sight, self._seen = self._seen is None, signature
            if first_sight or signature is None:
                return False  # a store that appeared (or vanished) is not a change to back up
            if self._pending_since is None:
                self._pending_since = now
            return now - self._pending_since <= self._max_delay  # overdue: let the scheduled one run

    def backup_started(self) -> None:
        """The debounced backup is running: later changes start a new wait."""
        with self._lock:
            self._pending_since = None

    def forget(self) -> None:
        """The store was replaced (restore, wipe): its next signature is a first sight, not a change."""
        with self._lock:
            self._seen = None
