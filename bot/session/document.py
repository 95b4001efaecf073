"""The session document: a whatsmeow SQLite store <-> a versioned, checksummed JSON document.

Everything here that opens a store file with Python's ``sqlite3`` must run in a process
where neonize is NOT loaded (neonize's Go library carries its own SQLite and the two
corrupt each other within one process; see docs/neonize.md). The daemon therefore calls these
through ``bot.session.store_worker``, which runs them in a child process.

Document format (``format_version`` 2; version 1 is still read), documented in the README:

    {"format": "zapkeep.session", "format_version": 2, "checksum": "sha256:<hex>",
     "lineage": "...", "sequence": N, "metadata": {...plain facts for humans...},
     "tables": [{"name", "sql", "indexes", "columns", "rows", "row_count", "checksum"}, ...]}

Version 2 checksums a table by the sum of its rows' hashes (order-independent), so a document
can be assembled from rows mirrored one by one without sorting or re-reading them; version 1
hashed the rows sorted by content. The document *head* is the same object without the rows.

Cell values: JSON null, integers and strings as themselves; ``{"b64": ...}`` for blobs;
``{"real": "<repr>"}`` for floats (JSONB would turn 1e100 into an integer);
``{"t64": ...}`` for text holding a NUL character (JSONB refuses ``\\u0000``).
"""

from __future__ import annotations

import binascii
import errno
import hashlib
import json
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.session import store_schema
from bot.session.cells import canonical_json, decode_cell, row_hash
from bot.session.change_capture import BUSY_TIMEOUT_SECONDS, ensure_capture, scan_rows, set_sequence, table_defs
from bot.process.errors import DiskFullError, RestoreError, SessionDocumentError

FORMAT = "zapkeep.session"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
_DIGEST_MODULUS = 2**256
# The credential tables without which a document cannot log in again.
REQUIRED_TABLES = (
    "whatsmeow_version",
    "whatsmeow_device",
    "whatsmeow_identity_keys",
    "whatsmeow_pre_keys",
    "whatsmeow_sessions",
)
STORE_SIBLING_SUFFIXES = ("-wal", "-shm", "-journal")
_BUILT_PREFIX = "."  # a store built aside: ".whatsmeow.sqlite3.restore-<pid>-<random>"

