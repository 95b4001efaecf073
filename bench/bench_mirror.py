"""Benchmark: the row mirror (persistence v2) against whatsmeow's own PostgreSQL store.

    .venv/bin/python -m bench.bench_mirror [--sizes small,medium,large] [--reps 30]

One run prints one table, store sizes side by side. Run on demand, never part of the test suite;
it takes a few minutes and starts its own PostgreSQL cluster on loopback with PostgreSQL's default
durability (fsync, synchronous_commit and full_page_writes on).

zapkeep's path: a change is written into the local store file with sqlite3, as whatsmeow would
write it; a ``bot.session.mirror.Mirror`` running in this process (fenced by a lease) carries it into the
database; the change counts as committed once ``load_session().mirror_sequence`` reaches the store's
change sequence. The reference: the same change written with whatsmeow's own SQL into whatsmeow's
own PostgreSQL schema (created by neonize, in a child process: this process opens stores with
Python's sqlite3 and must never import neonize), holding the same rows.

Each per-change kind runs twice over the same rows: the 1st pass right after a CHECKPOINT (the
first write of a page after a checkpoint logs the whole 8 KB page: what a quiet bot pays), the
2nd pass on the same rows again (their pages are logged already: a busy bot).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bot.session.mirror import Mirror
from bot.session.persistence import BootOutcome, export_document, prepare_local_store
from bot.runtime import Timing
from bot.session.store_worker import prepare_store
from database import MirrorBatch, PostgresDatabase, Transaction
from tests.pg_cluster import PostgresCluster, free_port
from tests.synthetic import DEVICE_JID, LARGE, MEDIUM, SMALL, StoreSize, create_paired_store

ROOT = Path(__file__).resolve().parent.parent
SESSION = "default"
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9"}  # neonize's connect() fails at a closed loopback port
API_TOKEN = "bench-mirror-token-0123456789abcdef"
SIZES = {"small": SMALL, "medium": MEDIUM, "large": LARGE}

# whatsmeow's own SQL (store/sqlstore/store.go), with "?" placeholders for SQLite; PostgreSQL gets "%s".
SESSION_UPSERT = (
    "INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (?, ?, ?) "
    "ON CONFLICT (our_jid, their_id) DO UPDATE SET session=excluded.session"
)
PRE_KEY_INSERT = "INSERT INTO whatsmeow_pre_keys (jid, key_id, key, uploaded) VALUES (?, ?, ?, ?)"
PRE_KEY_DELETE = "DELETE FROM whatsmeow_pre_keys WHERE jid=? AND key_id=?"
CONTACTS_DELETE = "DELETE FROM whatsmeow_contacts WHERE our_jid=? AND their_jid LIKE ?"  # the bench's cleanup


def contact_upsert(rows: int) -> str:
    """putContactName (one row) / putManyContactNames (one statement, many rows, in a transaction)."""
    return (
        "INSERT INTO whatsmeow_contacts (our_jid, their_jid, first_name, full_name) VALUES "
        + ", ".join(["(?, ?, ?, ?)"] * rows)
        + " ON CONFLICT (our_jid, their_jid) DO UPDATE SET first_name=excluded.first_name, full_name=excluded.full_name"
    )


Statement = tuple[str, tuple[Any, ...]]

KINDS = {
    "session": "Signal session upsert (1.5 KB)",
    "pre_key": "pre-key delete",
    "contact": "contact upsert",
    "tx100": "100-contact transaction",
}


# --- measuring ---------------------------------------------------------------------------------------


def value_size(value: Any) -> int:
    """The size of one bound value: bytes as they are, text as UTF-8, numbers and times as text."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Jsonb):
        obj = value.obj
        return len(obj.encode()) if isinstance(obj, str) else len(json.dumps(obj).encode())
    if isinstance(value, datetime):
        return len(value.isoformat())
    return len(str(value))


@dataclass(frozen=True)
class BatchTiming:
    started: float  # perf_counter when write_batch began
    committed: float  # ... and when its transaction had committed
    sequence: int
    changes: int


class MeasuredDatabase(PostgresDatabase):
    """zapkeep's own Database, counting the bound values it sends and timing each mirrored batch."""

    def __init__(self, url: str) -> None:
        super().__init__(url, max_size=4)
        self._count_lock = threading.Lock()
        self.sent_bytes = 0
        self.statements = 0
        self.batches: list[BatchTiming] = []

    def reset_counts(self) -> None:
        with self._count_lock:
            self.sent_bytes = 0
            self.statements = 0

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with super().transaction() as tx:
            yield Transaction(self._counted(tx.execute, many=False), self._counted(tx.executemany, many=True))

    def _counted(self, call: Callable[..., Any], *, many: bool) -> Callable[..., Any]:
        def run(query: str, params: Sequence[Any]) -> Any:
            rows = params if many else [params]
            with self._count_lock:
                self.statements += len(rows)
                self.sent_bytes += sum(value_size(v) for row in rows for v in row)
            return call(query, params)

        return run

    def write_batch(self, batch: MirrorBatch, fence: Any = None) -> None:
        started = time.perf_counter()
        super().write_batch(batch, fence)
        self.batches.append(BatchTiming(started, time.perf_counter(), batch.sequence, len(batch.changes)))


