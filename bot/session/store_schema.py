"""whatsmeow's own schema (``bot/session/whatsmeow_schema.sql``), which every restored store is built
from: no SQL inside a session document is ever run. A document's tables and columns must be
whatsmeow's, and each value must suit its column, or the restore is refused naming the table,
the row and the column."""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.process.errors import SessionDocumentError

SCHEMA_FILE = Path(__file__).with_name("whatsmeow_schema.sql")
INT64 = range(-(2**63), 2**63)
# What each declared column type may hold: what whatsmeow's Go code can read back from it. An
# integer column must hold an integer (Go cannot scan text into an int64); text and bytes columns
# take text, bytes or integers, which Go's database/sql converts when it scans them (refusing
# them could only refuse a real store). No whatsmeow column holds a float (NaN would become NULL).
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "INTEGER": (int,),
    "BIGINT": (int,),
    "BOOLEAN": (int,),
    "TEXT": (str, bytes, int),
    "UUID": (str, bytes),
    "BYTEA": (bytes, str, int),
}


@dataclass(frozen=True)
class Column:
    name: str
    declared: str  # upper case, e.g. BIGINT
    not_null: bool


@dataclass(frozen=True)
class Schema:
    version: int
    compat: int
    statements: tuple[str, ...]
    tables: dict[str, tuple[Column, ...]]


@functools.cache
def whatsmeow_schema() -> Schema:
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    statements = tuple(s.strip() for s in body.split(";\n") if s.strip())
    conn = sqlite3.connect(":memory:")
    try:
        for statement in statements:
            conn.execute(statement.rstrip(";"))
        version, compat = conn.execute("SELECT version, compat FROM whatsmeow_version").fetchone()
        names = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        tables = {
            name: tuple(
                Column(info[1], info[2].upper(), bool(info[3])) for info in conn.execute(f'PRAGMA table_info("{name}")')
            )
            for name in names
        }
    finally:
        conn.close()
    return Schema(version, compat, tuple(s.rstrip(";") for s in statements), tables)


def columns_for(table: str, columns: list[str], schema: Schema) -> tuple[Column, ...]:
    """The schema's columns in the document's order; refused unless each is whatsmeow's, once."""
    known = schema.tables.get(table)
    if known is None:
        raise SessionDocumentError(f"table {table}: not a table of whatsmeow's schema version {schema.version}")
    by_name = {column.name: column for column in known}
    if len(set(columns)) != len(columns):
        raise SessionDocumentError(f"table {table}: a column is listed twice")
    unknown = [name for name in columns if name not in by_name]
    if unknown:
        raise SessionDocumentError(f"table {table}: column {unknown[0][:64]!r} is not whatsmeow's")
    return tuple(by_name[name] for name in columns)


def check_row(table: str, number: int, columns: tuple[Column, ...], row: list[Any]) -> None:
    for column, value in zip(columns, row, strict=True):
        problem = _problem(column, value)
        if problem is not None:
            raise SessionDocumentError(f"table {table}: row {number}: column {column.name}: {problem}")


def _problem(column: Column, value: Any) -> str | None:
    if value is None:
        return "NULL in a NOT NULL column" if column.not_null else None
    accepted = _ACCEPTS.get(column.declared)
    if accepted is None:
        return f"unexpected column type {column.declared}"
    if isinstance(value, bool) or not isinstance(value, accepted):
        return f"a {type(value).__name__} where whatsmeow keeps {column.declared}"
    if isinstance(value, int) and value not in INT64:
        return "an integer outside 64 bits"
    if column.declared == "BOOLEAN" and value not in (0, 1):
        return "a boolean other than 0 or 1"
    return None


def check_version(rows: list[list[Any]], schema: Schema) -> None:
    """The document's whatsmeow_version row names the schema its rows follow."""
    if [list(row) for row in rows] != [[schema.version, schema.compat]]:
        found = rows[0][0] if rows and rows[0] else None
        raise SessionDocumentError(
            f"the session document follows whatsmeow schema version {str(found)[:20]}; "
            f"this zapkeep restores version {schema.version}"
        )
