"""Never older over newer: a database outage and an admin's restore followed by a crash lose nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from database import Database, PostgresDatabase
from tests.fake_whatsapp import wait_until
from tests.pg_cluster import PostgresCluster
from tests.test_ownership import _freeze as freeze
from tests.test_mirror import stored_rows
from tests.test_ownership import LONG_LEASE, owner, paired
from tests.synthetic import table_rows
from bot.session.state import State


def contact_count(rows: dict[str, list[tuple]]) -> int:
    return len(rows["whatsmeow_contacts"])


def test_changes_made_while_postgresql_is_down_are_stored_once_it_is_back(
    whatsmeow_template: Path, tmp_path: Path
) -> None:
    cluster = PostgresCluster().start()
    db = PostgresDatabase(cluster.create_database(), connect_timeout=2, wait_timeout=2)
    db.open()
    runtime, network = owner(db, whatsmeow_template, tmp_path / "a", "host-a")
    store = runtime.config.store_path
    try:
        paired(runtime, network, db)
        wait_until(lambda: stored_rows(db) == table_rows(store), message="mirrored")
        client = network.current()

        cluster.stop_server()
        down_at = time.monotonic()
        client.write_store(rows=5)  # whatsmeow keeps writing (ratchets, contacts) while the DB is away
        wait_until(client.stopped.is_set, timeout=10, message="disconnected without a lease")
        assert contact_count(table_rows(store)) == 15
        time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))  # a 20 s outage
        cluster.start_server()

        wait_until(lambda: runtime.state is State.CONNECTED, timeout=30, message="owner again")
        wait_until(lambda: stored_rows(db) == table_rows(store), timeout=10, message="the outage's rows stored")
        assert contact_count(table_rows(store)) == 15  # kept, not restored over with the older stored rows
        assert all(not c.qr_codes for c in network.clients[1:])  # reconnected without pairing again
    finally:
        runtime.stop()
        db.close()
        cluster.stop()


def test_a_crash_right_after_an_admins_restore_boots_into_the_restored_version(
    db: Database, whatsmeow_template: Path, tmp_path: Path
) -> None:
    a, network_a = owner(db, whatsmeow_template, tmp_path / "a", "host-a", LONG_LEASE)
    b = c = None
    try:
        paired(a, network_a, db)
        wait_until(lambda: db.list_history("default"), message="the snapshot after pairing")
        (paired_version,) = [h.version for h in db.list_history("default")]
        network_a.current().write_store(rows=6)
        wait_until(lambda: contact_count(stored_rows(db)) == 16, message="the newer rows mirrored")

        outcome = a.restore(paired_version)  # an admin rolls back to the state right after pairing
        assert outcome.version == paired_version
        freeze(a)  # kill -9 right after: no shutdown, no release
        with db.transaction() as tx:
            tx.execute("UPDATE whatsapp_session_leases SET expires_at = 0")

        # The same host restarting on its disk, and a new host with an empty one, both boot the restored version.
        b, network_b = owner(db, whatsmeow_template, tmp_path / "a", "host-a2", LONG_LEASE)
        b.start()
        wait_until(lambda: b.state is State.CONNECTED, timeout=15, message="restarted")
        assert contact_count(table_rows(b.config.store_path)) == 10
        b.stop()
        c, network_c = owner(db, whatsmeow_template, tmp_path / "c", "host-c", LONG_LEASE)
        c.start()
        wait_until(lambda: c.state is State.CONNECTED, timeout=15, message="new host")
        assert contact_count(table_rows(c.config.store_path)) == 10
        assert all(not client.qr_codes for client in network_b.clients + network_c.clients)
        # The state the restore replaced was kept in history, never made current.
        sizes = {h.version: db.load_history_version("default", h.version) for h in db.list_history("default")}
        counts = [json.loads(r.session_data)["metadata"]["row_counts"]["whatsmeow_contacts"] for r in sizes.values()]
        assert 16 in counts
    finally:
        for runtime in (a, b, c):
            if runtime is not None:
                runtime.stop()
