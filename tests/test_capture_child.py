"""Issue 25: the mirrors of many sessions share one capture child, and one session's trouble stays its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from bot.process.children import child_environment
from bot.session import cells
from bot.session.capture_host import SHARED
from bot.session.mirror import Mirror
from database import Database
from tests.fake_whatsapp import wait_until
from tests.synthetic import SMALL, fill_store, table_rows
from tests.test_mirror import write_contacts

SESSIONS = ("vendas", "suporte", "loja")


def capture_children() -> list[int]:
    """This test process's capture children (the suite's PostgreSQL is a child too: not counted)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"bot.session.capture_process" in command:
            found.append(int(entry))
    return found


def open_store_files(pid: int, store: Path) -> list[str]:
    """The child's descriptors on the store's files (the store, its -wal and -shm)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(store)):
            found.append(target)
    return found


def paired_store(template: Path, path: Path, seed: int) -> Path:
    """A paired store (neonize's schema, a synthetic device), a different one for each seed."""
    path.parent.mkdir(parents=True)
    shutil.copy(template, path)
    fill_store(path, SMALL, seed=seed)
    return path


def stored_rows(db: Database, session_id: str) -> dict[str, list[tuple]]:
    """What the database holds for the session, in the shape of ``table_rows``."""
    record = db.load_session(session_id)
    assert record is not None
    rows: dict[str, list[tuple]] = {t["name"]: [] for t in json.loads(record.session_data)["tables"]}
    for row in db.load_rows(session_id):
        rows[row.table].append(tuple(cells.decode_cell(v) for v in json.loads(row.row_text)))
    return {name: sorted(values, key=repr) for name, values in sorted(rows.items())}


def in_sync(db: Database, session_id: str, store: Path) -> bool:
    return db.load_session(session_id) is not None and stored_rows(db, session_id) == table_rows(store)


def contacts(db: Database, session_id: str) -> set[str]:
    """The contacts' JIDs (their_jid) stored for the session."""
    rows = [r for r in db.load_rows(session_id) if r.table == "whatsmeow_contacts"]
    return {cells.decode_cell(json.loads(r.row_text)[1]) for r in rows}


@contextmanager
def mirrors(db: Database, stores: dict[str, Path], poll_wait: float = 60.0) -> Iterator[dict[str, Mirror]]:
    """A running mirror per session, each with its own lease; a long poll (60 s): a commit must wake
    its own session's poll while every other session's waits."""
    with ExitStack() as stack:
        running = {}
        for session_id, store in stores.items():
            fence = db.acquire_lease(session_id, "test", ttl_seconds=300)
            assert fence is not None
            mirror = Mirror(
                db,
                session_id,
                store,
                fence=lambda fence=fence: fence,
                on_fenced=lambda e, f: None,
                poll_wait_seconds=poll_wait,
            )
            mirror.start()
            stack.callback(mirror.stop)
            running[session_id] = mirror
        yield running


@pytest.fixture
def stores(tmp_path: Path, whatsmeow_template: Path) -> dict[str, Path]:
    return {
        session_id: paired_store(whatsmeow_template, tmp_path / "sessions" / session_id / "whatsmeow.sqlite3", seed)
        for seed, session_id in enumerate(SESSIONS, start=1)
    }


def test_the_mirrors_of_several_sessions_share_one_capture_child_and_store_under_their_own_session(
    db: Database, stores: dict[str, Path]
) -> None:
    with mirrors(db, stores) as running:
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: the first full sync")
        children = capture_children()
        assert len(children) == 1, children  # one process for every session, not one each
        assert {m._process.pid for m in running.values() if m._process is not None} == set(children)
        for n, store in enumerate(stores.values()):
            write_contacts(store, 0, 5 + n, prefix=f"77{n}1", width=6)  # each commit wakes its own session's 60 s poll
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: its changes mirrored")
    for n, session_id in enumerate(stores):
        mine = {jid for jid in contacts(db, session_id) if jid.startswith("77")}
        assert mine == {f"77{n}1{i:06d}@s.whatsapp.net" for i in range(5 + n)}  # its own rows, no other's
    wait_until(lambda: capture_children() == [], message="the child ends with its last mirror")


def test_a_stopped_mirror_lets_its_store_go_in_the_shared_child(db: Database, stores: dict[str, Path]) -> None:
    with mirrors(db, stores) as running:
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: the first full sync")
        (child,) = capture_children()
        assert all(open_store_files(child, store) for store in stores.values())
        running["suporte"].stop()  # the session removed from this daemon
        wait_until(lambda: open_store_files(child, stores["suporte"]) == [], message="its descriptors closed")
        assert open_store_files(child, stores["vendas"]) and open_store_files(child, stores["loja"])
        write_contacts(stores["loja"], 0, 3, prefix="7731", width=6)  # the others still mirror through the same child
        wait_until(lambda: in_sync(db, "loja", stores["loja"]), message="loja still mirrored")
        assert capture_children() == [child]


def test_one_sessions_corrupt_store_does_not_stop_the_others(
    db: Database, stores: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with mirrors(db, stores) as running:
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: the first full sync")
        (child,) = capture_children()
        broken = stores["suporte"]
        with open(broken, "r+b") as file:  # the file fails SQLite's checks from its first page on
            file.write(os.urandom(broken.stat().st_size))
        wait_until(
            lambda: "file is not a database" in (running["suporte"].status().last_error or ""),
            message="suporte's mirror reports its store",
        )
        for n, session_id in ((0, "vendas"), (2, "loja")):
            write_contacts(stores[session_id], 0, 4, prefix=f"77{n}9", width=6)
        for session_id in ("vendas", "loja"):
            wait_until(lambda: in_sync(db, session_id, stores[session_id]), message=f"{session_id} still mirrored")
        assert capture_children() == [child]  # the same child serves on: the failure was suporte's alone
        shutil.rmtree(stores["vendas"].parent)  # a store deleted under its mirror
        write_contacts(stores["loja"], 4, 3, prefix="7729", width=6)
        wait_until(lambda: in_sync(db, "loja", stores["loja"]), message="loja still mirrored")
        assert capture_children() == [child]
    assert "file is not a database" in caplog.text


def test_the_shared_child_killed_9_is_replaced_for_every_session_and_nothing_is_lost(
    db: Database, stores: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with mirrors(db, stores):
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: the first full sync")
        (child,) = capture_children()
        for n, store in enumerate(stores.values()):
            write_contacts(store, 0, 3, prefix=f"77{n}7", width=6)
        os.kill(child, signal.SIGKILL)
        for n, store in enumerate(stores.values()):  # written while no child reads the stores
            write_contacts(store, 3, 3, prefix=f"77{n}7", width=6)
        for session_id, store in stores.items():
            wait_until(lambda: in_sync(db, session_id, store), message=f"{session_id}: all mirrored after the kill")
        children = capture_children()
        assert len(children) == 1 and children != [child]  # one fresh child for all of them
        assert SHARED.child_pid() == children[0]
    for n, session_id in enumerate(stores):
        assert {j for j in contacts(db, session_id) if j.startswith(f"77{n}7")} == {
            f"77{n}7{i:06d}@s.whatsapp.net" for i in range(6)
        }
    assert "the mirror process exited with code -9" in caplog.text


DAEMON = """
import sys
from pathlib import Path
from bot.session.capture_host import MirrorProcess
channels = [MirrorProcess(Path(p), f"s{n}") for n, p in enumerate(sys.argv[1:])]
for channel in channels:
    channel.request({"op": "scan", "after": 0, "known": {}})  # each store open in the child
print(channels[0].pid, flush=True)
sys.stdin.read()
"""


def test_the_shared_child_ends_when_its_daemon_is_killed_9(stores: dict[str, Path], processes: list) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, *map(str, stores.values())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_environment(),
    )
    processes.append(daemon)
    assert daemon.stdin is not None and daemon.stdout is not None
    child = int(daemon.stdout.readline())
    assert open_store_files(child, stores["loja"])  # it watches the stores
    daemon.kill()
    daemon.wait()
    daemon.stdin.close()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_until(gone, message="the capture child ends with its daemon")