_TABLE_NAME = re.compile(r"whatsmeow_[a-z0-9_]{1,64}")
_CREATE_TABLE = re.compile(r"CREATE TABLE (?P<name>whatsmeow_[a-z0-9_]{1,64}) \(", re.IGNORECASE)
_CREATE_INDEX = re.compile(
    r"CREATE (UNIQUE )?INDEX [a-z0-9_]{1,100}\s+ON (?P<table>whatsmeow_[a-z0-9_]{1,64}) ?\(", re.IGNORECASE
)
_FORBIDDEN_IN_DDL = re.compile(r";|\b(ATTACH|PRAGMA|TRIGGER|VIEW|SELECT|load_extension)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Table:
    name: str
    sql: str
    indexes: list[str]
    columns: list[str]
    rows: list[list[Any]]  # decoded: bytes, int, float, str, None


@dataclass(frozen=True)
class DecodedSession:
    checksum: str
    tables: list[Table]

    @property
    def row_count(self) -> int:
        return sum(len(table.rows) for table in self.tables)

    def device_field(self, column: str) -> Any:
        """A column of the device row, read from the checksummed tables (not the free-form metadata)."""
        for table in self.tables:
            if table.name == "whatsmeow_device" and table.rows and column in table.columns:
                return table.rows[0][table.columns.index(column)]
        return None


# --- canonical encoding -------------------------------------------------------------------


def _sha256(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def table_checksum(name: str, sql: str, indexes: list[str], columns: list[str], encoded_rows: list[Any]) -> str:
    """Format 1: the hash of the table with its rows sorted by content."""
    return _sha256({"name": name, "sql": sql, "indexes": indexes, "columns": columns, "rows": encoded_rows})


def rows_digest(hashes: Any) -> str:
    """The sum of the rows' hashes modulo 2**256: the same whatever the order, and a row can be
    taken out again by subtracting it."""
    total = sum(int(h, 16) for h in hashes) % _DIGEST_MODULUS
    return f"{total:064x}"


def table_checksum_v2(name: str, sql: str, indexes: list[str], columns: list[str], digest: str) -> str:
    """Format 2: the hash of the table's definition and of its rows' digest."""
    return _sha256({"name": name, "sql": sql, "indexes": indexes, "columns": columns, "rows_digest": digest})


def document_checksum(table_checksums: list[tuple[str, str]], format_version: int = FORMAT_VERSION) -> str:
    return _sha256({"format_version": format_version, "tables": table_checksums})


# --- validation -------------------------------------------------------------------------------


def parse_document(text: str | bytes) -> dict[str, Any]:
    if not text or not text.strip():
        raise SessionDocumentError("the session document is empty")
    document = load_json(text, "the session document")
    if not isinstance(document, dict):
        raise SessionDocumentError("the session document must be a JSON object")
    return document


def load_json(text: str | bytes, what: str) -> Any:
    """JSON from outside, or SessionDocumentError: also for a text nested deeper than Python's
    parser follows (it raises RecursionError, which would otherwise surface as an internal error)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise SessionDocumentError(f"{what} is nested too deeply (a session document is a few levels deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SessionDocumentError(f"{what} is not valid JSON ({exc.__class__.__name__})") from None


def validate_document(document: Any) -> DecodedSession:
    """Check everything and decode every cell; raise SessionDocumentError naming the first problem."""
    if not isinstance(document, dict):
        raise SessionDocumentError("the session document must be a JSON object")
    if document.get("format") != FORMAT:
        raise SessionDocumentError(f"not a zapkeep session document (format must be {FORMAT!r})")
    version = document.get("format_version")
    if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        raise SessionDocumentError(
            f"session document format version {version!r} is not supported (this zapkeep reads 1 and 2)"
        )
    raw_tables = document.get("tables")
    if not isinstance(raw_tables, list) or not raw_tables:
        raise SessionDocumentError("the session document has no tables")
    tables = [_validate_table(raw, index, version) for index, raw in enumerate(raw_tables)]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise SessionDocumentError("the session document lists a table twice")
    missing = [name for name in REQUIRED_TABLES if name not in names]
    if missing:
        raise SessionDocumentError(f"the session document lacks required tables: {', '.join(missing)}")
    expected = document_checksum([(t["name"], t["checksum"]) for t in raw_tables], version)
    if document.get("checksum") != expected:
        raise SessionDocumentError("the session document's checksum does not match its content")
    session = DecodedSession(checksum=expected, tables=tables)
    jid = session.device_field("jid")
    if jid is not None and not isinstance(jid, str):
        raise SessionDocumentError("table whatsmeow_device: the device jid is not text")
    return session


def _validate_table(raw: Any, index: int, format_version: int) -> Table:
    if not isinstance(raw, dict):
        raise SessionDocumentError(f"table #{index} is not an object")
    name = raw.get("name")
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
        raise SessionDocumentError(f"table #{index} has an invalid name")
    sql, indexes, columns, rows = raw.get("sql"), raw.get("indexes"), raw.get("columns"), raw.get("rows")
    match = _CREATE_TABLE.match(sql) if isinstance(sql, str) else None
    if match is None or match["name"] != name or _FORBIDDEN_IN_DDL.search(sql):
        raise SessionDocumentError(f"table {name}: its CREATE statement is missing or not a plain CREATE TABLE")
    if not isinstance(indexes, list) or not all(_is_index_of(s, name) for s in indexes):
        raise SessionDocumentError(f"table {name}: an index definition is invalid")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise SessionDocumentError(f"table {name}: invalid column list")
    if not isinstance(rows, list) or raw.get("row_count") != len(rows):
        raise SessionDocumentError(f"table {name}: rows are missing or their count does not match")
    decoded = []
    for number, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise SessionDocumentError(f"table {name}: row {number} does not have {len(columns)} values")
        try:
            decoded.append([decode_cell(value) for value in row])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise SessionDocumentError(f"table {name}: row {number} holds undecodable data") from None
    if format_version == 1:
        expected = table_checksum(name, sql, indexes, columns, rows)
    else:
        expected = table_checksum_v2(name, sql, indexes, columns, rows_digest(row_hash(row) for row in rows))
    if raw.get("checksum") != expected:
        raise SessionDocumentError(f"table {name}: checksum mismatch (the document was altered or truncated)")
    return Table(name=name, sql=sql, indexes=indexes, columns=columns, rows=decoded)


def _is_index_of(sql: Any, table: str) -> bool:
    if not isinstance(sql, str):
        return False
    match = _CREATE_INDEX.match(sql)
    return match is not None and match["table"] == table and not _FORBIDDEN_IN_DDL.search(sql)


# --- restore --------------------------------------------------------------------------------------


def restore_snapshot(
    document: dict[str, Any], store_path: Path, *, lineage: str | None = None, sequence: int = 0
) -> DecodedSession:
    """Rebuild the store from a document: built aside, checked, then renamed into place.

    The new store carries ``lineage`` and numbers its changes after ``sequence``, with change
    capture installed before whatsmeow ever opens it. The caller guarantees nothing has the store
    open. On any failure the existing store is left exactly as it was.
    """
    session, temporary = build_aside(document, store_path, lineage=lineage, sequence=sequence)
    try:
        install_store(temporary, store_path)
    finally:
        discard_built(temporary)
    return session


def build_aside(
    document: dict[str, Any], store_path: Path, *, lineage: str | None = None, sequence: int = 0
) -> tuple[DecodedSession, Path]:
    """The first half of a restore, which needs the disk space: the new store, built and checked
    beside ``store_path`` (which is not touched). ``install_store`` puts it in place."""
    session = validate_document(document)
    _make_private_dirs(store_path.parent)
    temporary = store_path.with_name(f"{_BUILT_PREFIX}{store_path.name}.restore-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _build_store(session, temporary, lineage=lineage, sequence=sequence)
    except (OSError, sqlite3.Error) as exc:
        discard_built(temporary)
        if _disk_full(exc):
            raise DiskFullError(
                f"no space left on the disk of {store_path.parent} for the new local store: {exc}"
            ) from exc
        raise RestoreError(f"cannot write the local store {store_path}: {exc}") from exc
    except BaseException:
        discard_built(temporary)
        raise
    return session, temporary


def install_store(built: Path, store_path: Path) -> None:
    """The second half: a rename, which needs no space. Nothing may have the store open."""
    try:
        for suffix in STORE_SIBLING_SUFFIXES:
            # Left behind, SQLite would replay the old journal into the new file.
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
        os.replace(built, store_path)
        _fsync_directory(store_path.parent)
    except OSError as exc:
        raise RestoreError(f"cannot write the local store {store_path}: {exc}") from exc


def discard_built(built: Path) -> None:
    for leftover in (built, *(Path(f"{built}{s}") for s in STORE_SIBLING_SUFFIXES)):
        leftover.unlink(missing_ok=True)


def discard_stale_builds(store_path: Path) -> None:
    """Stores built aside by a process that died before installing them (on a full disk they
    would hold the very space a restore needs)."""
    if store_path.parent.is_dir():
        for leftover in store_path.parent.glob(f"{_BUILT_PREFIX}{store_path.name}.restore-*"):
            leftover.unlink(missing_ok=True)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def prepare_store_file(store_path: Path) -> None:
    """Before neonize opens the store: private file and directory, WAL mode (created empty if
    absent), change capture verified (when whatsmeow's tables exist)."""

    _make_private_dirs(store_path.parent)
    discard_stale_builds(store_path)
    if not store_path.exists():
        os.close(os.open(store_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    store_path.chmod(0o600)
    try:
        conn = sqlite3.connect(store_path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            ensure_capture(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise RestoreError(f"cannot prepare the local store {store_path}: {exc}") from exc


def _load_tables(conn: sqlite3.Connection, session: DecodedSession) -> None:
    """whatsmeow's schema, then the document's rows into it: every name in the SQL comes from the
    schema, every value is bound and checked against its column. A refusal names the table, the
    row and the column."""
    schema = store_schema.whatsmeow_schema()
    conn.execute("BEGIN")
    for statement in schema.statements:  # (the document's own CREATE statements are never run)
        conn.execute(statement)
    for table in session.tables:
        columns = store_schema.columns_for(table.name, table.columns, schema)
        if table.name == "whatsmeow_version":  # the schema wrote it: the document must agree
            by_name = [dict(zip(table.columns, row, strict=True)) for row in table.rows]
            store_schema.check_version([[r.get("version"), r.get("compat")] for r in by_name], schema)
            continue
        names = ", ".join(f'"{column.name}"' for column in columns)
        insert = f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join("?" * len(columns))})'
        for number, row in enumerate(table.rows):
            store_schema.check_row(table.name, number, columns, row)
            try:
                conn.execute(insert, row)
            except sqlite3.IntegrityError as exc:
                raise SessionDocumentError(f"table {table.name}: row {number}: {exc}") from None
    broken = conn.execute("PRAGMA foreign_key_check").fetchone()
    if broken is not None:
        raise SessionDocumentError(f"table {broken[0]}: row with rowid {broken[1]} refers to a missing {broken[2]} row")
    conn.execute("COMMIT")


def _build_store(session: DecodedSession, path: Path, *, lineage: str | None, sequence: int) -> None:

    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        _load_tables(conn, session)
        ensure_capture(conn, lineage)
        if sequence:
            set_sequence(conn, sequence)
        problems = conn.execute("PRAGMA integrity_check").fetchall()
        if problems != [("ok",)]:
            raise RestoreError(f"the rebuilt store failed SQLite's integrity check: {problems[0][0]}")
        # WAL persists in the file: later snapshots then never block whatsmeow's writes.
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def document_rows(document: dict[str, Any]) -> tuple[list[Any], list[tuple[str, str, list[Any], str]]]:
    """A validated document as the database stores it: table definitions, and every row with its
    key and hash (rows, tables). The keys come from SQLite itself: the tables are built in memory."""

    session = validate_document(document)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        try:
            _load_tables(conn, session)
        except sqlite3.Error as exc:
            raise SessionDocumentError(f"the session document does not load into SQLite: {exc}") from None
        defs = table_defs(conn)
        rows = [(t.name, key, row, digest) for t in defs for key, (row, digest) in scan_rows(conn, t).items()]
    finally:
        conn.close()
    return defs, rows


def _make_private_dirs(directory: Path) -> None:
    """The session's directory, and the ``sessions/`` directory above it: owner only."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    if directory.parent.name == "sessions":
        directory.parent.chmod(0o700)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
