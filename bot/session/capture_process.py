"""The mirror process: one long-lived connection to the local whatsmeow store, reading its change log.

Runs only in a child process (it opens the store with Python's ``sqlite3``; neonize's own SQLite
must never share a process with it, see docs/neonize.md). The objects it reads (triggers, change log,
lineage) are ``bot.session.change_capture``'s.

``python -m bot.session.capture_process STORE`` is the long-lived mirror process. It answers one JSON
request a line on stdin with one JSON line on stdout:

    {"op": "poll", "after": S, "wait": SECONDS}   changes committed after sequence S (waiting up
                                                  to SECONDS for one), once the log up to S is trimmed
    {"op": "scan", "after": S, "known": {table: {key: hash}}}
                                                  every row of the store against what the database
                                                  holds: the difference, as changes

An empty line ends a poll's wait early. Both answers read the store in one read transaction, so a
batch is always the store as of one commit: the database never sees half a whatsmeow transaction.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import sqlite3
import sys
import time
from pathlib import Path

from bot.session.cells import canonical_json
from bot.session.change_capture import (
    BUSY_TIMEOUT_SECONDS,
    CHANGES_TABLE,
    Batch,
    TableDef,
    _lineage,
    device,
    diff_against,
    ensure_capture,
    read_changes,
    sequence,
    table_defs,
)

POLL_INTERVAL_SECONDS = 0.005  # without inotify: how often a waiting poll looks at the store file (os.stat)
PUBLISH_WAIT_SECONDS = 1.0  # how long a commit seen being written may take to become visible


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


class Requests:
    """Lines from a raw descriptor, with the buffer in view: a waiting poll must know whether a
    line (a nudge, the next request) has already arrived, which select() alone cannot tell."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def buffered(self) -> bool:
        return b"\n" in self._buffer

    def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:  # end of input: the daemon is gone or stopping
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer.extend(chunk)
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line


