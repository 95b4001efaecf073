"""The capture child: one long-lived process reading the change log of every watched store.

Runs only in a child process (it opens the stores with Python's ``sqlite3``; neonize's own SQLite
must never share a process with it, see docs/neonize.md). The objects it reads (triggers, change log,
lineage) are ``bot.session.change_capture``'s.

``python -m bot.session.capture_process`` is started once by the daemon and serves the mirrors of
all its sessions (``bot.session.capture_host``). Each mirror speaks on its own channel (a number):
it opens the channel on its store, then sends one JSON request a line on stdin, answered by one line
``<id> <JSON>`` on stdout:

    {"channel": C, "op": "open", "store": PATH, "session": ID}   watch a store (no answer)
    {"channel": C, "op": "poll", "id": N, "after": S, "wait": SECONDS}
                                                  changes committed after sequence S (waiting up
                                                  to SECONDS for one), once the log up to S is trimmed
    {"channel": C, "op": "scan", "id": N, "after": S, "known": {table: {key: hash}}}
                                                  every row of the store against what the database
                                                  holds: the difference, as changes
    {"channel": C, "op": "nudge"}                 end that channel's waiting poll early (no answer)
    {"channel": C, "op": "close", "id": N}        let the store go: answered once its connection and
                                                  watch are closed (a restore may replace the file next)

A store's failure is that request's answer (``{"error": ...}``), never the others'. Both answers
read the store in one read transaction, so a batch is always the store as of one commit: the
database never sees half a whatsmeow transaction. End of input (the daemon stopped, or was killed)
ends the child.
"""

from __future__ import annotations

import ctypes
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from bot.session.capture_watch import NUDGE, Inbox, Notifier, StoreWatch
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

# SQLite's page cache per store (its default is 2 MiB, kept for good by a long-lived child that
# watches many stores). Measured: 10 medium stores in one child 91 -> 73 MB PSS, scans no slower
# (whatsmeow's writes empty the cache anyway; a scan reads each page once).
CACHE_KIB = 256
PUBLISH_WAIT_SECONDS = 1.0  # how long a commit seen being written may take to become visible


class CaptureSession:
    """The capture child's one connection to a store."""

    def __init__(self, store_path: Path, watch: StoreWatch | None = None) -> None:
        """``watch`` (needed by ``poll``) becomes the session's: closed with it."""
        self.store_path = store_path
        self.watch = watch
        try:
            self.conn = sqlite3.connect(
                f"{store_path.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
            )
        except BaseException:
            if watch is not None:
                watch.close()
            raise
        self.conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
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


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def share_malloc_arenas() -> None:
    """glibc gives each thread a heap (arena) of its own, up to 8 a core, and a heap keeps what a
    thread's peak (a scan) used: with a thread per store, that made the shared child keep every
    store's last scan (37 MB of PSS per medium store, 10 stores: 369 MB). Two arenas for all the
    threads: 9 MB per medium store. Call before any thread starts; a no-op where it is not glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc), e.g. after a scan's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Answers:
    """The child's stdout, shared by every store's thread: one whole line at a time."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, request_id: int, body: bytes) -> None:
        with self._lock:
            self._out.write(b"%d " % request_id + body + b"\n")
            self._out.flush()


class StoreThread:
    """One watched store inside the shared child: its own connection, inbox and thread, so a long
    poll or a slow scan of one store never holds up another's. A failure (the file deleted,
    corrupt, unreadable) is that request's answer, and the next request opens the store afresh."""

    def __init__(self, store_path: Path, session_id: str, notifier: Notifier | None, answers: Answers) -> None:
        self.store_path = store_path
        self.session_id = session_id
        self.inbox = Inbox()
        self._notifier = notifier
        self._answers = answers
        self._session: CaptureSession | None = None
        self._closed_answer: int | None = None  # the close request to answer once the store is let go
        self.thread = threading.Thread(target=self._run, name=f"capture-{session_id}"[:60], daemon=True)
        self.thread.start()

    def _run(self) -> None:
        nudged = False
        try:
            while (request := self.inbox.next()) is not False:
                if request is NUDGE:
                    nudged = True  # (it may come before the poll it was meant to cut short: that one must not wait)
                    continue
                assert isinstance(request, dict)
                self._answer(request, nudged)
                nudged = False
                if request["op"] == "scan":
                    del request  # (the known hashes: megabytes for a large store)
                    release_memory()
        except (BrokenPipeError, ValueError):  # the daemon is gone (stdout closed): end of input follows
            pass
        finally:
            self._close_session()
            if self._closed_answer is not None:
                try:
                    self._answers.send(self._closed_answer, b'{"closed":true}')
                except (BrokenPipeError, ValueError):
                    pass

    def _answer(self, request: dict, nudged: bool) -> None:
        try:
            if self._session is None:
                watch = StoreWatch(self.store_path, self.inbox, self._notifier)
                self._session = CaptureSession(self.store_path, watch)
            if request["op"] == "poll":
                batch = self._session.poll(int(request["after"]), 0.0 if nudged else float(request["wait"]))
            elif request["op"] == "scan":
                batch = self._session.scan(int(request["after"]), request["known"])
            else:
                raise ValueError(f"unknown request {request['op']!r}")
            body = canonical_json(batch.to_json())
        except BrokenPipeError:
            raise
        except Exception as exc:  # this store's trouble alone: the other stores go on
            self._close_session()
            body = canonical_json({"error": f"{exc.__class__.__name__}: {exc}"})
        self._answers.send(int(request["id"]), body)

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except sqlite3.Error:
                pass

    def close(self, request_id: int | None = None) -> None:
        """Let the store go; ``request_id`` is answered once its connection is closed."""
        self._closed_answer = request_id
        self.inbox.close()


def serve(requests: BinaryIO, answers: Answers) -> None:
    """Read the daemon's requests until end of input and hand each to its store's thread.

    A line is a JSON object naming its ``channel`` (one mirror's view of one store):
    ``open`` (with ``store`` and ``session``) starts watching, ``close`` lets the store go (its
    connection and watch closed), ``nudge`` ends a waiting poll; ``poll``, ``scan`` and ``close``
    (with an ``id``) are answered on stdout as ``<id> <JSON>``."""
    notifier = Notifier.open()
    stores: dict[int, StoreThread] = {}
    try:
        for line in requests:
            if not line.strip():
                continue
            request = json.loads(line)
            channel, op = int(request["channel"]), request["op"]
            if op == "open":
                stores[channel] = StoreThread(Path(request["store"]), str(request["session"]), notifier, answers)
            elif op == "close":
                store = stores.pop(channel, None)
                if store is not None:
                    store.close(request.get("id"))
                elif "id" in request:
                    answers.send(int(request["id"]), b'{"closed":true}')
            elif channel in stores:
                stores[channel].inbox.put(NUDGE if op == "nudge" else request)
            elif "id" in request:
                answers.send(int(request["id"]), canonical_json({"error": f"channel {channel} is not open"}))
    finally:
        for store in stores.values():
            store.close()
        for store in stores.values():  # each closes its connection (a read or a trim under way ends first)
            store.thread.join(timeout=5)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m bot.session.capture_process  (requests on stdin)", file=sys.stderr)
        return 2
    share_malloc_arenas()
    try:
        serve(sys.stdin.buffer, Answers(sys.stdout.buffer))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
