"""Only one process talks to WhatsApp for a session; stale owners neither connect nor write."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from bot.runtime import Runtime
from bot.wiring import build_runtime
from bot.session.state import State
from database import Database, PostgresDatabase
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.pg_cluster import PostgresCluster
from tests.synthetic import table_rows
from tests.runtime_helpers import FAST, Calls, make_config, mirrored

QUICK_LEASE = {"LEASE_TTL_SECONDS": "3", "LEASE_RENEW_SECONDS": "1", "API_TOKEN": "t" * 20}
# The default lease (30 s, renewed every 10 s), for a test that expires the lease itself: the quick
# one runs out after two slow renewals on a loaded machine, and a demoted owner refuses what is asked.
LONG_LEASE = {"API_TOKEN": QUICK_LEASE["API_TOKEN"]}
TIMING = replace(FAST, standby_poll_seconds=0.2)


def owner(
    db: Database, template: Path, data_dir: Path, name: str, lease: dict[str, str] = QUICK_LEASE
) -> tuple[Runtime, FakeWhatsApp]:
    network = FakeWhatsApp(schema_template=template)
    runtime = build_runtime(make_config(data_dir, **lease), db, network.factory, timing=TIMING, owner_id=name)
    return runtime, network


def paired(runtime: Runtime, network: FakeWhatsApp, db: Database) -> None:
    """Pair; return once the store is mirrored and the snapshot after pairing is in history."""
    runtime.start()
    wait_until(lambda: runtime.state is State.QR, message=f"{runtime.owner_id} qr")
    network.current().scan_qr()
    wait_until(lambda: runtime.state is State.CONNECTED, message=f"{runtime.owner_id} connected")
    wait_until(lambda: db.list_history("default") != [], message="the snapshot after pairing")
    wait_until(lambda: mirrored(runtime, db), message="the store mirrored")


def stored(db: Database) -> tuple:
    """Everything the database holds of the session."""
    return db.load_session("default"), db.load_rows("default"), db.list_history("default")


def test_second_daemon_stands_by_then_takes_over_on_graceful_shutdown(
    db: Database, whatsmeow_template: Path, tmp_path: Path
) -> None:
    a, network_a = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    b, network_b = owner(db, whatsmeow_template, tmp_path / "b", "host-b")
    try:
        paired(a, network_a, db)
        network_a.current().write_store(rows=3)

        b.start()
        wait_until(lambda: b.state is State.STANDBY, message="b stands by")
        assert not b.status().owns_session
        assert b.readiness().reason == "standby: another instance holds session default"
        assert network_b.clients == []  # never built a client
        assert not b.config.store_path.exists()

        a.stop()  # the last changes mirrored, a snapshot, then release
        # Released, not left to expire (that takes the 3 s TTL): b, polling, may already hold it.
        assert a.state is State.STOPPED and db.lease("default").owner_id in (None, "host-b")
        assert len([r for r in db.load_rows("default") if r.table == "whatsmeow_contacts"]) == 13

        wait_until(lambda: b.state is State.CONNECTED, timeout=10, message="b took over")
        status = b.status()
        assert status.owns_session and status.fencing_token == 2 and status.handover_seconds is not None
        assert table_rows(b.config.store_path) == table_rows(a.config.store_path)  # incl. the last 3 rows
        assert all(not c.qr_codes for c in network_b.clients)
    finally:
        a.stop()
        b.stop()


def test_a_lease_that_could_not_be_renewed_is_never_said_to_be_held_by_another_instance(
    db: Database, whatsmeow_template: Path, tmp_path: Path
) -> None:
    a, network = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    try:
        paired(a, network, db)
        client = network.current()
        with db.transaction() as tx:  # renewals wait behind this lock: the lease cannot be renewed
            if db.backend == "postgresql":  # (SQLite's BEGIN IMMEDIATE holds every write already)
                tx.execute("SELECT 1 FROM whatsapp_session_leases WHERE session_id = %s FOR UPDATE", ("default",))
            wait_until(lambda: a.state is State.STANDBY, message="disconnected without a renewed lease")
            assert client.stopped.is_set()
            held_up, status = a.readiness(), a.status()
        assert not held_up.ready and "another instance" not in (held_up.reason or ""), held_up
        assert "could not renew its lease" in (held_up.reason or ""), held_up
        assert status.standby_cause == "not_renewed"
        # Its own lease, given up, may still be in the database for a moment: never "another instance".
        reasons: list[str] = []
        while a.state is not State.CONNECTED:
            reasons.append(a.readiness().reason or "")
            wait_until(lambda: a.state is State.CONNECTED or a.readiness().reason not in reasons, message="reconnected")
        assert not [r for r in reasons if "another instance" in r], reasons
        assert db.lease("default").owner_id == "host-a"
    finally:
        a.stop()


def test_a_crashed_owner_is_replaced_after_its_lease_expires(
    db: Database, whatsmeow_template: Path, tmp_path: Path
) -> None:
    a, network_a = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    b, network_b = owner(db, whatsmeow_template, tmp_path / "b", "host-b")
    try:
        paired(a, network_a, db)
        b.start()
        wait_until(lambda: b.state is State.STANDBY)
        _freeze(a)  # a "crash": no renewals, no shutdown, no release
        started = time.monotonic()
        wait_until(lambda: b.state is State.CONNECTED, timeout=15, message="b took over after expiry")
        assert time.monotonic() - started >= 1.0  # waited for the lease to run out
        assert b.status().fencing_token == 2
        assert network_b.clients and all(not c.qr_codes for c in network_b.clients)  # restored, no QR
    finally:
        b.stop()


def test_a_stale_owner_is_fenced_out_and_demotes_itself(db: Database, whatsmeow_template: Path, tmp_path: Path) -> None:
    a, network = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    try:
        paired(a, network, db)
        before = stored(db)
        # The lease ran out while the owner was paused, and someone else took it: in one step, so
        # that the owner (demoted by its next renewal) cannot take it back first.
        with db.transaction() as tx:
            tx.execute(
                "UPDATE whatsapp_session_leases SET owner_id = 'host-b', fencing_token = fencing_token + 1,"
                " expires_at = expires_at + 3600"
            )
        client = network.current()
        client.write_store(rows=4)  # the mirror sees these at once and tries to write them, fenced

        wait_until(lambda: a.state is State.STANDBY, message="demoted")
        assert a.backup_now("stale") is None
        assert not a.status().owns_session
        # The fenced mirror write or the lease renewal may notice first; either way the reason is given.
        assert "another instance owns the session" in a.status().last_error
        wait_until(client.stopped.is_set, message="client stopped")
        wait_until(lambda: not a.status().mirror_running, message="the mirror stopped")
        supervisor = a._supervisor
        wait_until(lambda: not supervisor.is_alive(), message="the supervisor gave up the session")
        assert stored(db) == before  # not one of the 4 rows, no head, no snapshot
    finally:
        a.stop()
    assert stored(db) == before  # nor at shutdown
    assert len(network.clients) == 1  # it never reconnected
    assert db.lease("default").owner_id == "host-b"  # stopping did not release someone else's lease


def test_owner_disconnects_before_its_lease_can_expire_when_the_database_is_gone(
    whatsmeow_template: Path, tmp_path: Path
) -> None:
    cluster = PostgresCluster().start()
    db = PostgresDatabase(cluster.create_database(), connect_timeout=2)
    db.open()
    db.acquire_lease = attempts = Calls(db.acquire_lease)  # (the lease keeper calls db.acquire_lease)
    a, network = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    try:
        paired(a, network, db)
        client = network.current()
        cluster.stop_server()
        lost_at = time.monotonic()

        wait_until(client.stopped.is_set, timeout=10, message="disconnect while the DB is unreachable")
        assert time.monotonic() - lost_at < 3  # the lease TTL: nobody else could have taken it yet
        assert a.state is State.STANDBY
        # What could reconnect: the round's supervisor (it must end, its lease gone) and the lease
        # keeper's attempts to take the lease back (each fails after the pool's 10 s wait).
        supervisor = a._supervisor
        attempts.mark()
        wait_until(lambda: supervisor is None or not supervisor.is_alive(), message="the supervisor gave up")
        attempts.wait(message="an attempt to take the lease back", timeout=60)
        assert len(network.clients) == 1  # no reconnect without a lease

        cluster.start_server()
        wait_until(lambda: a.state is State.CONNECTED, timeout=20, message="re-acquired and reconnected")
        # A new lease, never the old token (on a slow machine the first new lease can run out while
        # it is being taken, counted from before the call, and the next one is taken: 3, also right).
        assert a.status().fencing_token >= 2
        assert len(network.clients) >= 2
    finally:
        a.stop()
        db.close()
        cluster.stop()


def test_a_take_over_that_ends_just_past_the_fresh_window_still_connects(
    db: Database, whatsmeow_template: Path, tmp_path: Path
) -> None:
    """Renewals wait while a take-over restores the session (a big one, a slow database, a busy
    machine), and the supervisor never connects on a lease that may have run out. A take-over that
    ended just past the fresh window (ttl - renew), before the watchdog looked, left the session
    owned and never connected: the supervisor saw a stale lease and ended, the renewal came next."""
    a, _network = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    slowed = threading.Event()

    def restore_slowly() -> None:  # once: outlast the fresh window, by as little as possible
        if not slowed.is_set():
            slowed.set()
            wait_until(lambda: not a._lease.fresh(), timeout=10, message="the lease past its fresh window")

    a.take_over_listeners.append(restore_slowly)
    try:
        a.start()
        wait_until(lambda: a.state is State.QR, message="connected, showing the QR")
        assert slowed.is_set()
        assert a.status().owns_session
    finally:
        a.stop()


def _freeze(runtime: Runtime) -> None:
    """Stop a runtime's lease renewals and backups as a SIGKILL would, leaving its lease to expire."""
    runtime._stopping.set()
    runtime._lease.stop()
    runtime._scheduler.shutdown(wait=False)
    runtime._stop_client()


def test_a_standby_daemons_api_cannot_write_the_session(db: Database, whatsmeow_template: Path, tmp_path: Path) -> None:
    from bot.session.persistence import export_document
    from session_api import create_app

    a, network_a = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    b, _ = owner(db, whatsmeow_template, tmp_path / "b", "host-b")
    b_config_token = {"Authorization": "Bearer " + "t" * 20}
    try:
        paired(a, network_a, db)
        b.start()
        wait_until(lambda: b.state is State.STANDBY)
        before = stored(db)
        document = export_document(db, "default")[1]  # a valid, whole document
        api = create_app(b, db).test_client()

        imported = api.post("/api/session/backup", json={"session_data": document}, headers=b_config_token)
        deleted = api.delete("/api/session/delete", headers=b_config_token)
        restored = api.post("/api/session/restore", json={}, headers=b_config_token)

        assert (imported.status_code, deleted.status_code, restored.status_code) == (409, 409, 409)
        assert "does not own" in imported.get_json()["message"]
        assert stored(db) == before
        assert api.get("/healthz").status_code == 200
    finally:
        a.stop()
        b.stop()
