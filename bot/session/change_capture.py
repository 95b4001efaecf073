"""Row-level change capture inside the local whatsmeow store, and the mirror process that reads it.

Runs only in a child process (it opens the store with Python's ``sqlite3``; neonize's own SQLite
must never share a process with it, see docs/neonize.md).

zapkeep adds three objects of its own to the store, never touching whatsmeow's rows:
- ``zapkeep_changes``: an append-only log (sequence, table, rowid, row key) that triggers fill;
- ``zapkeep_state``: the store's lineage, a random id naming the history this file descends from;
- AFTER INSERT/UPDATE/DELETE triggers on every ``whatsmeow_*`` table.

A row's key is SQLite's ``quote()`` of its primary-key columns joined by commas: lossless for text,
integers and blobs, and the same on every host. A table without a primary key may repeat a row, so
there the key is the rowid and all the columns (a restore renumbers those; the next comparison
settles that).

``python -m bot.session.change_capture STORE`` is the long-lived mirror process. It answers one JSON
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
import re
import secrets
import select
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bot.session.cells import canonical_json, encode_cell, row_hash

BUSY_TIMEOUT_SECONDS = 4.0  # below go-sqlite3's 5 s, so whatsmeow's own writes never time out on us
CHANGES_TABLE = "zapkeep_changes"
STATE_TABLE = "zapkeep_state"
TRIGGER_PREFIX = "zapkeep_capture_"
POLL_INTERVAL_SECONDS = 0.005  # without inotify: how often a waiting poll looks at the store file (os.stat)
ROWID_CHUNK = 500
PUBLISH_WAIT_SECONDS = 1.0  # how long a commit seen being written may take to become visible

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TABLE_NAME = re.compile(r"whatsmeow_[a-z0-9_]{1,64}")

CREATE_CHANGES = f"""CREATE TABLE IF NOT EXISTS {CHANGES_TABLE} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    row_id INTEGER NOT NULL,
    row_key TEXT NOT NULL
)"""
CREATE_STATE = f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (lineage TEXT NOT NULL)"


@dataclass(frozen=True)
class TableDef:
    name: str
    sql: str
    indexes: list[str]
    columns: list[str]
    key_columns: list[str]  # the primary key; empty: none
    has_rowid: bool = True


@dataclass(frozen=True)
class Change:
    table: str
    key: str
    row: list[Any] | None  # encoded cells; None: the row was deleted
    hash: str | None


@dataclass(frozen=True)
class Device:
    jid: str | None
    push_name: str | None
    platform: str | None
    business_name: str | None


@dataclass(frozen=True)
class Batch:
    """What changed in the store up to ``sequence``, read in one transaction."""

    sequence: int
    changes: list[Change]
    lineage: str
    device: Device | None  # the device row, when the batch touched it (or on a scan)
    tables: list[TableDef] | None  # the table definitions, when they changed (or on a scan)
    triggers_installed: list[str]  # tables whose capture triggers were missing and have been added
    missed: int = 0  # on a scan: rows that differed although the log had no change for them

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Batch:
        return Batch(
            sequence=data["sequence"],
            changes=[Change(**c) for c in data["changes"]],
            lineage=data["lineage"],
            device=None if data["device"] is None else Device(**data["device"]),
            tables=None if data["tables"] is None else [TableDef(**t) for t in data["tables"]],
            triggers_installed=data["triggers_installed"],
            missed=data.get("missed", 0),
        )


# --- the store's own objects ---------------------------------------------------------------


def table_defs(conn: sqlite3.Connection) -> list[TableDef]:
    """whatsmeow's tables in creation order, with what a document and a row key need."""
    objects = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE tbl_name LIKE 'whatsmeow\\_%' ESCAPE '\\' AND sql IS NOT NULL ORDER BY rowid"
    ).fetchall()
    tables = []
    for kind, name, _, sql in objects:
        if kind != "table" or not _TABLE_NAME.fullmatch(name):
            continue
        info = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
        columns = [row[1] for row in info]
        if not all(_IDENTIFIER.fullmatch(c) for c in columns):
            continue  # not a table whatsmeow made; never build SQL from odd names
        primary = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
        indexes = [index_sql for k, _, tbl, index_sql in objects if k == "index" and tbl == name]
        has_rowid = "WITHOUT ROWID" not in sql.upper() and "rowid" not in {c.lower() for c in columns}
        tables.append(TableDef(name, sql, indexes, columns, primary, has_rowid))
    return tables