def lsn_value(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class WalMeter:
    """WAL position of the whole cluster (nothing but the measured change writes meanwhile)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            self.inspect = True
        except psycopg.Error:
            self.inspect = False

    def lsn(self) -> str:
        # The insert position: pg_current_wal_lsn() (the write position) can lag it by records
        # written earlier but not yet flushed, which would be counted to the next change.
        return self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]

    def full_page_bytes(self, start: str, end: str) -> int | None:
        """How much of the WAL between two positions is full-page images (pg_walinspect)."""
        if not self.inspect or start == end:
            return 0 if start == end else None
        try:
            row = self.conn.execute(
                "SELECT COALESCE(SUM(fpi_length), 0)::bigint FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn)",
                (start, end),
            ).fetchone()
        except psycopg.Error:
            return None
        return int(row[0])

    def records(self, start: str, end: str) -> str | None:
        """The WAL records between two positions, grouped: "Heap/HOT_UPDATE 2x 300 B, ..." (pg_walinspect)."""
        if not self.inspect:
            return None
        if start == end:
            return "none"
        try:
            rows = self.conn.execute(
                "SELECT resource_manager || '/' || split_part(record_type, ' ', 1), count(*), "
                "SUM(record_length)::bigint, SUM(fpi_length)::bigint "
                "FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn) GROUP BY 1 ORDER BY 3 DESC",
                (start, end),
            ).fetchall()
        except psycopg.Error:
            return None
        return ", ".join(
            f"{kind} {count}x {length:,} B" + (f" (FPI {fpi:,})" if fpi else "") for kind, count, length, fpi in rows
        )

    def checkpoint(self) -> None:
        self.conn.execute("CHECKPOINT")

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class Sample:
    wal: int
    fpi: int | None
    wall_ms: float
    sent: int
    statements: int
    detect_ms: float | None = None  # zapkeep: store commit -> write_batch begins (detect, read, encode)
    write_ms: float | None = None  # zapkeep: write_batch (fenced transaction, commit)
    observe_ms: float | None = None  # zapkeep: committed -> load_session() shows it
    start_lsn: str = ""
    end_lsn: str = ""


def median(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def timed_ms(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread, from /proc/.../stat."""
    with open(stat_path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the reference: whatsmeow's own PostgreSQL store ---------------------------------------------------


def create_reference_schema(url: str) -> None:
    """neonize (in a child process) creates whatsmeow's PostgreSQL schema in an empty database."""
    dsn = url.replace("postgresql://", "postgres://", 1) + "?sslmode=disable"
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "logging.getLogger('neonize.utils.log').setLevel(logging.WARNING)\n"
        "from neonize.client import ClientFactory\n"
        "print(len(ClientFactory.get_all_devices_from_db(sys.argv[1])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, dsn],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE},
        check=False,
    )
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name LIKE 'whatsmeow%%'"
        ).fetchone()[0]
    if result.returncode != 0 or tables == 0:
        raise RuntimeError(
            f"neonize did not create whatsmeow's PostgreSQL schema (exit {result.returncode}, {tables} tables):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )


def fill_reference(url: str, template: Path) -> int:
    """Copy every whatsmeow row of a (pristine) SQLite store into whatsmeow's PostgreSQL schema."""
    source = sqlite3.connect(f"{template.resolve().as_uri()}?mode=ro", uri=True)
    copied = 0
    try:
        with psycopg.connect(url) as conn:
            types = {
                (table, column): kind
                for table, column, kind in conn.execute(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public'"
                )
            }
            names = [
                name
                for (name,) in source.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'whatsmeow\\_%' ESCAPE '\\' "
                    "AND name <> 'whatsmeow_version' ORDER BY rowid"  # creation order: the device first
                )
            ]
            for name in names:
                columns = [row[1] for row in source.execute(f'PRAGMA table_info("{name}")')]
                missing = [c for c in columns if (name, c) not in types]
                if missing:
                    raise RuntimeError(f"whatsmeow's PostgreSQL table {name} lacks columns {missing}")
                flags = [i for i, c in enumerate(columns) if types[(name, c)] == "boolean"]
                column_list = ", ".join(f'"{c}"' for c in columns)
                rows = source.execute(f'SELECT {column_list} FROM "{name}"').fetchall()
                if not rows:
                    continue
                with conn.cursor().copy(f'COPY "{name}" ({column_list}) FROM STDIN') as copy:
                    for row in rows:
                        if flags:
                            row = tuple(bool(v) if i in flags and v is not None else v for i, v in enumerate(row))
                        copy.write_row(row)
                copied += len(rows)
    finally:
        source.close()
    return copied


