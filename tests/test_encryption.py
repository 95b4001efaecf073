"""Credentials encrypted at rest (SESSION_ENCRYPTION_KEY): nothing of the keys in any stored byte,
round trips through restore and rotation, a wrong key refused at boot, moved ciphertexts detected."""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bot.session import persistence
from bot.process.config import Config
from bot.process.errors import ConfigError
from bot.session.persistence import prepare_local_store, snapshot_to_history, sync_session
from bot.process.errors import StoredSessionUnreadable, UnreadableCredentials
from bot.session.sealing import Sealer, key_id_of
from bot.session.state import State
from bot.session.store_worker import restore_store
from database import Database, PostgresDatabase, SqliteDatabase
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, make_config
from tests.synthetic import DEVICE_JID, create_paired_store, table_rows
from tests.tamper import contacts_stored, corrupt_events, flip_a_ciphertext_byte

ROOT = Path(__file__).resolve().parent.parent
KEY_A, KEY_B = os.urandom(32), os.urandom(32)
ANA = "5511912345678@s.whatsapp.net"
SECRET_COLUMNS = {  # what whoever holds these can impersonate the number with
    "whatsmeow_device": ("noise_key", "identity_key", "signed_pre_key", "adv_key"),
    "whatsmeow_pre_keys": ("key",),
    "whatsmeow_sessions": ("session",),
    "whatsmeow_sender_keys": ("sender_key",),
    "whatsmeow_app_state_sync_keys": ("key_data",),
}

OpenDb = Callable[..., Database]


@pytest.fixture
def open_db(db: Database, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OpenDb]:
    """Databases of the same back-end as ``db``: a new one, or ``same=`` one again with other keys."""
    made: list[Database] = []

    def make(sealer: Sealer | None = None, same: Database | None = None) -> Database:
        if isinstance(db, PostgresDatabase):
            url = same._url if same is not None else request.getfixturevalue("pg_cluster").create_database()
            database: Database = PostgresDatabase(url, sealer=sealer)
        else:
            path = same.path if same is not None else tmp_path / f"zapkeep-{len(made)}.sqlite3"
            database = SqliteDatabase(path, sealer=sealer)
        database.open()
        made.append(database)
        return database

    yield make
    for database in made:
        database.close()


def key_material(store: Path) -> list[bytes]:
    conn = sqlite3.connect(store)
    try:
        return [
            value
            for table, columns in SECRET_COLUMNS.items()
            for row in conn.execute(f"SELECT {', '.join(columns)} FROM {table}")
            for value in row
        ]
    finally:
        conn.close()


def forms(secret: bytes) -> list[bytes]:
    """The secret raw, in hex, and in base64 at each of the three alignments it can have inside a
    longer base64 text (a 24-byte chunk from offset 0, 1 and 2)."""
    chunks = [secret[offset : offset + 24] for offset in range(3)]
    found = [secret[:24], secret[:24].hex().encode(), secret[:24].hex().upper().encode()]
    for chunk in chunks:
        found += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return found


def everything_stored(db: Database, *, files: bool = True) -> bytes:
    """Every row of every table as text; on SQLite (``files``) also every byte of the file and its WAL."""
    if isinstance(db, PostgresDatabase):
        tables = "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'"
        as_text = 'SELECT CAST(x AS TEXT) AS t FROM "{}" x'
    else:
        tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
        as_text = 'SELECT * FROM "{}"'
    dump: list[str] = []
    with db.transaction() as tx:
        for table in [row["name"] for row in tx.execute(tables).fetchall()]:
            dump += [repr(row) for row in tx.execute(as_text.format(table)).fetchall()]
    stored = "\n".join(dump).encode()
    if files and isinstance(db, SqliteDatabase):
        wal = db.path.with_name(db.path.name + "-wal")
        stored += db.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    return stored


def leaks(haystack: bytes, secrets: list[bytes]) -> int:
    return sum(1 for secret in secrets if any(form in haystack for form in forms(secret)))


def paired_session(db: Database, tmp_path: Path, session_id: str = "default", seed: int = 1) -> Path:
    store = tmp_path / session_id / "whatsmeow.sqlite3"
    create_paired_store(store, seed=seed)
    assert sync_session(db, session_id, store).paired
    assert snapshot_to_history(db, session_id, None, "test") is not None
    return store