def key_expression(table: TableDef, prefix: str = "") -> str:
    """A row's key: its primary key; without one, its rowid and content (rows may repeat there,
    and each must be kept; a restore renumbers them, which the next comparison settles)."""
    if table.key_columns:
        return " || ',' || ".join(f'quote({prefix}"{column}")' for column in table.key_columns)
    content = " || ',' || ".join(f'quote({prefix}"{column}")' for column in table.columns)
    return f"{prefix}rowid || ':' || {content}"


def _triggers(table: TableDef) -> dict[str, str]:
    """The capture triggers of one table, by name, as sqlite_master stores their SQL."""
    name, new, old = table.name, key_expression(table, "NEW."), key_expression(table, "OLD.")
    log = f"INSERT INTO {CHANGES_TABLE} (tbl, row_id, row_key)"
    return {
        f"{TRIGGER_PREFIX}{name}_insert": (
            f'CREATE TRIGGER {TRIGGER_PREFIX}{name}_insert AFTER INSERT ON "{name}" BEGIN '
            f"{log} VALUES ('{name}', NEW.rowid, {new}); END"
        ),
        f"{TRIGGER_PREFIX}{name}_update": (
            f'CREATE TRIGGER {TRIGGER_PREFIX}{name}_update AFTER UPDATE ON "{name}" BEGIN '
            f"{log} VALUES ('{name}', NEW.rowid, {new}); "
            f"{log} SELECT '{name}', OLD.rowid, {old} WHERE ({old}) IS NOT ({new}); END"
        ),
        f"{TRIGGER_PREFIX}{name}_delete": (
            f'CREATE TRIGGER {TRIGGER_PREFIX}{name}_delete AFTER DELETE ON "{name}" BEGIN '
            f"{log} VALUES ('{name}', OLD.rowid, {old}); END"
        ),
    }


def ensure_capture(conn: sqlite3.Connection, lineage: str | None = None) -> list[str]:
    """Install (or repair) the change log, the lineage and every table's triggers, in one short
    write transaction. Returns the tables whose triggers were missing or different."""
    tables = table_defs(conn)
    existing = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
    # A table without rowids cannot be logged by rowid: the reconciliation alone mirrors it.
    wanted = {name: sql for table in tables if table.has_rowid for name, sql in _triggers(table).items()}
    stale = [name for name in existing if name.startswith(TRIGGER_PREFIX) and existing[name] != wanted.get(name)]
    missing = [name for name, sql in wanted.items() if existing.get(name) != sql]
    has_state = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name IN (?, ?)", (CHANGES_TABLE, STATE_TABLE)
    ).fetchone()[0]
    current_lineage = _lineage(conn) if has_state == 2 else None
    if not missing and not stale and has_state == 2 and current_lineage and lineage in (None, current_lineage):
        return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(CREATE_CHANGES)
        conn.execute(CREATE_STATE)
        if lineage is not None or _lineage(conn) is None:
            conn.execute(f"DELETE FROM {STATE_TABLE}")
            conn.execute(f"INSERT INTO {STATE_TABLE} (lineage) VALUES (?)", (lineage or new_lineage(),))
        for name in stale:
            conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')
        for name in missing:
            conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')
            conn.execute(wanted[name])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return sorted({name[len(TRIGGER_PREFIX) :].rsplit("_", 1)[0] for name in missing})


def new_lineage() -> str:
    return secrets.token_hex(8)


