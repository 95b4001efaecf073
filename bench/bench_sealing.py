"""Benchmark: what encryption at rest (SESSION_ENCRYPTION_KEY) costs, side by side with none.

    .venv/bin/python -m bench.bench_sealing [--size medium] [--changes 300] [--restores 5]

Two databases in one PostgreSQL cluster (default durability) hold the same synthetic store, one in
clear and one sealed. Each measurement alternates between them, so machine noise hits both alike:

- a mirrored change: one database transaction writing one changed row, as the mirror writes a
  batch (a Signal session upsert of 0.9-2.2 KB, and a 100-row transaction); wall time and WAL bytes;
- a restore: the stored head and rows read, opened, assembled into the document and built into a
  whatsmeow store file, as the boot does;
- a re-encryption of the whole session (what the first boot with a key, or a rotation, costs once).

Only the database layer differs (``database.Database`` with a ``bot.session.sealing.Sealer``), so the
ratios are the cost of sealing itself. Run on demand; it prints one table.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bot.session import persistence, cells
from bot.session.sealing import Sealer
from bot.session.store_worker import restore_store
from database import MirrorBatch, PostgresDatabase, RowChange
from tests.pg_cluster import PostgresCluster
from tests.synthetic import LARGE, MEDIUM, SMALL, create_paired_store

SESSION = "default"
SIZES = {"small": SMALL, "medium": MEDIUM, "large": LARGE}


def wal_bytes(url: str, action: Callable[[], object]) -> tuple[float, int]:
    """(wall ms, WAL bytes) of one action; nothing else writes to the cluster meanwhile."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        began = time.perf_counter()
        action()
        wall = (time.perf_counter() - began) * 1000
        moved = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (start,)).fetchone()[0]
    return wall, int(moved)


def session_rows(url: str, table: str) -> list[tuple[str, list]]:
    """(row key, encoded row) of a table's stored rows, read from the clear database."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT row_key, row_data FROM whatsapp_session_rows WHERE session_id = %s AND table_name = %s",
            (SESSION, table),
        ).fetchall()
    return [(key, data) for key, data in found]


def changed(encoded: list, rng: random.Random) -> list:
    """The row with each blob replaced by new random bytes of its length (a ratchet step)."""
    out = []
    for cell in encoded:
        if isinstance(cell, dict) and "b64" in cell:
            length = len(cells.decode_cell(cell))
            cell = cells.encode_cell(rng.randbytes(length))
        out.append(cell)
    return out


def batch_of(table: str, rows: list[tuple[str, list]], sequence: int) -> MirrorBatch:
    changes = [RowChange(table, key, cells.canonical_json(row).decode(), cells.row_hash(row)) for key, row in rows]
    return MirrorBatch(SESSION, sequence, changes)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--restores", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(7)
    cluster = PostgresCluster(durable=True).start()
    work = Path(tempfile.mkdtemp(prefix="zapkeep-bench-sealing-"))
    try:
        store = work / "whatsmeow.sqlite3"
        create_paired_store(store, SIZES[args.size])
        urls = {"clear": cluster.create_database(), "sealed": cluster.create_database()}
        dbs = {
            "clear": PostgresDatabase(urls["clear"], max_size=2),
            "sealed": PostgresDatabase(urls["sealed"], max_size=2, sealer=Sealer(os.urandom(32))),
        }
        for db in dbs.values():
            db.open()
            persistence.sync_session(db, SESSION, store)
        total_rows = len(dbs["clear"].load_rows(SESSION))
        sessions = session_rows(urls["clear"], "whatsmeow_sessions")
        contacts = session_rows(urls["clear"], "whatsmeow_contacts")
        results: dict[str, dict[str, list[float]]] = {name: {} for name in dbs}

        def record(name: str, metric: str, value: float) -> None:
            results[name].setdefault(metric, []).append(value)

        sequence = 10**6
        for i in range(args.changes):
            key, row = sessions[i % len(sessions)]
            one = batch_of("whatsmeow_sessions", [(key, changed(row, rng))], sequence + i)
            many = batch_of(
                "whatsmeow_contacts",
                [
                    (k, [*r[:-1], f"Cliente {rng.randrange(10**6)}"])
                    for k, r in rng.sample(contacts, min(100, len(contacts)))
                ],
                sequence + i,
            )
            for name in dbs if i % 2 else reversed(dbs):  # alternate who goes first
                wall, wal = wal_bytes(urls[name], lambda db=dbs[name], b=one: db.write_batch(b))
                record(name, "one_ms", wall)
                record(name, "one_wal", wal)
                if i % 10 == 0:
                    wall, wal = wal_bytes(urls[name], lambda db=dbs[name], b=many: db.write_batch(b))
                    record(name, "many_ms", wall)
                    record(name, "many_wal", wal)

        for i in range(args.restores):
            for name in dbs if i % 2 else reversed(dbs):
                target = work / f"restore-{name}-{i}" / "whatsmeow.sqlite3"
                began = time.perf_counter()
                _, text = persistence.current_document(dbs[name], SESSION)
                read = time.perf_counter()
                restore_store(text, target, lineage="bench", sequence=0)
                record(name, "read_ms", (read - began) * 1000)
                record(name, "restore_ms", (time.perf_counter() - began) * 1000)

        # Once: the first boot with a key over a session stored in clear.
        rekeyed = PostgresDatabase(urls["clear"], max_size=2, sealer=Sealer(os.urandom(32)))
        rekeyed.open()
        began = time.perf_counter()
        count = rekeyed.reseal(SESSION)
        reseal_ms = (time.perf_counter() - began) * 1000
        rekeyed.close()

        seal_us = _seal_micros(sessions[0][1])
        for db in dbs.values():
            db.close()
    finally:
        cluster.stop()

    def cell(metric: str, unit: str, digits: int = 1) -> str:
        clear, sealed = median(results["clear"][metric]), median(results["sealed"][metric])
        return f"| {clear:,.{digits}f} {unit} | {sealed:,.{digits}f} {unit} | {sealed / clear:.2f}x |"

    print(f"\nEncryption at rest, {args.size} store ({total_rows:,} rows), PostgreSQL 15 default durability, loopback")
    print(f"medians of {args.changes} single-row and {len(results['clear']['many_ms'])} 100-row batches, ")
    print(f"{args.restores} restores each, clear and sealed alternating\n")
    print("| measurement | clear | sealed | sealed / clear |")
    print("|---|---|---|---|")
    print("| Signal session upsert: one batch, wall " + cell("one_ms", "ms", 2))
    print("| Signal session upsert: WAL " + cell("one_wal", "B", 0))
    print("| 100 contact upserts: one batch, wall " + cell("many_ms", "ms", 2))
    print("| 100 contact upserts: WAL " + cell("many_wal", "B", 0))
    print("| restore: read + open + assemble " + cell("read_ms", "ms", 0))
    print("| restore: whole (built into a store file) " + cell("restore_ms", "ms", 0))
    print(f"\nsealing and opening one Signal session row, in this process: {seal_us:.1f} us")
    print(
        f"first boot with a key: {count.rows:,} rows and {count.snapshots} snapshots encrypted in {reseal_ms:,.0f} ms"
    )


def _seal_micros(encoded: list) -> float:
    sealer = Sealer(os.urandom(32))
    text = cells.canonical_json(encoded).decode()
    context = ("row", SESSION, "whatsmeow_sessions", "key")
    began = time.perf_counter()
    for _ in range(2000):
        sealer.open(sealer.seal(text, context), sealer.key_id, context)
    return (time.perf_counter() - began) / 2000 * 1e6


if __name__ == "__main__":
    main()