def restored_rows(db: Database, tmp_path: Path, session_id: str = "default") -> dict:
    _, text = persistence.current_document(db, session_id)
    target = tmp_path / "restored" / session_id / "whatsmeow.sqlite3"
    restore_store(text, target, lineage="test", sequence=0)
    return table_rows(target)


def test_no_stored_byte_holds_key_material(db: Database, open_db: OpenDb, tmp_path: Path) -> None:
    store = paired_session(db, tmp_path / "clear")
    secrets = key_material(store)
    assert len(secrets) == 1 * 4 + 20 + 10 + 3 + 2  # the SMALL synthetic store
    # The check finds them where they are in clear: without a key, every one of them is stored.
    assert leaks(everything_stored(db), secrets) == len(secrets)

    sealed = open_db(Sealer(KEY_A))
    store = paired_session(sealed, tmp_path / "sealed")
    secrets = key_material(store)
    _, document = persistence.export_document(sealed, "default")
    export = Sealer(KEY_A).seal_export(document, "default")

    assert leaks(everything_stored(sealed), secrets) == 0
    assert leaks(export.encode(), secrets) == 0
    assert leaks(document.encode(), secrets) == len(secrets)  # (what --clear / ?clear=true gives)
    assert sealed.key_ids("default") == {key_id_of(KEY_A)}
    # What the status shows stays readable without the key.
    record = open_db(same=sealed).load_session("default")
    assert record is not None and record.device_jid is not None and record.push_name == "Padaria Zapkeep"


def test_restore_and_rotation_round_trip(db: Database, open_db: OpenDb, tmp_path: Path) -> None:
    under_a = open_db(Sealer(KEY_A))
    store = paired_session(under_a, tmp_path)
    original = table_rows(store)
    assert restored_rows(under_a, tmp_path / "a") == original
    history = under_a.load_history_version("default", 1)
    assert history is not None and "whatsmeow_device" in history.session_data

    rotating = open_db(Sealer(KEY_B, [KEY_A]), same=under_a)  # the new key, the old one still readable
    assert restored_rows(rotating, tmp_path / "mixed") == original
    count = rotating.reseal("default")
    assert (count.rows, count.snapshots) == (sum(len(rows) for rows in original.values()), 1)
    assert rotating.key_ids("default") == {key_id_of(KEY_B)}
    assert rotating.reseal("default") == type(count)(0, 0)  # nothing left to move

    only_b = open_db(Sealer(KEY_B), same=under_a)  # the old key can go now
    assert restored_rows(only_b, tmp_path / "b") == original
    with pytest.raises(UnreadableCredentials, match="key k"):
        open_db(Sealer(KEY_A), same=under_a).load_rows("default")

    decrypting = open_db(Sealer(None, [KEY_B]), same=under_a)  # turning encryption off is a rekey too
    decrypting.reseal("default")
    assert decrypting.key_ids("default") == {None}
    assert restored_rows(open_db(same=under_a), tmp_path / "clear") == original


