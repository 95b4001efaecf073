"""Row-level change capture inside the local whatsmeow store: the objects zapkeep adds to it, and reading them.

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

The long-lived mirror process that reads them is ``bot.session.capture_process``.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from bot.session.cells import encode_cell, row_hash

BUSY_TIMEOUT_SECONDS = 4.0  # below go-sqlite3's 5 s, so whatsmeow's own writes never time out on us
CHANGES_TABLE = "zapkeep_changes"
STATE_TABLE = "zapkeep_state"
TRIGGER_PREFIX = "zapkeep_capture_"
ROWID_CHUNK = 500

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
