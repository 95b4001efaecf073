"""Synthetic but schema-valid whatsmeow stores: random keys of the lengths whatsmeow CHECKs."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.process.errors import SnapshotError
from bot.session.change_capture import BUSY_TIMEOUT_SECONDS, scan_rows, table_defs
from bot.session.document import FORMAT, FORMAT_VERSION, document_checksum, rows_digest, table_checksum_v2

HELPER = Path(__file__).with_name("neonize_helper.py")
DEVICE_USER = "5511987654321"
DEVICE_JID = f"{DEVICE_USER}:7@s.whatsapp.net"  # whatsmeow's canonical form, device suffix included
PUSH_NAME = "Padaria Zapkeep"


@dataclass(frozen=True)
class StoreSize:
    pre_keys: int = 500
    sessions: int = 300
    contacts: int = 800
    sender_keys: int = 60
    app_state_keys: int = 30
    mutation_macs: int = 300


REALISTIC = StoreSize()
SMALL = StoreSize(pre_keys=20, sessions=10, contacts=10, sender_keys=3, app_state_keys=2, mutation_macs=5)
MEDIUM = StoreSize(pre_keys=800, sessions=2000, contacts=5000, sender_keys=400, app_state_keys=60, mutation_macs=3000)
LARGE = StoreSize(  # 3x MEDIUM
    pre_keys=2400, sessions=6000, contacts=15000, sender_keys=1200, app_state_keys=180, mutation_macs=9000
)


def neonize(command: str, store: Path, *args: str, timeout: float = 120) -> object:
    """Run the real neonize library in a child process and return its JSON answer."""
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, str(HELPER), command, str(store), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"neonize helper {command} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def create_paired_store(path: Path, size: StoreSize = SMALL, *, seed: int = 1) -> None:
    """neonize creates the schema; a synthetic device and its key material are added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    neonize("create", path)
    fill_store(path, size, seed=seed)


def fill_store(path: Path, size: StoreSize, *, seed: int = 1) -> None:
    rng = random.Random(seed)

    def key(n: int) -> bytes:
        return rng.randbytes(n)

    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key,"
            " signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig, adv_account_sig_key,"
            " adv_device_sig, platform, push_name) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                DEVICE_JID,
                rng.randrange(2**32),
                key(32),
                key(32),
                key(32),
                1,
                key(64),
                key(32),
                key(180),
                key(64),
                key(32),
                key(64),
                "android",
                PUSH_NAME,
            ),
        )
        conn.executemany(
            "INSERT INTO whatsmeow_pre_keys (jid, key_id, key, uploaded) VALUES (?,?,?,?)",
            [(DEVICE_JID, n + 1, key(32), n % 3 != 0) for n in range(size.pre_keys)],
        )
        peers = [f"55119{n:08d}" for n in range(size.sessions)]
        conn.executemany(
            "INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (?,?,?)",
            [(DEVICE_JID, f"{peer}.0", key(rng.randrange(900, 2200))) for peer in peers],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_identity_keys (our_jid, their_id, identity) VALUES (?,?,?)",
            [(DEVICE_JID, f"{peer}.0", key(32)) for peer in peers],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, first_name, full_name, push_name) VALUES (?,?,?,?,?)",
            [
                (DEVICE_JID, f"55218{n:08d}@s.whatsapp.net", f"Cliente {n}", f"Cliente Número {n}", f"Cliente {n} ☕")
                for n in range(size.contacts)
            ],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_sender_keys (our_jid, chat_id, sender_id, sender_key) VALUES (?,?,?,?)",
            [
                (DEVICE_JID, f"1203630{n:011d}@g.us", f"{peers[n % len(peers)]}.0", key(180))
                for n in range(size.sender_keys)
            ],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_sync_keys (jid, key_id, key_data, timestamp, fingerprint) VALUES (?,?,?,?,?)",
            [(DEVICE_JID, key(6), key(32), 1_700_000_000 + n, key(24)) for n in range(size.app_state_keys)],
        )
        names = ["critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low"]
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_version (jid, name, version, hash) VALUES (?,?,?,?)",
            [(DEVICE_JID, name, rng.randrange(1, 900), key(128)) for name in names],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_mutation_macs (jid, name, version, index_mac, value_mac) VALUES (?,?,?,?,?)",
            [(DEVICE_JID, names[n % len(names)], n, key(32), key(32)) for n in range(size.mutation_macs)],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_lid_map (lid, pn) VALUES (?,?)",
            [(f"{10**14 + n}", peer) for n, peer in enumerate(peers)],
        )
    conn.close()