def test_rows_moved_between_sessions_or_rows_are_detected(db: Database, open_db: OpenDb, tmp_path: Path) -> None:
    sealed = open_db(Sealer(KEY_A))
    mine = paired_session(sealed, tmp_path, "default", seed=1)
    paired_session(sealed, tmp_path, "other", seed=2)  # another number's session, same key, same row keys
    original = table_rows(mine)

    with sealed.transaction() as tx:  # an attacker with write access copies the other session's keys over
        tx.execute(
            """UPDATE whatsapp_session_rows SET row_data = (SELECT o.row_data FROM whatsapp_session_rows o
                   WHERE o.session_id = 'other' AND o.table_name = whatsapp_session_rows.table_name
                   AND o.row_key = whatsapp_session_rows.row_key)
               WHERE session_id = 'default' AND table_name = 'whatsmeow_device'"""
        )
    with pytest.raises(UnreadableCredentials, match=r"table whatsmeow_device row .* does not decrypt"):
        persistence.current_document(sealed, "default")

    # The boot refuses the tampered rows and rolls nothing back (only an operator restores history).
    local = tmp_path / "boot" / "whatsmeow.sqlite3"
    before = everything_stored(sealed, files=False)
    with pytest.raises(StoredSessionUnreadable, match="1 stored rows do not open") as refused:
        prepare_local_store(sealed, "default", local)
    assert refused.value.tables == {"whatsmeow_device": 1}
    assert not local.exists() and everything_stored(sealed, files=False) == before
    restored = tmp_path / "history" / "whatsmeow.sqlite3"
    persistence.restore_record(sealed, sealed.load_history_version("default", 1), restored)
    assert table_rows(restored) == original

    with sealed.transaction() as tx:  # two rows of one session swapped: also detected
        rows = tx.execute(
            "SELECT row_key, CAST(row_data AS TEXT) AS row_data FROM whatsapp_session_rows WHERE session_id = 'default'"
            " AND table_name = 'whatsmeow_pre_keys' ORDER BY row_key LIMIT 2"
        ).fetchall()
        for row, other in ((rows[0], rows[1]), (rows[1], rows[0])):
            tx.execute(
                "UPDATE whatsapp_session_rows SET row_data = %s WHERE session_id = 'default'"
                " AND table_name = 'whatsmeow_pre_keys' AND row_key = %s",
                (sealed.json_param(other["row_data"]), row["row_key"]),
            )
    with pytest.raises(UnreadableCredentials, match="table whatsmeow_pre_keys row"):
        persistence.current_document(sealed, "default")


def test_plaintext_is_encrypted_by_the_first_boot_with_a_key(
    db: Database, open_db: OpenDb, network: FakeWhatsApp, tmp_path: Path
) -> None:
    from bot.wiring import build_runtime

    store = paired_session(db, tmp_path / "before")
    original = table_rows(store)
    assert db.key_ids("default") == {None}
    config = make_config(tmp_path, SESSION_ENCRYPTION_KEY=base64.b64encode(KEY_A).decode())
    sealed = open_db(Sealer.from_config(config), same=db)
    runtime = build_runtime(config, sealed, network.factory, timing=FAST)
    try:
        runtime.start()
        wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
        assert sealed.key_ids("default") == {key_id_of(KEY_A)}
        assert table_rows(config.store_path) == original
    finally:
        runtime.stop()
    # Every live row is sealed now. (The clear versions it replaced linger in free pages and the WAL
    # until they are reused or vacuumed: docs/design.md says to VACUUM after turning encryption on.)
    assert leaks(everything_stored(sealed, files=False), key_material(store)) == 0


