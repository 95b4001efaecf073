"""Session persistence core: store <-> document <-> database, with the real neonize library."""

from __future__ import annotations

import sqlite3
from pathlib import Path


from bot.persistence import BackupStatus, BootOutcome, backup_session, prepare_local_store
from database import Database
from tests.synthetic import DEVICE_JID, PUSH_NAME, REALISTIC, create_paired_store, neonize, table_rows


def test_round_trip_through_database_with_real_neonize(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "data" / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store, REALISTIC)
    before = table_rows(store)
    assert len(before["whatsmeow_pre_keys"]) == REALISTIC.pre_keys

    result = backup_session(db, "default", store)
    assert result.status is BackupStatus.WRITTEN
    store.unlink()

    boot = prepare_local_store(db, "default", store)

    assert boot.outcome is BootOutcome.RESTORED
    assert table_rows(store) == before
    devices = neonize("devices", store)
    assert devices == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    assert store.stat().st_mode & 0o777 == 0o600
    assert store.parent.stat().st_mode & 0o777 == 0o700
    assert _journal_mode(store) == "wal"


def test_boot_rule_migrates_a_paired_local_store_then_pairs_when_nothing(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.PAIRING_NEEDED

    neonize("create", store)  # a store whatsmeow made, never paired
    assert prepare_local_store(db, "default", store).outcome is BootOutcome.PAIRING_NEEDED
    assert db.load_session("default") is None

    store.unlink()
    create_paired_store(store)
    boot = prepare_local_store(db, "default", store)
    assert boot.outcome is BootOutcome.MIGRATED
    stored = db.load_session("default")
    assert stored is not None and stored.device_jid == DEVICE_JID and stored.push_name == PUSH_NAME


def test_unchanged_store_is_not_written_again(db: Database, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    first = backup_session(db, "default", store)
    second = backup_session(db, "default", store)
    assert (first.status, second.status) == (BackupStatus.WRITTEN, BackupStatus.UNCHANGED)
    assert [h.version for h in db.list_history("default")] == [first.version]

    with sqlite3.connect(store) as conn:
        conn.execute("UPDATE whatsmeow_device SET push_name = 'Novo Nome'")
    third = backup_session(db, "default", store)
    assert third.status is BackupStatus.WRITTEN
    assert db.load_session("default").push_name == "Novo Nome"
    assert [h.version for h in db.list_history("default")] == [third.version, first.version]


def _journal_mode(store: Path) -> str:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


def test_a_stale_wal_beside_the_store_is_not_replayed_into_the_restored_one(db: Database, tmp_path: Path) -> None:
    # The snapshot that will be restored.
    seed = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(seed)
    backup_session(db, "default", seed)
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
