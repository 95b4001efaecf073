"""The operator commands, as an operator runs them: python -m bot <command>, against PostgreSQL."""

from __future__ import annotations

import base64
import http.client
import json
import sqlite3
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.session.persistence import sync_session
from bot.wiring import build_runtime
from database import Database, PostgresDatabase, SqliteDatabase
from session_api import create_app
from session_api.server import ApiServer
from tests.fake_whatsapp import FakeWhatsApp
from tests.runtime_helpers import make_config
from tests.synthetic import DEVICE_JID, DEVICE_USER, create_paired_store, table_rows

ROOT = Path(__file__).resolve().parent.parent


def bot(
    database_url: str, data_dir: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATA_DIR": str(data_dir),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_operator_commands_round_trip(database_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = data / "sessions" / "default" / "whatsmeow.sqlite3"
    assert bot(database_url, data, "backup").returncode == 1  # no local store yet: a clear failure
    create_paired_store(store)
    original = table_rows(store)

    backed_up = bot(database_url, data, "backup")
    assert backed_up.returncode == 0 and backed_up.stdout.startswith("written: session default, 77 rows written")
    assert "history version 1" in backed_up.stdout
    again = bot(database_url, data, "backup").stdout
    assert again.startswith("unchanged: session default, 0 rows written")

    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE whatsmeow_device SET push_name = 'Padaria Nova'")
    conn.close()
    status = json.loads(bot(database_url, data, "status").stdout)
    assert status["local_store"]["pending_changes"] == 1  # the change the database lacks
    assert bot(database_url, data, "backup").stdout.startswith("written: session default, 1 rows written")
    original = table_rows(store)

    status = json.loads(bot(database_url, data, "status").stdout)
    assert status["database"] == "postgresql"
    (session,) = status["sessions"]
    assert session["device_jid"] == DEVICE_JID and [h["version"] for h in session["history"]] == [2, 1]
    assert status["local_store"]["pending_changes"] == 0 and status["local_store"]["descends_from_stored"]

    export = tmp_path / "export.json"
    assert bot(database_url, data, "export", str(export)).returncode == 0
    assert export.stat().st_mode & 0o777 == 0o600
    assert json.loads(export.read_text())["metadata"]["device_jid"] == DEVICE_JID

    store.unlink()
    restored = bot(database_url, data, "restore")
    assert restored.returncode == 0, restored.stderr
    assert table_rows(store) == original

    assert bot(database_url, data, "delete").returncode == 0
    assert bot(database_url, data, "delete").returncode == 1
    assert json.loads(bot(database_url, data, "status").stdout)["sessions"] == []

    corrupt = {**json.loads(export.read_text()), "format_version": 9}
    refused = bot(database_url, data, "import", "-", stdin=json.dumps(corrupt))
    assert refused.returncode == 1 and "format version 9 is not supported" in refused.stderr
    imported = bot(database_url, data, "import", str(export))
    assert (
        imported.returncode == 0 and "imported session default as version 2" in imported.stdout
    )  # the export is history version 2
    assert bot(database_url, data, "restore", "--version", "1").returncode == 0


def test_writing_commands_refuse_while_a_live_daemon_owns_the_session(database_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = data / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store)
    assert bot(database_url, data, "backup").returncode == 0
    export = tmp_path / "export.json"
    assert bot(database_url, data, "export", str(export)).returncode == 0
    db = PostgresDatabase(database_url)
    db.open()
    try:
        assert db.acquire_lease("default", "host-a/deploy/42", ttl_seconds=60) is not None  # a live daemon
        before = db.load_session("default")
        for command in (["backup"], ["restore"], ["delete"], ["import", str(export)]):
            refused = bot(database_url, data, *command)
            assert refused.returncode == 1, command
            assert (
                "owned by the running daemon host-a/deploy/42" in refused.stderr and "Traceback" not in refused.stderr
            )
        assert db.load_session("default") == before
    finally:
        db.close()


def test_backup_refuses_a_store_that_does_not_descend_from_the_stored_session(
    database_url: str, tmp_path: Path
) -> None:
    first, other = tmp_path / "a", tmp_path / "b"
    create_paired_store(first / "sessions" / "default" / "whatsmeow.sqlite3")
    create_paired_store(other / "sessions" / "default" / "whatsmeow.sqlite3", seed=2)  # another host's copy
    assert bot(database_url, first, "backup").returncode == 0
    refused = bot(database_url, other, "backup")
    assert refused.returncode == 1 and "does not descend from the stored session" in refused.stderr


def test_everyday_mistakes_get_one_line_not_a_traceback(database_url: str, tmp_path: Path) -> None:
    missing = bot(database_url, tmp_path / "data", "import", str(tmp_path / "nao-existe.json"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert [line for line in missing.stderr.splitlines() if "cannot read" in line and "No such file" in line]

    huge = bot(database_url, tmp_path / "data", "restore", "-v", "99999999999999999999")
    assert huge.returncode == 2 and "Traceback" not in huge.stderr and "not a history version" in huge.stderr

    store = tmp_path / "data" / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store)
    assert bot(database_url, tmp_path / "data", "backup").returncode == 0
    nowhere = bot(database_url, tmp_path / "data", "export", str(tmp_path / "no-such-dir" / "s.json"))
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr and "cannot write" in nowhere.stderr
    shared = tmp_path / "shared.json"
    shared.write_text("old")
    shared.chmod(0o644)
    assert bot(database_url, tmp_path / "data", "export", str(shared)).returncode == 0
    assert shared.stat().st_mode & 0o777 == 0o600 and json.loads(shared.read_text())["format_version"] == 2

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PORT": str(port), "API_TOKEN": "cli-test-token-0123456789"}
        busy = bot(database_url, tmp_path / "data", "run", env=env)
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr[-2000:]
    assert f"cannot listen on PORT {port}" in busy.stderr


def test_ctrl_c_in_the_console_ends_it_quietly(tmp_path: Path) -> None:
    console = subprocess.Popen(
        [sys.executable, "-m", "bot", "console"],
        cwd=ROOT,
        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), "HTTPS_PROXY": "http://127.0.0.1:9"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a background job (nohup ... &, some CI runners) inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        console.stdin.write("oi\n")
        console.stdin.flush()
        while "bot> " not in (line := console.stdout.readline()):  # it answered, and waits for the next line
            assert line, "the console ended before answering"
        console.send_signal(signal.SIGINT)
        code = console.wait(timeout=20)  # stdin stays open: only the signal can end it
        err = console.stderr.read()
    finally:
        console.kill()
        console.wait()
        for pipe in (console.stdin, console.stdout, console.stderr):
            pipe.close()
    assert code == 130 and "Traceback" not in err, err


def _cli_env(db: Database, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """``bot()``'s database_url and environment for the back-end of ``db``."""
    if isinstance(db, PostgresDatabase):
        return db._url, {}
    return "", {"DATABASE_URL": ""}  # the embedded database in DATA_DIR, which is where ``db`` is


def test_every_export_form_imports_as_it_is(db: Database, network: FakeWhatsApp, tmp_path: Path) -> None:
    """What GET /api/session/restore answers (sealed, or ?clear=true) saved with curl, and what
    `export` writes (sealed, or --clear): each imports with `import FILE` unchanged."""
    key = base64.b64encode(os.urandom(32)).decode()
    store = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(store)
    assert sync_session(db, "shop", store).paired
    shop = db.load_session("shop")
    config = make_config(tmp_path, API_TOKEN="t" * 32, SESSION_ENCRYPTION_KEY=key)
    server = ApiServer(create_app(build_runtime(config, db, network.factory), db), "127.0.0.1", 0, threads=2)
    server.start()
    try:
        answers = {}
        for name, query in (("api-sealed", ""), ("api-clear", "&clear=true")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request(
                "GET", f"/api/session/restore?session_id=shop{query}", headers={"Authorization": "Bearer " + "t" * 32}
            )
            response = conn.getresponse()
            assert response.status == 200
            answers[name] = response.read()  # as `curl ... > file` saves it
            conn.close()
    finally:
        server.stop()
    assert json.loads(answers["api-sealed"])["session_data"]["format"] == "zapkeep.sealed-session"
    assert json.loads(answers["api-clear"])["session_data"]["format"] == "zapkeep.session"

    url, env = _cli_env(db, tmp_path)
    data = tmp_path  # the embedded database of ``db`` is DATA_DIR/zapkeep.sqlite3
    shop_env = {**env, "SESSION_ID": "shop", "SESSION_ENCRYPTION_KEY": key}
    for name, args in (("cli-sealed", []), ("cli-clear", ["--clear"])):
        exported = bot(url, data, "export", *args, str(tmp_path / f"{name}.json"), env=shop_env)
        assert exported.returncode == 0, exported.stderr
    for name, answer in answers.items():
        (tmp_path / f"{name}.json").write_bytes(answer)
    assert json.loads((tmp_path / "cli-sealed.json").read_text())["format"] == "zapkeep.sealed-session"

    for number, name in enumerate(("api-sealed", "api-clear", "cli-sealed", "cli-clear")):
        copy_env = {**env, "SESSION_ID": f"copy{number}", "SESSION_ENCRYPTION_KEY": key}
        imported = bot(url, data, "import", str(tmp_path / f"{name}.json"), env=copy_env)
        assert imported.returncode == 0, (name, imported.stderr)
        assert f"imported session copy{number} as version" in imported.stdout
        assert db.load_session(f"copy{number}").checksum == shop.checksum, name
        again = json.loads(bot(url, data, "export", "--clear", "-", env=copy_env).stdout)
        assert again["tables"] == json.loads((tmp_path / "cli-clear.json").read_text())["tables"], name

    help_text = bot(url, data, "import", "--help").stdout
    for form in ("export", "sealed", "GET /api/session/restore", "?clear=true", "session document"):
        assert form in " ".join(help_text.split()), form

    # A text nested deeper than Python's parser follows: one line, nothing stored.
    deep = tmp_path / "deep.json"
    for text in ("[" * 100_000 + "]" * 100_000, '{"success": true, "session_data": ' + "[" * 5000 + "]" * 5000 + "}"):
        deep.write_text(text)
        refused = bot(url, data, "import", str(deep), env={**env, "SESSION_ID": "deep"})
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert len(refused.stderr.strip().splitlines()) == 1 and "nested too deeply" in refused.stderr
    assert db.load_session("deep") is None


# --- many sessions in one database (issue 25) ------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Database]]:
    """DATABASE_URL for the commands ('': the embedded SQLite database in DATA_DIR) and the same
    database opened here."""
    if request.param == "postgresql":
        url = request.getfixturevalue("database_url")
        database: Database = PostgresDatabase(url)
    else:
        url = ""
        database = SqliteDatabase(tmp_path / "data" / "zapkeep.sqlite3")
    database.open()
    try:
        yield url, database
    finally:
        database.close()


def paired_store(data: Path, session_id: str, push_name: str, seed: int) -> Path:
    store = data / "sessions" / session_id / "whatsmeow.sqlite3"
    create_paired_store(store, seed=seed)
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE whatsmeow_device SET push_name = ?", (push_name,))
    conn.close()
    return store


def test_sessions_lists_every_session_and_each_command_acts_on_the_one_named(
    backend: tuple[str, Database], tmp_path: Path
) -> None:
    url, db = backend
    data = tmp_path / "data"
    stores = {"loja-a": paired_store(data, "loja-a", "Loja A", 1), "loja_b": paired_store(data, "loja_b", "Loja B", 2)}
    for session_id in stores:
        backed_up = bot(url, data, "backup", "--session", session_id)
        assert backed_up.returncode == 0 and backed_up.stdout.startswith(f"written: session {session_id},"), backed_up
    running = db.acquire_lease("loja_b", "host-b/deploy/7", ttl_seconds=60)  # a daemon runs loja_b
    assert running is not None
    db.register_session("nova")  # created over the API, never paired: not stored yet

    listed = bot(url, data, "sessions")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["SESSION", "STATE", "STORED", "PHONE", "DEVICE", "OWNER", "LAST", "SAVED"]
    assert [row.split()[:6] for row in rows] == [
        ["loja-a", "not_running", "yes", DEVICE_USER, DEVICE_JID, "-"],
        ["loja_b", "starting", "yes", DEVICE_USER, DEVICE_JID, "host-b/deploy/7"],
        ["nova", "not_running", "no", "-", "-", "-"],
    ]
    shown = json.loads(bot(url, data, "sessions", "--json").stdout)
    assert [(s["session_id"], s["stored"], s["push_name"], s["owner"]) for s in shown] == [
        ("loja-a", True, "Loja A", None),
        ("loja_b", True, "Loja B", "host-b/deploy/7"),
        ("nova", False, None, None),
    ]
    assert [bool(s["last_saved_at"]) for s in shown] == [True, True, False]

    exported = bot(url, data, "export", "--session", "loja_b", "-")
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    stored = db.load_session("loja_b")
    assert stored is not None and document["lineage"] == stored.lineage != db.load_session("loja-a").lineage
    assert document["metadata"]["push_name"] == "Loja B"

    # restore and delete: that session's store and rows, the other's untouched.
    assert db.release_lease(running)  # (its daemon stopped: restore refuses beside a live owner)
    original = table_rows(stores["loja_b"])
    stores["loja_b"].unlink()
    restored = bot(url, data, "restore", "--session", "loja_b")
    assert restored.returncode == 0, restored.stderr
    assert table_rows(stores["loja_b"]) == original
    assert bot(url, data, "delete", "--session", "loja-a").returncode == 0
    assert [s.session_id for s in db.list_sessions()] == ["loja_b"] and stores["loja-a"].exists()


def test_a_bad_session_id_is_refused_in_one_line_and_nothing_is_written(
    backend: tuple[str, Database], tmp_path: Path
) -> None:
    url, db = backend
    data = tmp_path / "data"
    paired_store(data, "default", "Loja", 1)
    target = tmp_path / "out.json"
    for command in (["export", "--session", "../default", str(target)], ["backup", "--session", "a b"]):
        refused = bot(url, data, *command)
        assert refused.returncode == 2, command
        assert refused.stderr.splitlines() == [
            "zapkeep: configuration error: --session must be 1-100 letters, digits, '-' or '_'"
        ]
    assert not target.exists() and db.list_sessions() == []
