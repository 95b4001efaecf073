"""Session persistence core: store <-> mirrored rows <-> document, with the real neonize library."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from bot.session import document as session_document
from bot.session.persistence import BootOutcome, export_document, prepare_local_store, snapshot_to_history, sync_session
from bot.session.store_worker import inspect_store
from database import Database
from tests.synthetic import DEVICE_JID, PUSH_NAME, REALISTIC, create_paired_store, neonize, table_rows, take_snapshot


def test_round_trip_through_database_with_real_neonize(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "data" / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store, REALISTIC)
    before = table_rows(store)
    assert len(before["whatsmeow_pre_keys"]) == REALISTIC.pre_keys
    total = sum(len(rows) for rows in before.values())

    result = sync_session(db, "default", store)
    assert result.paired and result.device_jid == DEVICE_JID
    assert result.written_rows == result.total_rows == total  # every row mirrored, one by one
    assert len(db.load_rows("default")) == total
    # The document assembled from the mirrored rows is the store's own snapshot, checksum for checksum.
    assert result.checksum == take_snapshot(store)["checksum"]
    record, text = export_document(db, "default")
    assert session_document.validate_document(session_document.parse_document(text)).checksum == record.checksum
    assert record.checksum == result.checksum
    store.unlink()

    boot = prepare_local_store(db, "default", store)

    assert boot.outcome is BootOutcome.RESTORED
    assert table_rows(store) == before
    devices = neonize("devices", store)
    assert devices == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    assert store.stat().st_mode & 0o777 == 0o600
    assert store.parent.stat().st_mode & 0o777 == 0o700
    assert _journal_mode(store) == "wal"
    # The rebuilt store starts the lineage now stored, numbering its changes after the stored sequence.
    stored = db.load_session("default")
    info = inspect_store(store)
    assert info is not None and info.device_jid == DEVICE_JID
    assert info.lineage == stored.lineage != record.lineage
    assert info.sequence == stored.mirror_sequence
    assert boot.record == stored


def test_boot_rule_migrates_a_paired_local_store_then_pairs_when_nothing(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.PAIRING_NEEDED

    neonize("create", store)  # a store whatsmeow made, never paired
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.PAIRING_NEEDED
    unpaired = sync_session(db, "default", store)
    assert not unpaired.paired and unpaired.written_rows == 0
    assert db.load_session("default") is None
    assert db.load_rows("default") == []

    store.unlink()
    create_paired_store(store)
    boot = prepare_local_store(db, "default", store)
    assert boot.outcome is BootOutcome.MIGRATED and boot.device_jid == DEVICE_JID
    assert db.load_session("default") is None  # the boot only decides; the mirror (or a sync) stores it

    synced = sync_session(db, "default", store)
    assert synced.paired and synced.written_rows == synced.total_rows > 0
    stored = db.load_session("default")
    assert stored is not None and stored.device_jid == DEVICE_JID and stored.push_name == PUSH_NAME
    assert stored.format_version == 2 and stored.checksum == synced.checksum

    # From now on the local store is the one the stored session came from: it is kept, not overwritten.
    rows_before = table_rows(store)
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.KEPT
    assert table_rows(store) == rows_before


def test_a_local_store_is_kept_only_when_it_descends_from_the_stored_session(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    sync_session(db, "default", store)
    older = tmp_path / "older.sqlite3"
    shutil.copyfile(store, older)

    # A change the database has not seen yet (the daemon died before mirroring it) survives the boot.
    _set_push_name(store, "Ainda Local")
    boot = prepare_local_store(db, "default", store)
    assert boot.outcome is BootOutcome.KEPT
    assert _push_name(store) == "Ainda Local"
    assert db.load_session("default").push_name == PUSH_NAME
    pushed = sync_session(db, "default", store)
    assert pushed.written_rows == 1 and pushed.missed == 0  # change capture logged it
    assert db.load_session("default").push_name == "Ainda Local"

    # The same lineage, but behind what is stored: the stored session wins.
    shutil.copyfile(older, store)
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.RESTORED
    assert _push_name(store) == "Ainda Local"

    # A store of another lineage (another pairing, a copy from elsewhere) is replaced too.
    other = tmp_path / "other.sqlite3"
    create_paired_store(other, seed=2)
    shutil.copyfile(other, store)
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.RESTORED
    assert table_rows(store) != table_rows(other)
    assert _push_name(store) == "Ainda Local"


def test_unchanged_store_is_not_written_again(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    first = sync_session(db, "default", store)
    stored = db.load_session("default")
    second = sync_session(db, "default", store)
    assert first.written_rows > 0 and second.written_rows == 0
    assert second.checksum == first.checksum
    assert db.load_session("default") == stored  # not even updated_at moved
    version = snapshot_to_history(db, "default", None, "test")
    assert version is not None
    assert snapshot_to_history(db, "default", None, "test") is None  # same checksum: no new snapshot
    assert [h.version for h in db.list_history("default")] == [version]

    _set_push_name(store, "Novo Nome")
    third = sync_session(db, "default", store)
    assert third.written_rows == 1 and third.missed == 0  # only the device row, and it was logged
    assert third.checksum != first.checksum and third.sequence > first.sequence
    record = db.load_session("default")
    assert record.push_name == "Novo Nome" and record.checksum == third.checksum
    assert record.mirror_sequence == third.sequence
    newer = snapshot_to_history(db, "default", None, "test")
    assert newer is not None and newer > version
    assert [h.version for h in db.list_history("default")] == [newer, version]
    assert db.load_session("default").version == newer


def _set_push_name(store: Path, name: str) -> None:
    conn = sqlite3.connect(store)
    try:
        with conn:
            conn.execute("UPDATE whatsmeow_device SET push_name = ?", (name,))
    finally:
        conn.close()


def _push_name(store: Path) -> str:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT push_name FROM whatsmeow_device").fetchone()[0]
    finally:
        conn.close()


def _journal_mode(store: Path) -> str:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


def test_a_stale_wal_beside_the_store_is_not_replayed_into_the_restored_one(db: Database, tmp_path: Path) -> None:
    # The session that will be restored.
    seed = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(seed)
    sync_session(db, "default", seed)
    expected = table_rows(seed)
    # A store left behind by a crash: its last writes only in its -wal file.
    store = tmp_path / "data" / "whatsmeow.sqlite3"
    create_paired_store(store, seed=2)
    writer = sqlite3.connect(store)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    with writer:
        writer.execute("DELETE FROM whatsmeow_pre_keys")
    crashed_wal = Path(f"{store}-wal").read_bytes()
    writer.close()
    assert len(crashed_wal) > 0
    Path(f"{store}-wal").write_bytes(crashed_wal)

    assert prepare_local_store(db, "default", store).outcome is BootOutcome.RESTORED

    assert not Path(f"{store}-wal").exists() or Path(f"{store}-wal").stat().st_size == 0
    assert table_rows(store) == expected