def _daemon(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *env.pop("ARGS", "run").split()],
        cwd=ROOT,
        env={**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "PORT": "18097", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_wrong_or_missing_key_stops_the_boot_and_changes_nothing(database_url: str, tmp_path: Path) -> None:
    stored = PostgresDatabase(database_url, sealer=Sealer(KEY_A))
    stored.open()
    try:
        paired_session(stored, tmp_path / "first")
        local = tmp_path / "data" / "sessions" / "default" / "whatsmeow.sqlite3"
        restore_store(persistence.current_document(stored, "default")[1], local, lineage="old", sequence=0)
        before_db, before_store = everything_stored(stored), local.read_bytes()
        env = {"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path / "data"), "API_TOKEN": "t" * 32}

        for keys in ({"SESSION_ENCRYPTION_KEY": base64.b64encode(KEY_B).decode()}, {}):
            result = _daemon({**env, **keys})
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and f"encrypted with key {key_id_of(KEY_A)}" in lines[0], result.stderr
            assert "SESSION_ENCRYPTION_KEY" in lines[0]
            assert everything_stored(stored) == before_db
            assert local.read_bytes() == before_store

        # Rotation from the command line: the new key current, the old one readable; then export and import.
        rotate = {**env, "SESSION_ENCRYPTION_KEY": base64.b64encode(KEY_B).decode()}
        rotate["SESSION_ENCRYPTION_KEY_OLD"] = base64.b64encode(KEY_A).decode()
        rekey = _daemon({**rotate, "ARGS": "rekey"})
        assert rekey.returncode == 0 and "history snapshots moved to key " + key_id_of(KEY_B) in rekey.stdout
        assert stored.key_ids("default") == {key_id_of(KEY_B)}
        export = tmp_path / "export.json"
        only_b = {**env, "SESSION_ENCRYPTION_KEY": base64.b64encode(KEY_B).decode()}
        assert _daemon({**only_b, "ARGS": f"export {export}"}).returncode == 0
        assert '"format": "zapkeep.sealed-session"' in export.read_text()
        assert leaks(export.read_bytes(), key_material(local)) == 0
        imported = _daemon({**only_b, "ARGS": f"import {export}"})
        assert imported.returncode == 0, imported.stderr
        clear = tmp_path / "clear.json"
        assert _daemon({**only_b, "ARGS": f"export --clear {clear}"}).returncode == 0
        assert leaks(clear.read_bytes(), key_material(local)) > 0
    finally:
        stored.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not base64!", "SESSION_ENCRYPTION_KEY is not base64"),
        (base64.b64encode(b"sixteen byte key").decode(), "SESSION_ENCRYPTION_KEY must be 32 bytes in base64, got 16"),
    ],
)
def test_a_malformed_key_is_a_config_error_that_does_not_repeat_it(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        Config.from_env({"SESSION_ENCRYPTION_KEY": value})
    assert value not in str(caught.value)
    with pytest.raises(ConfigError, match="SESSION_ENCRYPTION_KEY_OLD"):
        Config.from_env({"SESSION_ENCRYPTION_KEY_OLD": f"{base64.b64encode(KEY_A).decode()}, {value}"})
    config = Config.from_env({"SESSION_ENCRYPTION_KEY": base64.urlsafe_b64encode(KEY_A).decode().rstrip("=")})
    assert config.session_encryption_key == KEY_A
    assert base64.b64encode(KEY_A).decode() not in repr(config)


def test_the_api_exports_sealed_unless_asked_and_imports_a_sealed_export(
    db: Database, open_db: OpenDb, network: FakeWhatsApp, tmp_path: Path
) -> None:
    from bot.wiring import build_runtime
    from session_api import create_app

    config = make_config(tmp_path, API_TOKEN="t" * 32, SESSION_ENCRYPTION_KEY=base64.b64encode(KEY_A).decode())
    sealed = open_db(Sealer.from_config(config))
    store = paired_session(sealed, tmp_path, "shop")
    client = create_app(build_runtime(config, sealed, network.factory, timing=FAST), sealed).test_client()
    headers = {"Authorization": "Bearer " + "t" * 32}

    export = client.get("/api/session/restore?session_id=shop", headers=headers)
    assert export.status_code == 200
    body = export.get_json()["session_data"]
    assert (body["format"], body["session_id"], body["key_id"]) == ("zapkeep.sealed-session", "shop", key_id_of(KEY_A))
    assert leaks(export.data, key_material(store)) == 0
    clear = client.get("/api/session/restore?session_id=shop&clear=true", headers=headers)
    assert clear.get_json()["session_data"]["format"] == "zapkeep.session"

    imported = client.post("/api/session/backup", json={"session_id": "copy", "session_data": body}, headers=headers)
    assert imported.status_code == 201, imported.get_json()
    assert restored_rows(sealed, tmp_path / "copy", "copy") == table_rows(store)
    body["sealed"] = body["sealed"][:-8] + "AAAAAAA="  # a flipped byte of the ciphertext
    tampered = client.post("/api/session/backup", json={"session_id": "copy", "session_data": body}, headers=headers)
    assert tampered.status_code == 400 and "does not decrypt" in tampered.get_json()["message"]


def test_an_instance_without_the_key_never_takes_over_the_session(
    db: Database, open_db: OpenDb, network: FakeWhatsApp, tmp_path: Path
) -> None:
    """A standby started with the old configuration (no key) while the stored session moved to a
    key: at take-over it must neither restore an older snapshot nor write; it gives the lease up."""
    from bot.wiring import build_runtime

    sealed = open_db(Sealer(KEY_A))
    paired_session(sealed, tmp_path / "stored")
    before = everything_stored(sealed, files=False)
    config = make_config(tmp_path)  # no SESSION_ENCRYPTION_KEY
    runtime = build_runtime(config, open_db(same=sealed), network.factory, timing=FAST)
    try:
        runtime.start()
        wait_until(lambda: "encrypted with key" in (runtime.status().last_error or ""), message="refused")
        # (It tries again now and then, each time refused: standby, or starting for a moment, never more.)
        assert runtime.state in (State.STANDBY, State.STARTING)
        assert not config.store_path.exists() and network.clients == []  # nothing restored, never connected
    finally:
        runtime.stop()
    lease = sealed.lease("default")
    assert lease is not None and lease.owner_id is None  # handed back at once: an instance with the key may take it
    assert sealed.key_ids("default") == {key_id_of(KEY_A)}
    after = everything_stored(sealed, files=False)
    assert after.count(b"zk1:") == before.count(b"zk1:")  # nothing restored, rolled back or re-sealed


def test_a_received_files_download_reference_is_sealed_too(db: Database, open_db: OpenDb) -> None:
    """It holds the media key that decrypts the file on WhatsApp's servers."""
    from datetime import UTC, datetime

    from database import Inbound, InboundOutcome

    sealed = open_db(Sealer(KEY_A))
    reference = base64.b64encode(b"media-key:" + KEY_B).decode()  # (any secret will do)
    inbound = Inbound(
        "default", ANA, ANA, "3EB0FILE", "olha", datetime.now(UTC), "image", "image/jpeg", 10, None, reference
    )
    sealed.record_inbound(inbound, lambda chat: InboundOutcome("ignored", "test"))
    (logged,) = sealed.list_messages("default")
    assert sealed.media_ref("default", logged.id).media == reference
    assert reference.encode() not in everything_stored(sealed)
    assert sealed.key_ids("default") == {key_id_of(KEY_A)}

    rotated = open_db(Sealer(KEY_B, [KEY_A]), same=sealed)
    assert rotated.reseal("default").media == 1
    assert open_db(Sealer(KEY_B), same=sealed).media_ref("default", logged.id).media == reference


class ContactWriter:
    """Writes contacts into a daemon's live store, one transaction each, as whatsmeow would, until
    stopped; ``prefix`` may change while it runs (contacts written after a moment are told apart)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.prefix = "55319"
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contact-writer", daemon=True)

    def __enter__(self) -> ContactWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        conn = sqlite3.connect(self.store, timeout=30)
        try:
            while not self._stop.wait(0.01):
                with conn:
                    conn.execute(
                        "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
                        (DEVICE_JID, f"{self.prefix}{self.written:08d}@s.whatsapp.net", f"Contato {self.written}"),
                    )
                self.written += 1
        finally:
            conn.close()


def test_rekey_beside_a_daemon_with_the_old_key_leaves_nothing_under_it(
    db: Database, open_db: OpenDb, tmp_path: Path
) -> None:
    """A real daemon (the loopback WhatsApp) runs with key A while its store keeps changing, and
    ``python -m bot rekey`` moves the session to key B. Either rekey says what it could not move
    (non-zero), or nothing is left under A: the daemon stops writing under a key it no longer
    holds, at its very next write after the rekey moved the session (issue 23, item 10)."""
    from tests.fake_network import FakeServer
    from tests.redeploy import Daemon

    key_a, key_b = base64.b64encode(KEY_A).decode(), base64.b64encode(KEY_B).decode()
    if isinstance(db, PostgresDatabase):
        url, data_dir = db._url, tmp_path / "host"
    else:  # the daemon's embedded database is the test's: DATA_DIR/zapkeep.sqlite3
        url, data_dir = "", db.path.parent
    server = FakeServer()
    # One number per service: refused for the key, it keeps the session's parts and retries in place
    # (a replica sharing every session would set them aside between its attempts).
    env = {"SESSION_ENCRYPTION_KEY": key_a, "BACKUP_INTERVAL_SECONDS": "3600", "SESSION_ID": "default"}
    daemon = Daemon(data_dir, url, command=[sys.executable, "-m", "tests.fake_daemon", server.address], env=env)
    sealed = open_db(Sealer(KEY_B, [KEY_A]), same=db)
    try:
        create_paired_store(daemon.store)
        daemon.start()
        wait_until(lambda: daemon.status()["state"] == "connected", timeout=60, message="the daemon connected")
        with ContactWriter(daemon.store) as writer:
            wait_until(lambda: contacts_stored(sealed, "55319") > 20, timeout=30, message="contacts mirrored")
            rotate = {"DATABASE_URL": url, "DATA_DIR": str(data_dir), "SESSION_ENCRYPTION_KEY": key_b}
            rekey = _daemon({**rotate, "SESSION_ENCRYPTION_KEY_OLD": key_a, "ARGS": "rekey"})
            writer.prefix = "55318"  # written once the rekey has ended
            # The daemon's next batch either lands (under A) or finds the session moved and stops.
            wait_until(
                lambda: contacts_stored(sealed, "55318") > 0 or not daemon.status()["owns_session"],
                timeout=60,
                message="the daemon's next batch after the rekey",
            )
            after = writer.written
            wait_until(lambda: writer.written > after + 20, message="the store kept changing")
        # It hands the session back, and each take-over it retries is refused for the key (owning
        # it for a moment each time: waited for, not read once).
        wait_until(
            lambda: not daemon.status()["owns_session"] and "key" in (daemon.status()["last_error"] or ""),
            message="the daemon refused for the key",
        )
    finally:
        daemon.stop_if_running()
        server.close()
    left = sealed.key_ids("default") - {key_id_of(KEY_B)}
    assert rekey.returncode != 0 or not left, f"rekey exited 0 and left payloads under {left}"
    assert rekey.returncode == 0, rekey.stderr  # (with the daemon fenced off by the move, nothing is left)
    assert left == set()
    assert contacts_stored(sealed, "55318") == 0  # not one row written under the old key after the rekey


def test_a_stored_row_that_does_not_open_is_found_reported_and_repaired_by_its_owner(
    db: Database, open_db: OpenDb, network: FakeWhatsApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, item 3: one flipped ciphertext byte in the database while the owner runs. The next
    reconciliation (here: a backup asked over the API) opens what is stored, finds the row, says
    so (status, event, metric) and rewrites it from the local store. Found once, repaired once."""
    from bot.wiring import build_runtime

    config = make_config(tmp_path, SESSION_ENCRYPTION_KEY=base64.b64encode(KEY_A).decode())
    sealed = open_db(Sealer.from_config(config), same=db)
    paired_session(sealed, tmp_path / "before")
    # The flip comes after the mirror's first reconciliation (waited for), before the backup's.
    runtime = build_runtime(config, sealed, network.factory, timing=replace(FAST, after_connect_seconds=3600))
    try:
        runtime.start()
        wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
        wait_until(lambda: runtime.status().last_reconcile_at is not None, message="the first reconciliation")
        flip_a_ciphertext_byte(sealed)
        with pytest.raises(UnreadableCredentials):
            persistence.current_document(sealed, "default")
        assert runtime.backup_now("api") is not None  # (its reconciliation, or one just before it, finds it)
        status = runtime.status()
        metrics = runtime.metrics.exposition().decode()
        local = table_rows(config.store_path)
    finally:
        runtime.stop()
    assert status.unreadable_rows == 1 and status.last_unreadable_at is not None
    # (last_reconcile_result said so until the next reconciliation; these stay.)
    assert "1 stored rows did not open (altered or corrupt: whatsmeow_pre_keys 1); rewritten" in caplog.text
    assert 'zapkeep_stored_rows_unreadable_total{session_id="default"} 1.0' in metrics
    assert corrupt_events(sealed) == [
        {
            "unreadable_rows": 1,
            "tables": {"whatsmeow_pre_keys": 1},
            "repaired": True,
            "action": "rewritten from the local store",
        }
    ]
    assert restored_rows(sealed, tmp_path / "after") == local  # what is stored opens, and is the store


def test_a_new_host_never_rolls_back_over_stored_rows_that_do_not_open(
    db: Database, open_db: OpenDb, network: FakeWhatsApp, tmp_path: Path
) -> None:
    """Issue 23, item 3: the owner is gone (kill -9) with a tampered row stored, and 20 rows were
    mirrored after the last history snapshot. A new host must not restore that snapshot and drop
    them: it stays off WhatsApp, says why in the status and /readyz (503, the remedy), changes
    nothing, and rolls back only when an operator restores a history version."""
    from bot.wiring import build_runtime
    from session_api import create_app

    config = make_config(
        tmp_path / "new-host", API_TOKEN="t" * 32, SESSION_ENCRYPTION_KEY=base64.b64encode(KEY_A).decode()
    )
    sealed = open_db(Sealer.from_config(config), same=db)
    store = paired_session(sealed, tmp_path / "old-host")  # history version 1
    conn = sqlite3.connect(store)
    with conn:
        conn.executemany(
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
            [(DEVICE_JID, f"55319{n:08d}@s.whatsapp.net", f"Contato {n}") for n in range(20)],
        )
    conn.close()
    assert sync_session(sealed, "default", store).written_rows == 20
    flip_a_ciphertext_byte(sealed)
    before, history = everything_stored(sealed, files=False), sealed.list_history("default")
    rows_before = contacts_stored(sealed, "55319")

    runtime = build_runtime(config, sealed, network.factory, timing=FAST)
    client = create_app(runtime, sealed).test_client()
    try:
        runtime.start()
        wait_until(lambda: runtime.state is State.RESTORE_NEEDED, message="restore_needed")
        ready = client.get("/readyz")
        status = runtime.status()
        assert ready.status_code == 503 and ready.get_json()["state"] == "restore_needed"
        assert (
            "does not open" in ready.get_json()["reason"] and "POST /api/session/restore" in ready.get_json()["reason"]
        )
        assert "1 stored rows do not open" in (status.boot_error or "") and status.unreadable_rows == 1
        assert status.phone is not None  # the stored head still says which number it is
        assert network.clients == [] and not config.store_path.exists()  # never connected, nothing restored
        assert corrupt_events(sealed) == [
            {
                "unreadable_rows": 1,
                "tables": {"whatsmeow_pre_keys": 1},
                "repaired": False,
                "action": "refused at boot: nothing rolled back; an operator restores a history version or imports",
            }
        ]
        events = [e for e in sealed.events_after("default", 0) if e.event_type == "session.corrupt"]
        assert events  # (a webhook event like the others: WEBHOOK_EVENTS knows it)
        assert contacts_stored(sealed, "55319") == rows_before == 20  # not one mirrored row dropped
        assert sealed.list_history("default") == history
        assert everything_stored(sealed, files=False).count(b"zk1:") == before.count(b"zk1:")

        # The operator's explicit roll-back to history version 1 is the one way back.
        headers = {"Authorization": "Bearer " + "t" * 32}
        restored = client.post("/api/session/restore", json={"version": history[0].version}, headers=headers)
        assert restored.status_code == 200, restored.get_json()
        wait_until(lambda: runtime.state is State.CONNECTED, message="connected after the restore")
        assert client.get("/readyz").status_code == 200 and runtime.status().boot_error is None
    finally:
        runtime.stop()
    assert contacts_stored(sealed, "55319") == 0  # (what version 1 held: the operator chose it)


def test_a_row_stored_in_clear_whose_content_is_not_its_hash_is_not_rolled_back_over_either(
    db: Database, tmp_path: Path
) -> None:
    """Without a key, "does not open" is a row whose content is not what its hash says."""
    paired_session(db, tmp_path / "old-host")
    with db.transaction() as tx:
        tx.execute(
            "UPDATE whatsapp_session_rows SET row_data = %s WHERE table_name = %s",
            (db.json_param('["tampered"]'), "whatsmeow_device"),
        )
    before = everything_stored(db, files=False)
    local = tmp_path / "new-host" / "whatsmeow.sqlite3"
    with pytest.raises(StoredSessionUnreadable, match="nothing was rolled back") as refused:
        prepare_local_store(db, "default", local)
    assert refused.value.tables == {"whatsmeow_device": 1}
    assert not local.exists() and everything_stored(db, files=False) == before
