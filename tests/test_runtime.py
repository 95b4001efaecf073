"""The runtime against a fake WhatsApp that behaves like neonize (events from another thread)."""

from __future__ import annotations

import logging

from dataclasses import replace

import json
from collections import Counter

import pytest

from bot.connection import events
from bot.process.retry import RetrySchedule
from bot.session.state import State
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, make_config, mirrored, start_paired, stored_rows, versions
from tests.synthetic import DEVICE_JID, PUSH_NAME, create_paired_store, table_rows


def test_pairing_from_an_empty_start_is_backed_up(runtime_factory, db: Database, network: FakeWhatsApp) -> None:
    runtime = runtime_factory()
    runtime.start()
    wait_until(lambda: runtime.state is State.QR, message="qr state")
    assert runtime.qr_code().startswith("2@fakeqr")
    assert db.load_session("default") is None

    network.current().scan_qr()

    wait_until(lambda: db.load_session("default") is not None, message="backup after pairing")
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    wait_until(lambda: runtime.status().last_backup_version is not None, message="the backup in the status")
    status = runtime.status()
    assert status.jid == DEVICE_JID and status.phone == "5511987654321"
    assert runtime.qr_code() is None
    stored = db.load_session("default")
    assert stored.device_jid == DEVICE_JID and stored.format_version == 2
    # Every row of the store is in the database, and the snapshot in history is the whole document.
    in_store = table_rows(runtime.config.store_path)
    assert Counter(r.table for r in db.load_rows("default")) == {t: len(rows) for t, rows in in_store.items() if rows}
    (entry,) = db.list_history("default")
    assert status.last_backup_version == entry.version == stored.version
    snapshot = json.loads(db.load_history_version("default", entry.version).session_data)
    assert snapshot["metadata"]["device_jid"] == DEVICE_JID
    assert sum(len(t["rows"]) for t in snapshot["tables"]) == sum(len(rows) for rows in in_store.values())


def test_a_burst_of_store_changes_is_mirrored_row_by_row_without_a_snapshot(
    runtime_factory, db: Database, network
) -> None:
    # A poll far longer than the waits below: what is mirrored was woken by the commits themselves.
    runtime = runtime_factory(timing=replace(FAST, mirror_poll_seconds=600))
    client = start_paired(runtime, network, db)
    before = db.load_session("default")
    history = db.list_history("default")
    assert len(stored_rows(db, "whatsmeow_contacts")) == 10

    for _ in range(4):  # four whatsmeow transactions in quick succession
        client.write_store()
    wait_until(
        lambda: len(stored_rows(db, "whatsmeow_contacts")) == 30, timeout=60, message="the new contacts mirrored"
    )

    assert mirrored(runtime, db)  # the checksum moved in the same transaction as the rows
    contacts = "\n".join(stored_rows(db, "whatsmeow_contacts"))
    assert all(f"55319{n:08d}@s.whatsapp.net" in contacts and f"Contato {n}" in contacts for n in range(10, 30))
    after = db.load_session("default")
    assert after.mirror_sequence > before.mirror_sequence and after.updated_at > before.updated_at
    assert after.lineage == before.lineage and after.version == before.version
    assert db.list_history("default") == history  # rows are mirrored; no full snapshot for them
    wait_until(lambda: runtime.status().mirror_sequence == after.mirror_sequence, message="the status told")