def table_rows(path: Path) -> dict[str, list[tuple]]:
    """Every whatsmeow table's rows, sorted, for comparing two stores."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'whatsmeow%' ORDER BY name"
            )
        ]
        return {name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr) for name in names}
    finally:
        conn.close()


# --- one row for every table, generated from the schema -----------------------------------------

_LENGTH_CHECK = re.compile(r"length\(\s*(\w+)\s*\)\s*=\s*(\d+)")
_UPPER_CHECK = re.compile(r"(\w+)\s*<\s*(\d+)")


@dataclass(frozen=True)
class GeneratedRow:
    table: str
    columns: tuple[str, ...]
    values: tuple[object, ...]
    changed: tuple[object, ...]  # the same row after an update of one column that no other row refers to


def generated_rows(conn: sqlite3.Connection, tag: str = "zk") -> list[GeneratedRow]:
    """A new row for every ``whatsmeow_*`` table of the store, parents first, read from the schema
    itself (declared types, NOT NULL, the CHECKed lengths and bounds, the foreign keys), so a table a
    whatsmeow upgrade adds gets its row without anyone listing it. Each row refers only to the rows
    generated with it (a new device of its own), so it can be inserted, updated and deleted alone."""
    names = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'whatsmeow\\_%' ESCAPE '\\' ORDER BY rowid"
        )
    ]
    sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    parents = {name: conn.execute(f'PRAGMA foreign_key_list("{name}")').fetchall() for name in names}
    referenced = {(fk[2], fk[4]) for fks in parents.values() for fk in fks}  # (table, column) some row points at
    ordered: list[str] = []
    while len(ordered) < len(names):  # parents before children
        ready = [n for n in names if n not in ordered and all(fk[2] in ordered or fk[2] == n for fk in parents[n])]
        assert ready, f"a foreign-key cycle among {set(names) - set(ordered)}"
        ordered += ready
    made: dict[str, dict[str, object]] = {}
    rows = []
    for name in ordered:
        lengths = {column: int(n) for column, n in _LENGTH_CHECK.findall(sql[name])}
        uppers = {column: int(n) for column, n in _UPPER_CHECK.findall(sql[name])}
        info = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
        from_parent = {fk[3]: made[fk[2]][fk[4]] for fk in parents[name]}

        def value(column: str, declared: str, variant: int) -> object:
            declared = declared.upper()
            if column in from_parent:
                return from_parent[column]
            if column in lengths or declared in ("BYTEA", "BLOB"):
                return random.Random(f"{tag}/{name}/{column}/{variant}").randbytes(lengths.get(column, 48))
            if "INT" in declared or declared == "BOOLEAN":
                return (7 + variant) % (2 if declared == "BOOLEAN" else uppers.get(column, 2**31))
            return f"{tag}-{name}-{column}-{variant}"

        columns = tuple(row[1] for row in info)
        values = tuple(value(row[1], row[2], 0) for row in info)
        keys = {row[1] for row in info if row[5]} | set(from_parent)
        free = [row for row in info if row[1] not in keys and (name, row[1]) not in referenced]
        target = (free or info)[-1]
        changed = tuple(value(c, target[2], 1) if c == target[1] else v for c, v in zip(columns, values, strict=True))
        made[name] = dict(zip(columns, values, strict=True))
        rows.append(GeneratedRow(name, columns, values, changed))
    return rows


# --- a store read as a document (moved here from bot/session/document.py: only tests use it) ---


def take_snapshot(store_path: Path) -> dict[str, Any]:
    """The document of a store as it stands: one consistent read (SQLite's backup API), then encoded.
    Only tests compare with it; the daemon builds its documents from the mirrored rows."""
    started = time.perf_counter()
    if not store_path.is_file():
        raise SnapshotError(f"no local store at {store_path}")
    memory = sqlite3.connect(":memory:")
    try:
        try:
            source = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                source.backup(memory)  # one step: a single read transaction, so never torn
            finally:
                source.close()
        except sqlite3.Error as exc:
            raise SnapshotError(f"cannot read the local store {store_path}: {exc}") from exc
        return _encode_store(memory, started)
    finally:
        memory.close()


def _encode_store(conn: sqlite3.Connection, started: float) -> dict[str, Any]:
    tables = []
    for table in table_defs(conn):
        rows = scan_rows(conn, table)
        digest = rows_digest(digest for _, digest in rows.values())
        tables.append(
            {
                "name": table.name,
                "sql": table.sql,
                "indexes": table.indexes,
                "columns": table.columns,
                "rows": [row for row, _ in rows.values()],
                "row_count": len(rows),
                "checksum": table_checksum_v2(table.name, table.sql, table.indexes, table.columns, digest),
            }
        )
    if not tables:
        raise SnapshotError("the local store holds no whatsmeow tables")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checksum": document_checksum([(t["name"], t["checksum"]) for t in tables]),
        "lineage": None,
        "sequence": 0,
        "metadata": _metadata(conn, tables, started),
        "tables": tables,
    }


def _metadata(conn: sqlite3.Connection, tables: list[dict[str, Any]], started: float) -> dict[str, Any]:
    names = {t["name"] for t in tables}
    device = None
    if "whatsmeow_device" in names:
        device = conn.execute("SELECT jid, push_name, platform, business_name FROM whatsmeow_device LIMIT 1").fetchone()
    version = None
    if "whatsmeow_version" in names:
        version = conn.execute("SELECT version, compat FROM whatsmeow_version LIMIT 1").fetchone()
    return {
        "device_jid": device[0] if device else None,
        "push_name": device[1] if device else None,
        "platform": device[2] if device else None,
        "business_name": device[3] if device else None,
        "whatsmeow_schema_version": version[0] if version else None,
        "whatsmeow_schema_compat": version[1] if version else None,
        "row_counts": {t["name"]: t["row_count"] for t in tables},
        "total_rows": sum(t["row_count"] for t in tables),
        "taken_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "snapshot_ms": round((time.perf_counter() - started) * 1000, 1),
    }
