"""The runtime against a fake WhatsApp that behaves like neonize (events from another thread)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import events
from bot.config import Config
from bot.runtime import Backoff, Runtime, State, Timing
from database import Database
from tests.fake_whatsapp import FakeClient, FakeWhatsApp, wait_until
from tests.synthetic import DEVICE_JID, create_paired_store, table_rows

FAST = Timing(
    debounce_seconds=0.4,
    debounce_max_seconds=5,
    after_connect_seconds=0.2,
    after_pair_seconds=0.1,
    watch_interval_seconds=0.05,
    qr_round_seconds=1.0,
    qr_check_seconds=0.2,
)


def make_config(tmp_path: Path, **overrides: str) -> Config:
    env = {"DATA_DIR": str(tmp_path / "data"), "BACKUP_INTERVAL_SECONDS": "3600", **overrides}
    return Config.from_env(env)


@pytest.fixture
def network(whatsmeow_template: Path) -> FakeWhatsApp:
    return FakeWhatsApp(schema_template=whatsmeow_template)


@pytest.fixture
def runtime_factory(db: Database, network: FakeWhatsApp, tmp_path: Path) -> Iterator:
    made: list[Runtime] = []

    def make(**kwargs) -> Runtime:
        config = kwargs.pop("config", None) or make_config(tmp_path)
        runtime = Runtime(config, db, network.factory, timing=kwargs.pop("timing", FAST), **kwargs)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.stop()


def versions(db: Database) -> list[int]:
    return [h.version for h in db.list_history("default")]


def start_paired(runtime: Runtime, network: FakeWhatsApp, db: Database) -> FakeClient:
    """Start from nothing, scan the QR, wait until connected and the backups are done."""
    runtime.start()
    wait_until(lambda: runtime.state is State.QR, message="qr state")
    client = network.current()
    client.scan_qr()
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    settle(runtime, db)
    return client


def settle(runtime: Runtime, db: Database, seconds: float = 1.0) -> None:
    """Wait until no backup has been written for a while."""
    last = versions(db)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < seconds:
        time.sleep(0.05)
        if versions(db) != last:
            last, quiet_since = versions(db), time.monotonic()


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
    assert db.load_session("default").device_jid == DEVICE_JID


def test_a_burst_of_store_changes_gives_exactly_one_backup(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory()
    client = start_paired(runtime, network, db)
    before = versions(db)

    for _ in range(4):  # four writes inside the debounce window
        client.write_store()
        time.sleep(0.1)
    settle(runtime, db, seconds=1.5)

    assert len(versions(db)) == len(before) + 1
    stored = db.load_session("default")
    assert stored.version == versions(db)[0]
    assert '"whatsmeow_contacts":30' in stored.session_data.replace(" ", "")  # 10 synthetic + 4 x 5


def test_an_unchanged_store_is_never_written_again(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory()
    start_paired(runtime, network, db)
    row = db.load_session("default")

    results = [runtime.backup_now("test") for _ in range(3)]

    assert [r.status.value for r in results] == ["unchanged"] * 3
    assert db.load_session("default") == row  # same version, same updated_at


def test_logout_wipes_local_and_stored_session_and_pairs_again(runtime_factory, db: Database, network, tmp_path):
    runtime = runtime_factory()
    first = start_paired(runtime, network, db)
    history = versions(db)

    first.unlink()

    wait_until(lambda: runtime.state is State.QR, message="back to qr")
    second = network.current()
    assert second is not first and second.device_jid() is None
    assert db.load_session("default") is None
    assert versions(db) == history  # an admin can still roll back
    status = runtime.status()
    assert status.jid is None and status.qr_available
    assert "logged out" in status.last_error


def test_stream_replaced_stops_without_reconnecting_or_writing(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory()
    client = start_paired(runtime, network, db)
    row = db.load_session("default")

    client.emit(events.StreamReplaced())
    wait_until(lambda: runtime.state is State.REPLACED)
    wait_until(client.stopped.is_set, message="client stopped")
    client.write_store()  # the other owner's writes must not be backed up from here
    time.sleep(1.5)
    runtime.stop()

    assert len(network.clients) == 1  # never reconnected
    assert db.load_session("default") == row
    assert runtime.state is State.STOPPED
    assert runtime.backup_now() is None


def test_restores_from_the_database_at_boot_and_connects_without_qr(runtime_factory, db, network, tmp_path) -> None:
    from bot.persistence import backup_session

    seed = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(seed)
    backup_session(db, "default", seed)
    runtime = runtime_factory()

    runtime.start()

    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    assert all(not c.qr_codes for c in network.clients)
    assert table_rows(runtime.config.store_path) == table_rows(seed)
    assert runtime.status().jid == DEVICE_JID


def test_connect_failures_back_off_exponentially_with_a_cap(runtime_factory, db, network) -> None:
    network.connected = False
    delays: list[float] = []
    runtime = runtime_factory(backoff=Backoff(base_seconds=1, cap_seconds=60), wait=delays.append, jitter=lambda: 1.0)
    runtime.start()
    wait_until(lambda: len(delays) >= 10, message="ten retries")
    network.connected = True
    wait_until(lambda: runtime.state is State.QR)

    assert delays[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    status = runtime.status()
    assert status.reconnect_count >= 10
    assert "proxyconnect" in status.last_error


def test_jitter_keeps_each_delay_between_half_and_the_full_ceiling() -> None:
    backoff = Backoff(base_seconds=1, cap_seconds=60)
    assert backoff.delay(3, 0.0) == 2.0 and backoff.delay(3, 1.0) == 4.0
    assert backoff.delay(50, 0.0) == 30.0 and backoff.delay(50, 1.0) == 60.0


def test_expired_qr_round_starts_a_fresh_one(runtime_factory, network) -> None:
    runtime = runtime_factory()
    runtime.start()
    wait_until(lambda: runtime.state is State.QR)
    first = network.current()

    wait_until(lambda: len(network.clients) >= 2, timeout=10, message="a new pairing round")

    assert first.stopped.is_set()
    wait_until(lambda: runtime.qr_code() is not None and network.current() is not first)
    assert runtime.state is State.QR


def test_shutdown_takes_a_final_backup(runtime_factory, db: Database, network) -> None:
    runtime = runtime_factory(
        timing=Timing(
            debounce_seconds=30, after_connect_seconds=0.1, after_pair_seconds=0.1, watch_interval_seconds=0.05
        )
    )
    client = start_paired(runtime, network, db)
    client.write_store(rows=7)

    runtime.stop()

    assert '"whatsmeow_contacts":17' in db.load_session("default").session_data.replace(" ", "")
    assert client.stopped.is_set() and runtime.state is State.STOPPED


def test_pair_phone_asks_for_a_pairing_code_instead_of_a_qr(runtime_factory, network, tmp_path) -> None:
    runtime = runtime_factory(config=make_config(tmp_path, PAIR_PHONE="+55 11 98765-4321"))
    runtime.start()
    wait_until(lambda: runtime.status().pairing_code == "ABCD-EFGH", message="pairing code")
    assert runtime.state is State.QR