class StoreWatch:
    """Waits for a write to the store (or a line on ``nudge_fd``) without spending CPU: inotify on
    the store's directory on Linux, else a look at the file's size and time every few ms."""

    _IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100

    def __init__(self, store_path: Path, requests: Requests) -> None:
        self.store_path = store_path
        self._requests = requests
        self._inotify = self._open_inotify(store_path.parent)
        self._signature = store_signature(store_path)

    def _open_inotify(self, directory: Path) -> int | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None  # not Linux: poll instead
        if fd < 0:
            return None
        mask = self._IN_MODIFY | self._IN_CLOSE_WRITE | self._IN_MOVED_TO | self._IN_CREATE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return fd

    def arm(self) -> bool:
        """Forget what happened so far: call right before reading the store, so no later commit is
        missed. True when the store was written since the last call (a commit may be about to
        become visible: SQLite writes the WAL, then publishes the commit in shared memory, which
        inotify does not see)."""
        self._signature = store_signature(self.store_path)
        if self._inotify is None:
            return False
        drained = False
        try:
            while os.read(self._inotify, 65536):
                drained = True
        except BlockingIOError:
            pass
        return drained

    def wait(self, timeout: float) -> str:
        """'changed', 'nudged' or 'timeout'."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self._requests.buffered():
                return "nudged"
            if remaining <= 0:
                return "timeout"
            fds = [self._requests.fd] + ([self._inotify] if self._inotify is not None else [])
            # With inotify, still look at the file every second: a safety net for a missed wake-up.
            step = min(remaining, 1.0 if self._inotify is not None else POLL_INTERVAL_SECONDS)
            readable, _, _ = select.select(fds, [], [], step)
            if self._requests.fd in readable:
                return "nudged"
            if readable or store_signature(self.store_path) != self._signature:
                return "changed"

    def close(self) -> None:
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None


class CaptureSession:
    """The mirror process's one connection to the store."""

    def __init__(self, store_path: Path, requests: Requests | None = None) -> None:
        self.store_path = store_path
        self.watch = None if requests is None else StoreWatch(store_path, requests)
        self.conn = sqlite3.connect(
            f"{store_path.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
        )
        self._schema_version: int | None = None
        self._tables: dict[str, TableDef] = {}
        self._trimmed_upto = -1

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.conn.close()

    def _refresh_schema(self) -> tuple[list[TableDef] | None, list[str]]:
        """Triggers verified whenever the schema changed (a whatsmeow upgrade may recreate tables)."""
        version = self._schema_cookie()
        if version == self._schema_version:
            return None, []
        installed: set[str] = set()
        while True:
            installed.update(ensure_capture(self.conn))
            # Remember only a version that ensure_capture looked at: whatsmeow may create its tables
            # between that look and our reading of the version, and caching the later version would
            # leave them without triggers for good (their changes then reached no batch, not even
            # the shutdown's last one). A version that moved (our triggers, or whatsmeow) is looked at again.
            settled = self._schema_cookie()
            if settled == version:
                break
            version = settled
        self._schema_version = version
        defs = table_defs(self.conn)
        self._tables = {t.name: t for t in defs}
        return defs, sorted(installed)

    def _schema_cookie(self) -> int:
        return self.conn.execute("PRAGMA schema_version").fetchone()[0]  # moves with every CREATE, DROP, ALTER

    def poll(self, after: int, wait: float) -> Batch:
        assert self.watch is not None, "a poll needs a StoreWatch"
        defs, installed = self._refresh_schema()
        self.trim(after)
        deadline = time.monotonic() + wait
        while True:
            written = self.watch.arm()
            batch = self._read(after, defs, installed)
            remaining = deadline - time.monotonic()
            if batch.changes or defs is not None or remaining <= 0:
                return batch
            if written:
                # A commit was being written as we read (SQLite writes the WAL, syncs it, and only
                # then publishes the commit in shared memory, which inotify does not see).
                outcome = self._wait_published(min(remaining, PUBLISH_WAIT_SECONDS))
            else:
                outcome = self.watch.wait(remaining)
            if outcome == "nudged" or (outcome == "timeout" and time.monotonic() >= deadline):
                return batch  # (a stop or a reconciliation) or nothing happened in time
            defs, installed = self._refresh_schema()

    def _data_version(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]  # moves when another connection commits

    def _wait_published(self, timeout: float) -> str:
        assert self.watch is not None
        seen, deadline = self._data_version(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = self.watch.wait(0.002)
            if outcome != "timeout" or self._data_version() != seen:
                return "changed" if outcome == "timeout" else outcome
        return "timeout"

    def _read(self, after: int, defs: list[TableDef] | None, installed: list[str]) -> Batch:
        self.conn.execute("BEGIN")  # one read transaction: the store as of one commit
        try:
            seq, changes = read_changes(self.conn, self._tables, after)
            touched = any(c.table == "whatsmeow_device" for c in changes)
            return Batch(
                sequence=seq,
                changes=changes,
                lineage=_lineage(self.conn) or "",
                device=device(self.conn) if touched or defs is not None else None,
                tables=defs,
                triggers_installed=installed,
            )
        finally:
            self.conn.execute("COMMIT")

    def scan(self, after: int, known: dict[str, dict[str, str]]) -> Batch:
        _, installed = self._refresh_schema()
        self.conn.execute("BEGIN")
        try:
            defs = table_defs(self.conn)
            self._tables = {t.name: t for t in defs}
            _, pending = read_changes(self.conn, self._tables, after)
            changes, differing = diff_against(self.conn, defs, known)
            missed = len(differing - {(c.table, c.key) for c in pending})
            return Batch(
                sequence=sequence(self.conn),  # the database becomes this store: its own number
                changes=changes,
                lineage=_lineage(self.conn) or "",
                device=device(self.conn),
                tables=defs,
                triggers_installed=installed,
                missed=missed,
            )
        finally:
            self.conn.execute("COMMIT")

    def trim(self, upto: int) -> None:
        """Forget changes the database has: one short write, only when there is something to
        forget, and skipped when whatsmeow holds the write lock (never make it wait for us)."""
        if upto <= self._trimmed_upto:
            return
        if self.conn.execute(f"SELECT 1 FROM {CHANGES_TABLE} WHERE seq <= ? LIMIT 1", (upto,)).fetchone() is None:
            self._trimmed_upto = upto
            return
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return  # whatsmeow is writing; trim next time rather than hold it up
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        try:
            self.conn.execute(f"DELETE FROM {CHANGES_TABLE} WHERE seq <= ?", (upto,))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self._trimmed_upto = upto


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bot.session.capture_process STORE_PATH", file=sys.stderr)
        return 2
    requests = Requests(sys.stdin.fileno())
    session = CaptureSession(Path(argv[0]), requests)
    out = sys.stdout.buffer
    try:
        nudged = False
        while line := requests.readline():
            if not line.strip():
                nudged = True  # (it may come before the poll it was meant to cut short: that one must not wait)
                continue
            request = json.loads(line)
            if request["op"] == "poll":
                batch = session.poll(int(request["after"]), 0.0 if nudged else float(request["wait"]))
            elif request["op"] == "scan":
                batch = session.scan(int(request["after"]), request["known"])
            else:
                raise ValueError(f"unknown request {request['op']!r}")
            nudged = False
            out.write(canonical_json(batch.to_json()) + b"\n")
            out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    except sqlite3.Error as exc:
        print(f"mirror process: {exc}", file=sys.stderr)
        return 1
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