def test_an_unchanged_store_is_never_written_again(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory()
    start_paired(runtime, network, db)
    history = db.list_history("default")

    first = runtime.backup_now("test")
    row = db.load_session("default")
    rows = db.load_rows("default")
    results = [first, runtime.backup_now("test"), runtime.backup_now("test")]

    assert [r.written_rows for r in results] == [0, 0, 0]
    assert [r.new_snapshot for r in results] == [False, False, False]  # the snapshot after pairing is current
    assert {r.checksum for r in results} == {row.checksum}
    assert {r.version for r in results} == {history[0].version}
    assert db.load_session("default") == row  # same checksum, same sequence, same updated_at
    assert db.load_rows("default") == rows
    assert db.list_history("default") == history


def test_logout_wipes_local_and_stored_session_and_pairs_again(runtime_factory, db: Database, network, tmp_path):
    runtime = runtime_factory()
    first = start_paired(runtime, network, db)
    history = db.list_history("default")

    first.unlink()

    wait_until(lambda: runtime.state is State.QR, message="back to qr")
    second = network.current()
    assert second is not first and second.device_jid() is None
    assert db.load_session("default") is None
    assert db.load_rows("default") == []  # the mirrored rows went with it
    assert db.list_history("default") == history  # an admin can still roll back
    status = runtime.status()
    assert status.jid is None and status.qr_available
    assert "logged out" in status.last_error


def test_stream_replaced_stops_without_reconnecting_or_writing(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory()
    client = start_paired(runtime, network, db)
    row, rows, history = db.load_session("default"), db.load_rows("default"), db.list_history("default")

    client.emit(events.StreamReplaced())
    wait_until(lambda: runtime.state is State.REPLACED)
    wait_until(client.stopped.is_set, message="client stopped")
    wait_until(lambda: not runtime.status().mirror_running, message="the mirror stopped")
    supervisor = runtime._supervisor
    wait_until(lambda: not supervisor.is_alive(), message="the supervisor gave up the session")
    client.write_store()  # the other owner's writes must not be backed up from here
    runtime.stop()  # a running mirror would flush them here, a shutdown snapshot would keep them

    assert len(network.clients) == 1  # never reconnected
    assert db.load_session("default") == row
    assert db.load_rows("default") == rows
    assert db.list_history("default") == history
    assert runtime.state is State.STOPPED
    assert runtime.backup_now() is None


def test_restores_from_the_database_at_boot_and_connects_without_qr(runtime_factory, db, network, tmp_path) -> None:
    from bot.session.persistence import sync_session

    seed = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(seed)
    seeded = sync_session(db, "default", seed)
    assert seeded.paired and seeded.written_rows == seeded.total_rows == len(db.load_rows("default")) > 70
    stored = db.load_session("default")
    runtime = runtime_factory()

    runtime.start()

    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    assert all(not c.qr_codes for c in network.clients)
    assert table_rows(runtime.config.store_path) == table_rows(seed)
    assert runtime.status().jid == DEVICE_JID
    # The restored store is what is stored: comparing them writes nothing.
    result = runtime.backup_now("test")
    assert result.written_rows == 0 and result.checksum == stored.checksum == seeded.checksum
    assert db.load_session("default").checksum == stored.checksum


def test_a_migrated_boot_keeps_a_first_snapshot_at_once_and_shows_the_push_name(
    runtime_factory, db: Database, network: FakeWhatsApp
) -> None:
    runtime = runtime_factory()
    create_paired_store(runtime.config.store_path)  # paired before this daemon stored anything
    assert db.load_session("default") is None

    runtime.start()

    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    wait_until(lambda: mirrored(runtime, db), message="the local store stored")
    assert all(not c.qr_codes for c in network.clients)
    stored = db.load_session("default")
    assert stored.push_name == PUSH_NAME
    history = db.list_history("default")  # no shutdown, no periodic job: the boot kept it
    assert [h.checksum for h in history] == [stored.checksum]
    status = runtime.status()
    assert status.push_name == PUSH_NAME and status.last_backup_version == stored.version
    assert status.jid == DEVICE_JID


def test_connect_failures_back_off_exponentially_with_a_cap(runtime_factory, db, network, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.runtime")
    network.connected = False
    network.offline_error = (
        "failed to dial whatsapp web websocket: proxyconnect tcp: dial tcp 127.0.0.1:9: connect: connection refused"
    )
    delays: list[float] = []
    runtime = runtime_factory(
        backoff=RetrySchedule.exponential(first=1, cap=60), wait=delays.append, jitter=lambda: 1.0
    )
    runtime.start()
    wait_until(lambda: len(delays) >= 10, message="ten retries")
    network.connected = True
    wait_until(lambda: runtime.state is State.QR)

    assert delays[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    status = runtime.status()
    assert status.reconnect_count >= 10
    assert "proxyconnect" in status.last_error  # the whole text in the status
    # In the log: one short line an operator reads at a glance; the whole Go error at DEBUG.
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retrying in" in r.getMessage()
    ]
    assert warnings and all(
        "failed to dial whatsapp web websocket (connection refused); retrying" in line and "proxyconnect" not in line
        for line in warnings
    )
    assert any(r.levelno == logging.DEBUG and network.offline_error in r.getMessage() for r in caplog.records)


def test_jitter_keeps_each_delay_between_half_and_the_full_ceiling() -> None:
    backoff = RetrySchedule.exponential(first=1, cap=60)
    assert backoff.delay(3, 0.0) == 2.0 and backoff.delay(3, 1.0) == 4.0
    assert backoff.delay(50, 0.0) == 30.0 and backoff.delay(50, 1.0) == 60.0


def test_expired_qr_round_starts_a_fresh_one(runtime_factory, network) -> None:
    runtime = runtime_factory(timing=replace(FAST, qr_round_seconds=1.0))
    runtime.start()
    wait_until(lambda: runtime.state is State.QR)
    first = network.current()

    wait_until(lambda: len(network.clients) >= 2, timeout=10, message="a new pairing round")

    assert first.stopped.is_set()
    wait_until(lambda: runtime.qr_code() is not None and network.current() is not first)
    assert runtime.state is State.QR


@pytest.mark.parametrize("newest_snapshot_is_old", [False, True])
def test_shutdown_stores_the_last_changes_and_a_snapshot_only_when_the_newest_is_old(
    runtime_factory, db: Database, network, newest_snapshot_is_old: bool
) -> None:
    interval = 0.0 if newest_snapshot_is_old else 900.0
    runtime = runtime_factory(timing=replace(FAST, history_interval_seconds=interval))
    client = start_paired(runtime, network, db)
    history = versions(db)
    client.write_store(rows=7)

    runtime.stop()

    assert client.stopped.is_set() and runtime.state is State.STOPPED
    assert len(stored_rows(db, "whatsmeow_contacts")) == 17  # the 7 written just before stop()
    assert mirrored(runtime, db)
    assert db.lease("default").owner_id is None  # released only after that
    if not newest_snapshot_is_old:  # a redeploy soon after the last snapshot adds none
        assert versions(db) == history
        return
    # The newest snapshot is older than the history interval: what changed is kept whole, once.
    assert len(versions(db)) == len(history) + 1
    newest = db.load_history_version("default", versions(db)[0])
    assert newest.checksum == db.load_session("default").checksum
    (contacts,) = [t for t in json.loads(newest.session_data)["tables"] if t["name"] == "whatsmeow_contacts"]
    assert len(contacts["rows"]) == 17


def test_pair_phone_asks_for_a_pairing_code_instead_of_a_qr(runtime_factory, network, tmp_path) -> None:
    runtime = runtime_factory(config=make_config(tmp_path, PAIR_PHONE="+55 11 98765-4321"))
    runtime.start()
    wait_until(lambda: runtime.status().pairing_code == "ABCD-EFGH", message="pairing code")
    assert runtime.state is State.QR


# --- with the fake as harsh as whatsmeow (tests/fake_whatsapp.py's switches) ---------------------


def _wiped_and_pairing_again(runtime, db: Database, network: FakeWhatsApp, first, history) -> None:
    wait_until(lambda: runtime.state is State.QR, message="back to qr")
    second = network.current()
    assert second is not first and second.device_jid() is None  # a new, unpaired store
    assert db.load_session("default") is None and db.load_rows("default") == []
    assert db.list_history("default") == history  # an admin can still roll back
    assert runtime.status().jid is None


def test_an_unlink_announced_before_whatsmeow_deletes_the_device_still_wipes_everything(
    runtime_factory, db: Database, network: FakeWhatsApp
) -> None:
    network.logged_out_before_wipe = True  # whatsmeow: LoggedOut dispatched, then the device deleted
    runtime = runtime_factory()
    first = start_paired(runtime, network, db)
    history = db.list_history("default")
    first.unlink()  # returns once whatsmeow's delete landed, after the daemon had the event
    _wiped_and_pairing_again(runtime, db, network, first, history)
    network.current().scan_qr()  # and pairing again is stored as before
    wait_until(lambda: runtime.state is State.CONNECTED, message="paired again")
    wait_until(lambda: mirrored(runtime, db), message="the new store mirrored")
    assert db.load_session("default").device_jid == DEVICE_JID


def test_a_logout_whose_request_fails_still_wipes_locally_and_pairs_again(
    runtime_factory, db: Database, network: FakeWhatsApp
) -> None:
    """whatsmeow's Logout raises when its request fails, and then deletes nothing and says nothing:
    the admin asked to unlink, so this device forgets the session all the same."""
    network.logout_error = "error sending logout request: websocket not connected"
    runtime = runtime_factory()
    first = start_paired(runtime, network, db)
    history = db.list_history("default")
    assert runtime.logout() is False  # not unlinked on the phone's side: the API says so
    _wiped_and_pairing_again(runtime, db, network, first, history)
    assert runtime.status().last_error == "logged out by an admin"


def test_whatsmeows_logout_emits_no_logged_out_and_the_daemon_still_wipes(
    runtime_factory, db: Database, network: FakeWhatsApp
) -> None:
    network.logout_emits_logged_out = False
    runtime = runtime_factory()
    first = start_paired(runtime, network, db)
    history = db.list_history("default")
    assert runtime.logout() is True
    _wiped_and_pairing_again(runtime, db, network, first, history)


def test_a_retry_schedule_repeats_its_last_step_or_grows_to_its_cap() -> None:
    steps = RetrySchedule((5, 15, 60))
    assert [steps.delay(attempt) for attempt in range(1, 6)] == [5, 15, 60, 60, 60]
    assert steps.delay(2, 0.0) == 15  # no jitter unless asked
    growing = RetrySchedule((1.0,), factor=3.0, cap=20.0)
    assert [growing.delay(attempt) for attempt in range(1, 6)] == [1.0, 3.0, 9.0, 20.0, 20.0]
    assert RetrySchedule.exponential(first=1, cap=60).delay(10_000, 1.0) == 60.0  # no overflow, years in
