"""A snapshot taken while whatsmeow's Go code writes the store is consistent, and Go never fails."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.store_worker import restore_store, snapshot_store
from tests.synthetic import HELPER, REALISTIC, create_paired_store

BATCH = 25  # the helper writes contacts 25 per Go call, one transaction each
WRITES = 10000
PAUSE_SECONDS = 0.01  # paced like bursts of real traffic, so snapshots overlap many commits


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_snapshots_while_go_writes_are_consistent(tmp_path: Path, journal_mode: str) -> None:
    seed = tmp_path / "seed.sqlite3"
    create_paired_store(seed, REALISTIC)
    store = tmp_path / "live" / "whatsmeow.sqlite3"
    if journal_mode == "wal":
        restore_store(snapshot_store(seed).text, store)  # a restored store, as the daemon runs it
    else:
        store.parent.mkdir()
        seed.rename(store)
    base_contacts = _count(store, "whatsmeow_contacts")

    writer = subprocess.Popen(
        [sys.executable, str(HELPER), "write-contacts", str(store), str(WRITES), str(PAUSE_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9"},
    )
    seen: list[int] = []
    while writer.poll() is None:
        snapshot = snapshot_store(store)
        copy = tmp_path / f"copy-{len(seen)}" / "whatsmeow.sqlite3"
        restore_store(snapshot.text, copy)  # validates every checksum, then SQLite's integrity_check
        contacts = json.loads(snapshot.text)["metadata"]["row_counts"]["whatsmeow_contacts"] - base_contacts
        assert contacts % BATCH == 0 or contacts == WRITES, f"torn read: {contacts} contacts"
        seen.append(contacts)
    out, err = writer.communicate()
    report = json.loads(out.strip().splitlines()[-1])

    assert report == {"written": WRITES, "failures": 0}, err[-2000:]
    assert _count(store, "whatsmeow_contacts") == base_contacts + WRITES
    assert seen == sorted(seen)
    assert len(seen) >= 2, "the writer finished before a snapshot overlapped it"
    assert sum(0 < n < WRITES for n in seen) >= 5, f"snapshots did not overlap the writer: {seen}"


def _count(store: Path, table: str) -> int:
    conn = sqlite3.connect(store)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()