def _lineage(conn: sqlite3.Connection) -> str | None:
    row = conn.execute(f"SELECT lineage FROM {STATE_TABLE} LIMIT 1").fetchone()
    return None if row is None else row[0]


def sequence(conn: sqlite3.Connection) -> int:
    """The last change number handed out (AUTOINCREMENT never reuses one, even after trims)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (CHANGES_TABLE,)).fetchone()
    return 0 if row is None else int(row[0])


def set_sequence(conn: sqlite3.Connection, value: int) -> None:
    """Continue numbering after ``value`` (a restored store carries on from the stored sequence)."""
    conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (CHANGES_TABLE,))
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (CHANGES_TABLE, value))


def device(conn: sqlite3.Connection) -> Device | None:
    try:
        row = conn.execute("SELECT jid, push_name, platform, business_name FROM whatsmeow_device LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        return None
    return None if row is None else Device(*row)


def encode_row(values: tuple[Any, ...]) -> tuple[list[Any], str]:
    row = [encode_cell(v) for v in values]
    return row, row_hash(row)


# --- reading ---------------------------------------------------------------------------------


def read_changes(conn: sqlite3.Connection, tables: dict[str, TableDef], after: int) -> tuple[int, list[Change]]:
    """Every row touched after ``after``, as it is now. Run inside a read transaction."""
    logged: dict[str, dict[str, set[int]]] = {}
    for table, row_id, key in conn.execute(
        f"SELECT tbl, row_id, row_key FROM {CHANGES_TABLE} WHERE seq > ? ORDER BY seq", (after,)
    ):
        logged.setdefault(table, {}).setdefault(key, set()).add(row_id)
    changes = []
    for name, keys in logged.items():
        table = tables.get(name)
        if table is None:
            # The table is gone (a whatsmeow upgrade dropped it): its rows are gone too.
            changes += [Change(name, key, None, None) for key in keys]
            continue
        row_ids = sorted({row_id for ids in keys.values() for row_id in ids})
        current = _rows_by_rowid(conn, table, row_ids)
        for key in keys:
            found = current.get(key)
            changes.append(Change(name, key, None, None) if found is None else Change(name, key, *found))
    return max(after, sequence(conn)), changes


def _rows_by_rowid(conn: sqlite3.Connection, table: TableDef, row_ids: list[int]) -> dict[str, tuple[list, str]]:
    found: dict[str, tuple[list, str]] = {}
    for start in range(0, len(row_ids), ROWID_CHUNK):
        chunk = row_ids[start : start + ROWID_CHUNK]
        query = f'SELECT {key_expression(table)}, * FROM "{table.name}" WHERE rowid IN ({", ".join("?" * len(chunk))})'
        for key, *values in conn.execute(query, chunk):
            found[key] = encode_row(tuple(values))
    return found


def scan_rows(conn: sqlite3.Connection, table: TableDef) -> dict[str, tuple[list, str]]:
    """Every row of a table: key -> (encoded row, hash)."""
    return {
        key: encode_row(tuple(values))
        for key, *values in conn.execute(f'SELECT {key_expression(table)}, * FROM "{table.name}"')
    }


def diff_against(
    conn: sqlite3.Connection, tables: list[TableDef], known: dict[str, dict[str, str]]
) -> tuple[list[Change], set[tuple[str, str]]]:
    """The changes that turn ``known`` (table -> key -> hash, what the database holds) into the store."""
    changes = []
    names = {table.name for table in tables}
    for table in tables:
        have = known.get(table.name, {})
        rows = scan_rows(conn, table)
        changes += [Change(table.name, k, r, h) for k, (r, h) in rows.items() if have.get(k) != h]
        changes += [Change(table.name, k, None, None) for k in have if k not in rows]
    for name, keys in known.items():
        if name not in names:
            changes += [Change(name, k, None, None) for k in keys]
    return changes, {(c.table, c.key) for c in changes}


# --- the mirror process ----------------------------------------------------------------------


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
        print("usage: python -m bot.session.change_capture STORE_PATH", file=sys.stderr)
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
