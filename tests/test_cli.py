"""The operator commands, as an operator runs them: python -m bot <command>, against PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from database import PostgresDatabase
from tests.synthetic import DEVICE_JID, create_paired_store, table_rows

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