def store_rows(path: Path) -> int:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [
            n
            for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'whatsmeow\\_%' ESCAPE '\\'"
            )
        ]
        return sum(conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names)
    finally:
        conn.close()


def vacuum(url: str) -> None:
    """So autovacuum has nothing left to do on the freshly loaded tables while changes are measured."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")


# --- one store size ------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    label: str
    rows: int = 0
    store_kib: float = 0.0
    document_kib: float = 0.0
    initial_sync_s: float = 0.0
    per_change: dict[str, dict[str, list[Sample]]] | None = None
    staleness_ms: list[float] | None = None
    staleness_batches: int = 0
    restore_ms: list[float] | None = None
    export_ms: list[float] | None = None
    ref_read_ms: list[float] | None = None
    reconcile_ms: list[float] | None = None
    reconcile_wal: list[int] | None = None
    reconcile_written: list[int] | None = None
    reconcile_records: list[str] | None = None
    wal_records: dict[str, str] | None = None  # kind/path -> the WAL records of a typical 2nd-pass change
    idle_child_pct: float | None = None
    idle_thread_pct: float | None = None
    idle_wal: int | None = None
    sigterm_ms: list[float] | None = None
    sigterm_stored: list[bool] | None = None
    sigterm_codes: list[int] | None = None
    errors: list[str] | None = None


class SizeBench:
    def __init__(self, label: str, size: StoreSize, cluster: PostgresCluster, wal: WalMeter, work: Path, args) -> None:
        self.label = label
        self.size = size
        self.cluster = cluster
        self.wal = wal
        self.dir = work / label
        self.args = args
        self.rng = random.Random(f"bench-{label}")
        self.result = SizeResult(label, errors=[])
        self.template = self.dir / "template" / "whatsmeow.sqlite3"
        self.store_path = self.dir / "store" / "whatsmeow.sqlite3"
        self.peers = [f"55119{n:08d}.0" for n in range(size.sessions)]
        self.contacts = [f"55218{n:08d}@s.whatsapp.net" for n in range(size.contacts)]

    # --- setup ---

    def setup(self) -> None:
        create_paired_store(self.template, self.size)
        self.result.rows = store_rows(self.template)
        self.result.store_kib = self.template.stat().st_size / 1024
        self.store_path.parent.mkdir(parents=True)
        shutil.copy(self.template, self.store_path)
        prepare_store(self.store_path)  # WAL mode and change capture, as the daemon does before neonize opens it

        zapkeep_url, reference_url = self.cluster.create_database(), self.cluster.create_database()
        create_reference_schema(reference_url)
        copied = fill_reference(reference_url, self.template)
        assert copied + 1 == self.result.rows, (copied, self.result.rows)  # all but whatsmeow_version, neonize's
        self.ref = psycopg.connect(reference_url, autocommit=True)

        self.mdb = MeasuredDatabase(zapkeep_url)
        self.mdb.open()
        self.db = PostgresDatabase(zapkeep_url, max_size=2)  # the bench's own reads, never counted
        self.db.open()
        fence = self.db.acquire_lease(SESSION, "bench", ttl_seconds=7200)
        assert fence is not None
        self.fence = fence
        self.fenced: list[Exception] = []
        self.mirror = Mirror(
            self.mdb,
            SESSION,
            self.store_path,
            fence=lambda: fence,
            on_fenced=lambda exc, _f: self.fenced.append(exc),
            poll_wait_seconds=Timing().mirror_poll_seconds,  # the daemon's
        )
        started = time.perf_counter()
        self.mirror.start()
        deadline = time.monotonic() + 600
        while self.mirror.status().last_reconcile_at is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the first reconciliation did not finish: {self.mirror.status().last_error}")
            time.sleep(0.05)
        self.result.initial_sync_s = time.perf_counter() - started
        record = self.db.load_session(SESSION)
        assert record is not None and record.format_version == 2, "the first reconciliation stored nothing"
        self.store = sqlite3.connect(self.store_path, isolation_level=None, timeout=4)
        vacuum(zapkeep_url)
        vacuum(reference_url)

    def close(self) -> None:
        for action in (
            lambda: self.mirror.stop(),
            lambda: self.store.close(),
            lambda: self.ref.close(),
            lambda: self.mdb.close(),
            lambda: self.db.close(),
        ):
            try:
                action()
            except Exception:
                pass

    # --- the two paths ---

    def store_sequence(self) -> int:
        row = self.store.execute("SELECT seq FROM sqlite_sequence WHERE name = 'zapkeep_changes'").fetchone()
        return 0 if row is None else int(row[0])

    def commit_to_store(self, statements: list[Statement]) -> tuple[float, int]:
        """Write a change into the store (one transaction); (perf_counter at commit, change sequence)."""
        if len(statements) == 1:
            self.store.execute(*statements[0])  # autocommit, as database/sql runs a single Exec
        else:
            self.store.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                self.store.execute(sql, params)
            self.store.execute("COMMIT")
        committed = time.perf_counter()
        return committed, self.store_sequence()

    def wait_mirrored(self, sequence: int, timeout: float = 30.0) -> float:
        """perf_counter when load_session() first shows the store's change sequence."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.db.load_session(SESSION)
            if record is not None and record.mirror_sequence >= sequence:
                return time.perf_counter()
            if self.fenced or time.monotonic() > deadline:
                raise RuntimeError(
                    f"change {sequence} not mirrored (stored {record.mirror_sequence if record else None}; "
                    f"mirror: {self.mirror.status().last_error}; fenced: {self.fenced})"
                )
            time.sleep(0.002)

    def zapkeep_change(self, statements: list[Statement]) -> Sample:
        start = self.wal.lsn()
        self.mdb.reset_counts()
        known = len(self.mdb.batches)
        committed, sequence = self.commit_to_store(statements)
        observed = self.wait_mirrored(sequence)
        end = self.wal.lsn()
        batch = next((b for b in self.mdb.batches[known:] if b.sequence >= sequence), None)
        return Sample(
            wal=lsn_value(end) - lsn_value(start),
            fpi=self.wal.full_page_bytes(start, end),
            wall_ms=(observed - committed) * 1000,
            sent=self.mdb.sent_bytes,
            statements=self.mdb.statements,
            detect_ms=None if batch is None else (batch.started - committed) * 1000,
            write_ms=None if batch is None else (batch.committed - batch.started) * 1000,
            observe_ms=None if batch is None else (observed - batch.committed) * 1000,
            start_lsn=start,
            end_lsn=end,
        )

    def reference_run(self, statements: list[Statement]) -> None:
        if len(statements) == 1:
            self.ref.execute(statements[0][0].replace("?", "%s"), statements[0][1])  # autocommit
        else:
            with self.ref.transaction():
                for sql, params in statements:
                    self.ref.execute(sql.replace("?", "%s"), params)

    def reference_change(self, statements: list[Statement]) -> Sample:
        start = self.wal.lsn()
        started = time.perf_counter()
        self.reference_run(statements)
        wall = (time.perf_counter() - started) * 1000
        end = self.wal.lsn()
        return Sample(
            wal=lsn_value(end) - lsn_value(start),
            fpi=self.wal.full_page_bytes(start, end),
            wall_ms=wall,
            sent=sum(value_size(v) for _, params in statements for v in params),
            statements=len(statements),
            start_lsn=start,
            end_lsn=end,
        )

    def both_unmeasured(self, statements: list[Statement]) -> None:
        _, sequence = self.commit_to_store(statements)
        self.wait_mirrored(sequence)
        self.reference_run(statements)

    # --- 1. per change ---

    def _targets(self, population: list[str], count: int) -> list[str]:
        if len(population) >= count:
            return self.rng.sample(population, count)
        return [self.rng.choice(population) for _ in range(count)]

    def per_change(self) -> None:
        reps = self.args.reps
        results: dict[str, dict[str, list[Sample]]] = {}
        peers = self._targets(self.peers, reps)
        contacts = self._targets(self.contacts, reps)
        # Pre-keys to delete: existing ones (inserted before the checkpoint, anywhere in the table),
        # topped up with new ones when the store has fewer; put back between the passes and at the end.
        existing = self.rng.sample(range(1, self.size.pre_keys + 1), min(reps, self.size.pre_keys))
        pre_keys = existing + [9_000_000 + i for i in range(reps - len(existing))]

        def restock(key_ids: list[int]) -> None:
            if key_ids:
                rows = [(DEVICE_JID, key_id, self.rng.randbytes(32), key_id % 3 != 1) for key_id in key_ids]
                self.both_unmeasured([(PRE_KEY_INSERT, row) for row in rows])

        def change(kind: str, pass_no: int, i: int) -> list[Statement]:
            if kind == "session":
                return [(SESSION_UPSERT, (DEVICE_JID, peers[i], self.rng.randbytes(1500)))]
            if kind == "pre_key":
                return [(PRE_KEY_DELETE, (DEVICE_JID, pre_keys[i]))]
            if kind == "contact":
                return [
                    (
                        contact_upsert(1),
                        (DEVICE_JID, contacts[i], f"Nome {pass_no}.{i}", f"Nome Completo {pass_no}.{i}"),
                    )
                ]
            params: list[Any] = []
            for j in range(100):
                n = i * 100 + j
                params += [
                    DEVICE_JID,
                    f"55339{n:08d}@s.whatsapp.net",
                    f"Lote {pass_no}.{n}",
                    f"Contato do Lote {pass_no}.{n}",
                ]
            return [(contact_upsert(100), tuple(params))]

        for kind in KINDS:
            samples: dict[str, list[Sample]] = {"zk1": [], "ref1": [], "zk2": [], "ref2": []}
            if kind == "pre_key":
                restock(pre_keys[len(existing) :])
            self.wal.checkpoint()
            for pass_no in (1, 2):
                if kind == "pre_key" and pass_no == 2:
                    restock(pre_keys)
                for i in range(reps):
                    statements = change(kind, pass_no, i)
                    samples[f"zk{pass_no}"].append(self.zapkeep_change(statements))
                    samples[f"ref{pass_no}"].append(self.reference_change(statements))
            if kind == "pre_key":  # back to the nominal store size
                restock(existing)
            if kind == "tx100":
                self.both_unmeasured([(CONTACTS_DELETE, (DEVICE_JID, "55339%"))])
            results[kind] = samples
            for key, chosen in samples.items():  # the WAL records of the median change, while they are at hand
                typical = sorted(chosen, key=lambda sample: sample.wal)[len(chosen) // 2]
                records = self.wal.records(typical.start_lsn, typical.end_lsn)
                self.result.wal_records = {**(self.result.wal_records or {}), f"{kind}/{key}": records or "?"}
        self.result.per_change = results

    # --- 2. staleness ---

    def staleness(self) -> None:
        known = len(self.mdb.batches)
        commits: list[tuple[float, int]] = []
        for _ in range(self.args.staleness):
            time.sleep(self.rng.uniform(0.0, 0.1))
            statement = (SESSION_UPSERT, (DEVICE_JID, self.rng.choice(self.peers), self.rng.randbytes(1500)))
            commits.append(self.commit_to_store([statement]))
        self.wait_mirrored(commits[-1][1])
        time.sleep(0.05)
        batches = self.mdb.batches[known:]
        lags = []
        for committed, sequence in commits:
            batch = next(b for b in batches if b.sequence >= sequence)
            lags.append((batch.committed - committed) * 1000)
        self.result.staleness_ms = lags
        self.result.staleness_batches = len(batches)

    # --- 4. unchanged check ---

    def unchanged(self) -> None:
        times, wals, written, records = [], [], [], []
        for _ in range(3):
            start = self.wal.lsn()
            began = time.perf_counter()
            outcome = self.mirror.reconcile("bench")
            times.append((time.perf_counter() - began) * 1000)
            end = self.wal.lsn()
            wals.append(lsn_value(end) - lsn_value(start))
            records.append(self.wal.records(start, end) or "?")
            written.append(outcome.written_rows)
        self.result.reconcile_ms, self.result.reconcile_wal, self.result.reconcile_written = times, wals, written
        self.result.reconcile_records = records

    # --- 5. idle CPU ---

    def idle_cpu(self) -> None:
        process = self.mirror._process
        thread = self.mirror._thread
        assert process is not None and thread is not None and thread.native_id is not None
        child = f"/proc/{process.pid}/stat"
        own = f"/proc/self/task/{thread.native_id}/stat"
        time.sleep(1.0)  # past the last change's trim
        start = self.wal.lsn()
        child0, own0, began = cpu_seconds(child), cpu_seconds(own), time.perf_counter()
        time.sleep(self.args.idle)
        child1, own1, elapsed = cpu_seconds(child), cpu_seconds(own), time.perf_counter() - began
        self.result.idle_child_pct = (child1 - child0) / elapsed * 100
        self.result.idle_thread_pct = (own1 - own0) / elapsed * 100
        self.result.idle_wal = lsn_value(self.wal.lsn()) - lsn_value(start)

    # --- 3. restore at boot, export ---

    def restore_and_export(self) -> None:
        self.mirror.stop()  # a boot restores while nothing mirrors (and a restore starts a new lineage)
        times = []
        for i in range(self.args.restores):
            target = self.dir / f"restore-{i}" / "whatsmeow.sqlite3"
            began = time.perf_counter()
            outcome = prepare_local_store(self.db, SESSION, target, self.fence)
            times.append((time.perf_counter() - began) * 1000)
            assert outcome.outcome is BootOutcome.RESTORED, outcome
            assert store_rows(target) == store_rows(self.store_path)
        self.result.restore_ms = times
        exports = []
        for _ in range(self.args.restores):
            began = time.perf_counter()
            _, text = export_document(self.db, SESSION)
            exports.append((time.perf_counter() - began) * 1000)
        self.result.export_ms = exports
        self.result.document_kib = len(text.encode()) / 1024
        names = [
            n
            for (n,) in self.ref.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                "AND table_name LIKE 'whatsmeow%%'"
            )
        ]

        def read_all() -> None:
            with self.ref.transaction():
                for name in names:
                    self.ref.execute(f'SELECT * FROM "{name}"').fetchall()

        self.result.ref_read_ms = [timed_ms(read_all) for _ in range(self.args.restores)]

    # --- 6. SIGTERM -> exit with a change pending (the real daemon) ---

    def sigterm(self) -> None:
        url = self.cluster.create_database()
        data_dir = self.dir / "daemon"
        store = data_dir / "sessions" / SESSION / "whatsmeow.sqlite3"
        store.parent.mkdir(parents=True)
        shutil.copy(self.template, store)
        db = PostgresDatabase(url, max_size=2)
        db.open()
        times, stored, codes = [], [], []
        try:
            for rep in range(self.args.sigterms):
                port = free_port()
                env = {
                    **os.environ,
                    **OFFLINE,
                    "PYTHONPATH": str(ROOT),
                    "DATABASE_URL": url,
                    "DATA_DIR": str(data_dir),
                    "PORT": str(port),
                    "API_TOKEN": API_TOKEN,
                }
                with open(self.dir / f"daemon-{rep}.log", "w") as log:
                    daemon = subprocess.Popen(
                        [sys.executable, "-m", "bot"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                    try:
                        wait_for(lambda: http_get(port, "/healthz") is not None, 60, "the daemon's /healthz")
                        wait_for(lambda: mirror_ready(port), 300, "the daemon's mirror to store the session")
                        jid = f"55418{rep:08d}@s.whatsapp.net"
                        marker = f"sigterm-{self.label}-{rep}"
                        conn = sqlite3.connect(store, isolation_level=None, timeout=4)
                        conn.execute(contact_upsert(1), (DEVICE_JID, jid, marker, marker))
                        sequence = conn.execute(
                            "SELECT seq FROM sqlite_sequence WHERE name = 'zapkeep_changes'"
                        ).fetchone()[0]
                        began = time.perf_counter()
                        daemon.send_signal(signal.SIGTERM)
                        conn.close()
                        codes.append(daemon.wait(timeout=120))
                        times.append((time.perf_counter() - began) * 1000)
                    finally:
                        if daemon.poll() is None:
                            daemon.kill()
                            daemon.wait()
                record = db.load_session(SESSION)
                with db.transaction() as tx:
                    row = tx.execute(
                        "SELECT CAST(row_data AS TEXT) AS row_text FROM whatsapp_session_rows "
                        "WHERE session_id = %s AND table_name = 'whatsmeow_contacts' AND row_key LIKE %s",
                        (SESSION, f"%{jid}%"),
                    ).fetchone()
                stored.append(
                    record is not None
                    and record.mirror_sequence >= sequence
                    and row is not None
                    and marker in row["row_text"]
                )
        finally:
            db.close()
        self.result.sigterm_ms, self.result.sigterm_stored, self.result.sigterm_codes = times, stored, codes

    # --- all of it ---

    def run(self) -> SizeResult:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("per-change", self.per_change),
            ("staleness", self.staleness),
            ("unchanged check", self.unchanged),
            ("idle CPU", self.idle_cpu),
            ("restore/export", self.restore_and_export),
        ]
        began = time.perf_counter()
        try:
            self.setup()
        except Exception as exc:
            self._error("setup", exc)
            self.close()
            return self.result
        progress(f"{self.label}: {self.result.rows} rows, set up in {time.perf_counter() - began:.1f} s")
        for name, step in steps:
            step_began = time.perf_counter()
            try:
                step()
            except Exception as exc:
                self._error(name, exc)
            progress(f"{self.label}: {name} {time.perf_counter() - step_began:.1f} s")
        self.close()
        step_began = time.perf_counter()
        try:
            self.sigterm()
        except Exception as exc:
            self._error("SIGTERM", exc)
        progress(f"{self.label}: SIGTERM runs {time.perf_counter() - step_began:.1f} s")
        return self.result

    def _error(self, step: str, exc: Exception) -> None:
        assert self.result.errors is not None
        self.result.errors.append(f"{self.label} {step}: {exc.__class__.__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)


def http_get(port: int, path: str) -> dict | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    try:
        with opener.open(request, timeout=5) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def mirror_ready(port: int) -> bool:
    """The daemon's mirror runs, its first reconciliation is done and the session is stored."""
    answer = http_get(port, f"/api/session/status?session_id={SESSION}")
    session = (answer or {}).get("session") or {}
    return bool(session.get("mirror_running") and session.get("last_reconcile_at") and session.get("stored"))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# --- the table -----------------------------------------------------------------------------------------


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value:,.0f}"


def pair(zk: float | None, ref: float | None, unit: str = "") -> tuple[str, float | None]:
    ratio = None if zk is None or not ref else zk / ref
    text = f"{number(zk, unit)} / {number(ref, unit)}"
    return (text + (f" ({ratio:.1f}x)" if ratio is not None else "")), ratio


class Table:
    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.rows: list[tuple[str, dict[str, str], str]] = []

    def add(self, title: str, cells: dict[str, str], goal: str = "") -> None:
        self.rows.append((title, cells, goal))

    def section(self, title: str) -> None:
        self.rows.append((title, {}, "\x00"))

    def render(self) -> str:
        width = {
            label: max([len(label) + 2] + [len(c.get(label, "")) for _, c, g in self.rows if g != "\x00"])
            for label in self.labels
        }
        first = max(len(t) for t, _, g in self.rows if g != "\x00") + 2
        lines = []
        header = " " * first + "  ".join(label.center(width[label]) for label in self.labels) + "  goal"
        lines.append(header)
        lines.append("-" * len(header) + "-" * 24)
        for title, cells, goal in self.rows:
            if goal == "\x00":
                lines.append(title)
                continue
            values = "  ".join(cells.get(label, "-").rjust(width[label]) for label in self.labels)
            lines.append(f"{title:<{first}}{values}  {goal}")
        return "\n".join(lines)


def build_table(results: list[SizeResult], reps: int) -> Table:
    labels = [f"{r.label} ({r.rows:,} rows)" for r in results]
    table = Table(labels)
    by = dict(zip(labels, results, strict=True))

    def cells(make: Callable[[SizeResult], str | None]) -> dict[str, str]:
        out = {}
        for label, result in by.items():
            try:
                value = make(result)
            except Exception:
                value = None
            out[label] = "-" if value is None else value
        return out

    def goal_pair(
        kind: str, metric: str, pass_key: str, unit: str, limit: float | None
    ) -> Callable[[SizeResult], str | None]:
        def make(result: SizeResult) -> str | None:
            if result.per_change is None:
                return None
            samples = result.per_change[kind]
            zk = median([getattr(s, metric) for s in samples[f"zk{pass_key}"]])
            ref = median([getattr(s, metric) for s in samples[f"ref{pass_key}"]])
            text, ratio = pair(zk, ref, unit)
            return text + (" !" if limit is not None and ratio is not None and ratio > limit else "")

        return make

    table.section(f"1. per change: zapkeep / reference (ratio), medians of {reps}; 1st pass right after a CHECKPOINT")
    for kind, title in KINDS.items():
        table.add(f"{title}: WAL bytes, 1st pass", cells(goal_pair(kind, "wal", "1", "", 2.0)), "<= 2x ref")
        table.add(f"{title}: WAL bytes, 2nd pass", cells(goal_pair(kind, "wal", "2", "", 2.0)), "<= 2x ref")
        table.add(f"{title}: wall ms, 1st pass", cells(goal_pair(kind, "wall_ms", "1", "ms", 2.0)), "<= 2x ref")
        table.add(f"{title}: wall ms, 2nd pass", cells(goal_pair(kind, "wall_ms", "2", "ms", 2.0)), "<= 2x ref")
        table.add(f"{title}: bytes sent", cells(goal_pair(kind, "sent", "2", "", None)), "")

    table.section("2. staleness (store commit -> committed in PostgreSQL), zapkeep; reference: 0 (writes PG itself)")

    def stale(fraction: float, limit: float) -> Callable[[SizeResult], str | None]:
        def make(result: SizeResult) -> str | None:
            if not result.staleness_ms:
                return None
            value = percentile(result.staleness_ms, fraction)
            return number(value, "ms") + (" !" if value > limit else "")

        return make

    n = max((len(r.staleness_ms or []) for r in results), default=0)
    table.add(f"p50 ms over {n} single changes", cells(stale(0.5, 250)), "<= 250 ms")
    table.add(f"p99 ms over {n} single changes", cells(stale(0.99, 1000)), "<= 1000 ms")
    table.add("max ms", cells(lambda r: number(max(r.staleness_ms), "ms") if r.staleness_ms else None), "")
    table.add(
        "mirrored batches for those changes", cells(lambda r: f"{r.staleness_batches}" if r.staleness_ms else None), ""
    )

    table.section("3. restore at boot, export (medians of 5)")

    def restore(result: SizeResult) -> str | None:
        value = median(result.restore_ms or [])
        if value is None:
            return None
        return number(value, "ms") + (" !" if result.label == "medium" and value > 300 else "")

    table.add("prepare_local_store into an empty path, ms", cells(restore), "medium <= 300 ms")
    table.add("export_document, ms", cells(lambda r: number(median(r.export_ms or []), "ms")), "")
    table.add(
        "ref: SELECT * of every whatsmeow table, ms",
        cells(lambda r: number(median(r.ref_read_ms or []), "ms")),
        "(lower bound)",
    )
    table.add("document size, KiB", cells(lambda r: number(r.document_kib) if r.document_kib else None), "")

    table.section("4. unchanged check: mirror.reconcile() on an unchanged store (median of 3)")
    table.add("time, ms", cells(lambda r: number(median(r.reconcile_ms or []), "ms")), "")

    def reconcile_wal(result: SizeResult) -> str | None:
        if not result.reconcile_wal:
            return None
        rows = max(result.reconcile_written or [0])
        text = " / ".join(f"{w:,}" for w in result.reconcile_wal) + f" (rows {rows})"
        return text + (" !" if max(result.reconcile_wal) else "")

    table.add("WAL bytes, each of 3 runs (rows written)", cells(reconcile_wal), "0 bytes")

    table.section("5. idle mirror, CPU over the idle seconds (reference: none)")
    table.add("change-capture child process", cells(lambda r: number(r.idle_child_pct, "%")), "")
    table.add("mirror thread in the bench process", cells(lambda r: number(r.idle_thread_pct, "%")), "")
    table.add("WAL bytes while idle", cells(lambda r: number(r.idle_wal)), "0 bytes")

    table.section("6. the daemon (python -m bot): SIGTERM -> exit with a change pending (median of 3)")
    table.add("SIGTERM -> exit, ms", cells(lambda r: number(median(r.sigterm_ms or []), "ms")), "")

    def reached(result: SizeResult) -> str | None:
        if not result.sigterm_stored:
            return None
        good = sum(result.sigterm_stored)
        codes = ",".join(str(c) for c in result.sigterm_codes or [])
        return f"{good}/{len(result.sigterm_stored)} (exit {codes})" + (
            " !" if good < len(result.sigterm_stored) else ""
        )

    table.add("the change reached the database", cells(reached), "all")
    return table


def notes(results: list[SizeResult]) -> list[str]:
    lines = ["", "Notes (medians):"]
    shown = next((r for r in results if r.label == "medium" and r.wal_records), None)
    shown = shown or next((r for r in results if r.wal_records), None)
    if shown is not None and shown.wal_records:
        lines.append(f"- WAL records of the median change, {shown.label} store (pg_walinspect):")
        for kind, title in KINDS.items():
            for key, name in (
                ("zk1", "zapkeep 1st"),
                ("ref1", "reference 1st"),
                ("zk2", "zapkeep 2nd"),
                ("ref2", "reference 2nd"),
            ):
                lines.append(f"    {title}, {name}: {shown.wal_records.get(f'{kind}/{key}', '?')}")
    for result in results:
        lines.append(
            f"- {result.label}: store file {result.store_kib:,.0f} KiB, {result.rows:,} rows; "
            f"first reconciliation (whole store into PG) {result.initial_sync_s:.1f} s"
        )
        if result.reconcile_records:
            lines.append(f"    unchanged check WAL records: {' | '.join(result.reconcile_records)}")
        if result.per_change is None:
            continue
        for kind, title in KINDS.items():
            samples = result.per_change[kind]
            zk2 = samples["zk2"]
            parts = [
                f"detect+read {number(median([s.detect_ms for s in zk2]), 'ms')}",
                f"PG write {number(median([s.write_ms for s in zk2]), 'ms')}",
                f"observe {number(median([s.observe_ms for s in zk2]), 'ms')}",
            ]
            fpi = "/".join(number(median([s.fpi for s in samples[key]])) for key in ("zk1", "ref1", "zk2", "ref2"))
            statements = (
                f"{median([s.statements for s in zk2]):.0f} vs {median([s.statements for s in samples['ref2']]):.0f}"
            )
            lines.append(
                f"    {title}: zapkeep wall = {', '.join(parts)} ms; full-page-image WAL bytes "
                f"zk1/ref1/zk2/ref2 {fpi}; statements zk vs ref {statements}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_mirror")
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--reps", type=int, default=30, help="changes of each kind, per pass")
    parser.add_argument("--staleness", type=int, default=200, help="single changes for the staleness percentiles")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle mirror for the CPU row")
    parser.add_argument("--restores", type=int, default=5)
    parser.add_argument("--sigterms", type=int, default=3)
    args = parser.parse_args()
    labels = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in labels if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")

    began = time.perf_counter()
    cluster = PostgresCluster(durable=True).start()
    results: list[SizeResult] = []
    try:
        wal = WalMeter(cluster.url())
        settings = {
            name: wal.conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes", "checkpoint_timeout")
        }
        with tempfile.TemporaryDirectory(prefix="bench-mirror-") as scratch:
            for label in labels:
                results.append(SizeBench(label, SIZES[label], cluster, wal, Path(scratch), args).run())
        wal.close()
    finally:
        cluster.stop()
    assert "neonize" not in sys.modules, "the bench process imported neonize"

    print()
    print(
        f"zapkeep row mirror vs whatsmeow's own PostgreSQL store; PostgreSQL {settings['server_version']} "
        f"(fsync={settings['fsync']}, synchronous_commit={settings['synchronous_commit']}, "
        f"full_page_writes={settings['full_page_writes']}, checkpoint_timeout={settings['checkpoint_timeout']}), "
        f"loopback; mirror poll wait {Timing().mirror_poll_seconds} s"
    )
    print('"!" marks a number that misses its goal. Bytes sent = sizes of the bound values (bytes raw, text UTF-8).')
    print()
    print(build_table(results, args.reps).render())
    for line in notes(results):
        print(line)
    errors = [e for r in results for e in (r.errors or [])]
    if errors:
        print("\nErrors:")
        for error in errors:
            print(f"- {error}")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
