"""Change detection of the live store by os.stat alone, with debouncing."""

from __future__ import annotations

import os
from pathlib import Path

from bot.store_watch import StoreWatcher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def touch(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a distinct mtime even on coarse clocks


def test_changes_of_the_store_and_its_wal_reschedule_until_the_maximum_delay(tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    clock = Clock()
    watcher = StoreWatcher(store, max_delay=10, clock=clock)
    assert watcher.poll() is False  # no store yet
    touch(store, b"a")
    assert watcher.poll() is False  # first sight is not a change
    assert watcher.poll() is False  # nothing new

    touch(store, b"ab")
    assert watcher.poll() is True
    clock.now += 6
    touch(Path(f"{store}-wal"), b"frames")
    assert watcher.poll() is True  # within 10 s of the first unsaved change: push the backup back
    clock.now += 6
    touch(Path(f"{store}-wal"), b"more frames")
    assert watcher.poll() is False  # 12 s: overdue, the scheduled backup must not move again

    watcher.backup_started()
    touch(store, b"abc")
    assert watcher.poll() is True  # a new wait begins


def test_a_replaced_store_is_a_first_sight_not_a_change(tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    watcher = StoreWatcher(store, max_delay=10, clock=Clock())
    touch(store, b"old")
    watcher.poll()
    watcher.forget()  # restored over
    touch(store, b"restored")
    assert watcher.poll() is False
