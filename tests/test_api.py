"""The admin API, through a real waitress server on loopback, over the runtime and a fake WhatsApp."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bot.connection import events
from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES, Config
from bot.messages.outbox import Outbox
from bot.runtime import Runtime
from bot.wiring import build_runtime
from bot.session.state import State
from bot.session.persistence import export_document, import_document
from bot.session.document import restore_snapshot, validate_document
from database import Database, PostgresDatabase
from prometheus_client.parser import text_string_to_metric_families

from bot.host import Host
from session_api import create_app
from session_api.console import SIGN_IN_OVERALL_BUDGET, sign_in_attempts
from session_api.guard import FailedAttempts, FailureBudget
from session_api.openapi import openapi_document
from session_api.request_helpers import TooManyWrongTokens
from session_api.server import IDLE_TIMEOUT_SECONDS, ApiServer
from tests.test_document_validation import CORRUPTIONS
from tests.fake_network import FakeServer
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.pg_cluster import PostgresCluster
from tests.redeploy import TOKEN as REDEPLOY_TOKEN
from tests.redeploy import Daemon
from tests.synthetic import DEVICE_JID, create_paired_store, table_rows
from tests.runtime_helpers import FAST, Calls, mirrored

TOKEN = "test-token-0123456789abcdef"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    port: int
    runtime: Runtime
    db: Database
    network: FakeWhatsApp
    bodies: list[bytes]
    failed_attempts: FailedAttempts
    outbox: Outbox
    host: Host | None = None

    def hosted_state(self) -> State | None:
        """The state of the default session as the host runs it now."""
        if self.host is None:
            return self.runtime.state
        services = self.host.services(self.host.default_session_id)
        return None if services is None else services.runtime.state

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = TOKEN,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        conn.close()
        self.bodies.append(reply.body)
        ANSWERS.add((method, path.split("?", 1)[0], reply.status))
        return reply

    def pair(self) -> None:
        """Scan the QR; return once the store is mirrored and the snapshot after pairing is in history."""
        wait_until(lambda: self.runtime.state is State.QR, message="qr")
        self.network.current().scan_qr()
        wait_until(lambda: self.runtime.state is State.CONNECTED, message="connected")
        wait_until(lambda: self.db.list_history("default") != [], message="the snapshot after pairing")
        wait_until(lambda: mirrored(self.runtime, self.db), message="the store mirrored")


ANSWERS: set[tuple[str, str, int]] = set()  # every (method, path, status) the tests saw


@pytest.fixture(scope="module", autouse=True)
def every_answer_seen_is_documented() -> Iterator[None]:
    """The OpenAPI document against the server's real answers in all these tests."""
    yield
    paths = openapi_document()["paths"]
    templates = {re.compile(re.sub(r"\{\w+\}", "[^/]+", template) + "$"): template for template in paths}
    undocumented = []
    for method, path, status in sorted(ANSWERS):
        template = path if path in paths else next((t for p, t in templates.items() if p.match(path)), path)
        operation = paths.get(template, {}).get(method.lower())
        if operation is None:  # no such route (a test of 404 and 405): nothing to document but that
            assert status in (404, 405), (method, path, status)
        elif str(status) not in operation["responses"]:
            undocumented.append((method, path, status))
    assert not undocumented, f"answers the OpenAPI document does not list: {undocumented}"


@pytest.fixture
def api(db: Database, whatsmeow_template: Path, tmp_path: Path) -> Iterator[Api]:
    with serving(db, whatsmeow_template, tmp_path) as served:
        yield served


@contextmanager
def serving(db: Database, whatsmeow_template: Path, tmp_path: Path, **env: str) -> Iterator[Api]:
    """The daemon's own assembly (the host, the default session's runtime, chatbot and outbox)
    behind a real waitress server."""
    config = Config.from_env(
        {"DATA_DIR": str(tmp_path / "data"), "API_TOKEN": TOKEN, "BACKUP_INTERVAL_SECONDS": "3600", **env}
    )
    network = FakeWhatsApp(schema_template=whatsmeow_template)
    rules = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0)
    # What the daemon runs: a host of every session in the database (a first boot creates "default").
    host = Host(config, db, network.factory, rules, owner_id="api-test", timing=FAST)
    failed_attempts = FailedAttempts()
    app = create_app(host, db, failed_attempts=failed_attempts)
    server = ApiServer(app, "127.0.0.1", 0, threads=4)
    server.start()
    host.start()
    services = host.services(host.default_session_id)
    assert services is not None
    try:
        yield Api(server.port, services.runtime, db, network, [], failed_attempts, services.outbox, host)
    finally:
        server.stop()
        host.stop()


OPEN = {("GET", "/healthz"), ("GET", "/readyz")}  # README: every route but these needs the token
SAMPLE_PARAMETERS = {"integer": "1", "string": "5511912345678@s.whatsapp.net"}


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?(\w+)>", r"{\1}", rule)  # Flask's <int:x> is OpenAPI's {x}


def api_routes(app: Any) -> dict[tuple[str, str], str]:
    """Every route of the API, (method, OpenAPI path) -> a concrete path to call: those the OpenAPI
    document lists and those Flask serves (the console's HTML pages aside, README), so a route
    missing from either is still called."""
    paths = openapi_document()["paths"]
    routes = {}
    for path, operations in paths.items():
        for method, operation in operations.items():
            kinds = {p["name"]: p["schema"].get("type", "string") for p in operation.get("parameters", [])}
            concrete = re.sub(r"\{(\w+)\}", lambda m: SAMPLE_PARAMETERS[kinds.get(m[1], "string")], path)
            routes[(method.upper(), path)] = concrete
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("console.") or rule.endpoint == "static":
            continue
        concrete = re.sub(r"<(int)?[^>]*>", lambda m: SAMPLE_PARAMETERS["integer" if m[1] else "string"], rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.setdefault((method, _openapi_path(rule.rule)), concrete)
    return routes


def status_without_waiting_for_the_body(api: Api, method: str, path: str, headers: dict[str, str]) -> Reply:
    """The status (and a 401's body): a route served without its token may be an endless stream."""
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    try:
        conn.request(method, path, body=b"{}", headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        body = response.read() if response.status == 401 else b""
        ANSWERS.add((method, path.split("?", 1)[0], response.status))
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        conn.close()


def test_every_protected_route_refuses_bad_tokens(api: Api) -> None:
    """Every route of the OpenAPI document and of Flask's URL map, every method, without the
    token or with a wrong one: 401, nothing done; only the documented probes answer anyone."""
    almost = TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1")
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {almost}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    routes = api_routes(create_app(api.runtime, api.db))
    documented_open = {
        (method.upper(), path)
        for path, operations in openapi_document()["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") == []
    }
    assert documented_open == OPEN
    protected = {route: path for route, path in routes.items() if route not in OPEN}
    assert ("GET", "/api/events") in protected and len(protected) >= 25  # (the enumeration itself works)
    sessions_routes = {
        ("GET", "/api/sessions"),
        ("POST", "/api/sessions"),
        ("DELETE", "/api/sessions/{session_id}"),
        ("POST", "/api/sessions/{session_id}/send"),  # (each session route under /api/sessions/<id>/)
        ("GET", "/api/commands/{command_id}"),
    }
    assert sessions_routes <= protected.keys()
    # (This checks every route, not the slowdown of repeated wrong tokens, tested on its own below.)
    api.failed_attempts.budget = FailureBudget(burst=len(protected) * len(attempts))
    for (method, _), path in sorted(protected.items()):
        for headers in attempts:
            reply = status_without_waiting_for_the_body(api, method, path, headers)
            assert reply.status == 401, (method, path, headers, reply.status)
            assert reply.json() == {"success": False, "message": "missing or wrong bearer token"}
    assert api.db.list_sessions() == []  # nothing happened behind a refused call
    for method, path in OPEN:
        assert api.call(method, path, token=None).status in (200, 503)  # (readyz: 503 until connected)
    health = api.call("GET", "/healthz", token=None)
    assert health.status == 200 and health.json()["success"] is True


def test_repeated_wrong_tokens_from_one_address_are_slowed_down_the_right_token_always_passes(api: Api) -> None:
    clock = [1000.0]
    app = create_app(api.runtime, api.db, failed_attempts=FailedAttempts(clock=lambda: clock[0]))

    def client_at(address: str) -> Any:
        client = app.test_client()
        client.environ_base["REMOTE_ADDR"] = address
        return client

    attacker = client_at("203.0.113.7")
    admin = client_at("203.0.113.7")  # behind the same proxy
    neighbour = client_at("198.51.100.2")
    wrong = {"Authorization": "Bearer wrong"}
    right = {"Authorization": f"Bearer {TOKEN}"}

    assert [attacker.get("/api/session/status", headers=wrong).status_code for _ in range(10)] == [401] * 10
    slowed = attacker.get("/api/session/status", headers=wrong)
    assert slowed.status_code == 429 and slowed.headers["Retry-After"] == "6"
    assert slowed.get_json() == {"success": False, "message": TooManyWrongTokens.description}
    assert admin.get("/api/session/status", headers=right).status_code == 200  # never locked out
    assert neighbour.get("/api/session/status", headers=wrong).status_code == 401  # its own budget
    clock[0] += 6.0  # one more wrong token every 6 s
    assert attacker.get("/api/session/status", headers=wrong).status_code == 401
    assert attacker.get("/api/session/status", headers=wrong).status_code == 429
    clock[0] += 60.0
    assert [attacker.get("/api/session/status", headers=wrong).status_code for _ in range(11)] == [401] * 10 + [429]


def contacts_in(store: Path) -> int:
    return len(table_rows(store)["whatsmeow_contacts"])


def test_backup_status_export_and_delete(api: Api, tmp_path: Path) -> None:
    assert api.call("POST", "/api/session/backup").status == 409  # not paired yet
    api.pair()
    stored = api.db.load_session("default")
    store = api.runtime.config.store_path
    total = sum(len(rows) for rows in table_rows(store).values())

    backup = api.call("POST", "/api/session/backup")
    assert backup.status == 200
    answer = backup.json()
    # The mirror had stored everything and the snapshot after pairing is current: nothing to write.
    assert (answer["written"], answer["written_rows"], answer["new_snapshot"]) == (False, 0, False)
    assert answer["version"] == stored.version == api.db.list_history("default")[0].version
    assert answer["checksum"] == stored.checksum and answer["rows"] == total
    assert answer["duration_ms"] >= 0
    assert api.db.load_session("default") == stored  # not even updated_at moved

    status = api.call("GET", "/api/session/status").json()
    (session,) = status["sessions"]
    assert session["state"] == "connected" and session["jid"] == DEVICE_JID and session["phone"] == "5511987654321"
    assert session["stored"]["checksum"] == answer["checksum"] == session["last_backup_checksum"]
    assert session["stored"]["format_version"] == 2
    assert session["stored"]["mirror_sequence"] == stored.mirror_sequence == session["mirror_sequence"]
    assert session["mirror_running"] is True
    assert [h["version"] for h in session["history"]] == [answer["version"]]
    assert session["lease"]["held"] and session["lease"]["owner_id"] == api.runtime.owner_id
    api.db.acquire_lease("elsewhere", "other-host/1", ttl_seconds=60)
    import_document(api.db, "elsewhere", export_document(api.db, "default")[1])  # another daemon's session
    others = {s["session_id"]: s for s in api.call("GET", "/api/session/status").json()["sessions"]}
    assert (
        others["elsewhere"]["state"] == "running_elsewhere"
        and others["elsewhere"]["lease"]["owner_id"] == "other-host/1"
    )
    one = api.call("GET", "/api/session/status?session_id=default")
    assert one.json()["session"]["session_id"] == "default"
    assert api.call("GET", "/api/session/status?session_id=nobody").status == 404
    assert api.call("GET", "/api/session/status?session_id=../etc").status == 400

    exported = api.call("GET", "/api/session/restore?session_id=default")
    assert exported.status == 200
    reply = exported.json()
    document = reply["session_data"]
    # The whole document, assembled from the stored head and rows: it rebuilds the live store exactly.
    assert document["format_version"] == 2 and document["checksum"] == answer["checksum"]
    assert document["lineage"] == stored.lineage and document["sequence"] == stored.mirror_sequence
    assert reply["version"] == answer["version"] and reply["checksum"] == answer["checksum"]
    assert sum(len(t["rows"]) for t in document["tables"]) == total == document["metadata"]["total_rows"]
    assert validate_document(document).checksum == answer["checksum"]
    copy = tmp_path / "copy" / "whatsmeow.sqlite3"
    restore_snapshot(document, copy)
    assert table_rows(copy) == table_rows(store)
    assert reply["size_bytes"] == len(export_document(api.db, "default")[1].encode())
    # The size of the whole document (the snapshot of that version, still current), not of its head.
    assert answer["size_bytes"] == api.db.list_history("default")[0].size_bytes == reply["size_bytes"]

    historical = api.call("GET", f"/api/session/restore?version={answer['version']}")
    assert historical.status == 200 and historical.json()["version"] == answer["version"]
    assert historical.json()["session_data"]["checksum"] == answer["checksum"]
    assert api.call("GET", "/api/session/restore?version=999").status == 404
    assert api.call("GET", "/api/session/restore?session_id=other").status == 404
    assert api.call("GET", "/api/session/restore?version=abc").status == 400

    deleted = api.call("DELETE", "/api/session/delete?session_id=default")
    assert deleted.status == 200 and api.db.load_session("default") is None
    assert api.db.load_rows("default") == []
    assert api.call("DELETE", "/api/session/delete?session_id=default").status == 404


def test_import_validates_and_a_corrupt_document_changes_nothing(api: Api, tmp_path: Path) -> None:
    api.pair()
    document = api.call("GET", "/api/session/restore").json()["session_data"]

    def everything() -> tuple:
        with api.db.transaction() as tx:
            sessions = tx.execute(
                "SELECT CAST(session_data AS TEXT) AS d, version, checksum, lineage, mirror_sequence, updated_at"
                " FROM whatsapp_sessions WHERE session_id = 'default'"
            ).fetchall()
        return sessions, api.db.load_rows("default"), api.db.list_history("default")

    before = everything()
    corrupt = json.loads(json.dumps(document))
    (device,) = [t for t in corrupt["tables"] if t["name"] == "whatsmeow_device"]
    device["rows"][0][2] = {"b64": "!!notbase64"}
    client = api.network.current()
    # SQL in a column name, every checksum recomputed: refused before the live client is touched
    injected = json.loads(CORRUPTIONS["SQL in a column name"][0](json.loads(json.dumps(document))))
    for bad in (corrupt, injected, "not json at all", {"format": "other"}, ""):
        reply = api.call("POST", "/api/session/backup", body={"session_id": "default", "session_data": bad})
        assert reply.status == 400, bad
        assert reply.json()["success"] is False
    refused = api.call("POST", "/api/session/backup", body={"session_id": "default", "session_data": injected})
    assert "is not whatsmeow's" in refused.json()["message"]
    assert everything() == before
    assert not client.stopped.is_set() and api.runtime.state is State.CONNECTED

    imported = api.call("POST", "/api/session/backup", body={"session_id": "copy", "session_data": document})
    assert imported.status == 201 and imported.json()["imported"] is True
    copy = api.db.load_session("copy")
    assert copy.checksum == document["checksum"] and copy.format_version == 2
    assert copy.lineage != document["lineage"]  # a new history starts from an imported document
    (entry,) = api.db.list_history("copy")
    assert imported.json()["version"] == entry.version == copy.version and entry.checksum == document["checksum"]
    assert [(r.table, r.row_hash) for r in api.db.load_rows("copy")] == [
        (r.table, r.row_hash) for r in api.db.load_rows("default")
    ]
    exported = api.call("GET", "/api/session/restore?session_id=copy").json()["session_data"]
    rebuilt = tmp_path / "rebuilt" / "whatsmeow.sqlite3"
    restore_snapshot(exported, rebuilt)
    assert table_rows(rebuilt) == table_rows(api.runtime.config.store_path)
    assert everything() == before  # the daemon's own session was not touched


def test_restore_rolls_the_running_client_back_to_a_historical_version(api: Api) -> None:
    api.pair()
    first_version = api.db.load_session("default").version
    first = api.db.load_history_version("default", first_version)
    client = api.network.current()
    client.write_store(rows=9)
    wait_until(lambda: mirrored(api.runtime, api.db), message="the 9 contacts mirrored")
    backup = api.call("POST", "/api/session/backup").json()
    assert backup["new_snapshot"] is True and backup["written_rows"] == 0  # the mirror had written them
    assert api.db.load_session("default").version == backup["version"] > first_version

    reply = api.call("POST", "/api/session/restore", body={"version": first_version})

    assert reply.status == 200, reply.body
    assert reply.json()["version"] == first_version and reply.json()["checksum"] == first.checksum
    assert client.stopped.is_set()
    wait_until(lambda: api.runtime.state is State.CONNECTED, message="reconnected after restore")
    current = api.network.current()
    assert current is not client
    assert contacts_in(current.store_path) == 10  # the 9 are gone
    # The historical version became the stored session, and the mirror goes on from it.
    stored = api.db.load_session("default")
    assert stored.checksum == first.checksum
    assert len([r for r in api.db.load_rows("default") if r.table == "whatsmeow_contacts"]) == 10
    assert backup["version"] in [h.version for h in api.db.list_history("default")]  # the 19 can come back
    current.write_store(rows=2)
    wait_until(lambda: mirrored(api.runtime, api.db), message="a write after the restore mirrored")
    assert len([r for r in api.db.load_rows("default") if r.table == "whatsmeow_contacts"]) == 12
    assert api.db.load_session("default").lineage == stored.lineage

    assert api.call("POST", "/api/session/restore", body={"version": 999}).status == 404
    assert api.call("POST", "/api/session/restore", body={"version": "x"}).status == 400
    assert api.call("POST", "/api/session/restore", body={"session_id": "other"}).status == 409


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """DATA_DIR on a 16 MiB tmpfs of its own: a disk that really fills up (ENOSPC, SQLITE_FULL)."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(data)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small filesystem of its own; mount refused: {mounted.stderr.strip()}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "--lazy", str(data)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all of the disk's free space but ``leave_bytes``."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


def empty_wal(store: Path) -> bool:
    """Checkpoint the store's WAL into the store and truncate it (from this test process, which
    never imports neonize); False when a reader kept it from completing."""
    conn = sqlite3.connect(store, timeout=5)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    wal = Path(f"{store}-wal")
    return busy == 0 and (not wal.exists() or wal.stat().st_size == 0)


def test_a_restore_on_a_full_data_dir_answers_507_changes_nothing_and_raises_no_false_alarm(
    db: Database, whatsmeow_template: Path, tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(db, whatsmeow_template, tmp_path) as api:
        api.pair()
        first_version = api.db.load_session("default").version
        client = api.network.current()
        client.write_store(rows=9)
        wait_until(lambda: mirrored(api.runtime, api.db), message="the 9 contacts mirrored")
        assert api.call("POST", "/api/session/backup").json()["new_snapshot"] is True
        store = api.runtime.config.store_path
        stored = api.db.load_session("default"), api.db.load_rows("default"), api.db.list_history("default")
        local = table_rows(store)
        # The restore stops the mirror first, and the capture process closing the store checkpoints
        # and removes its WAL: that space is freed before the new store is built. How much the WAL
        # holds depends on timing (up to 200 KB here, more than the 64 KB left), so it is emptied
        # before the disk is filled.
        wait_until(lambda: empty_wal(store), message="the live store's WAL checkpointed and truncated")
        # Room for the live store's small writes, none for a new store (180 KB and more).
        filler = fill(small_disk, leave_bytes=64 * 1024)

        with caplog.at_level(logging.INFO):
            reply = api.call("POST", "/api/session/restore", body={"version": first_version})

            assert reply.status == 507, reply.body
            message = reply.json()["message"]
            assert "DATA_DIR's disk is full" in message and str(small_disk) in message, message
            assert "left as they were" in message
            filler.unlink()
            wait_until(lambda: api.runtime.state is State.CONNECTED, message="connected again after the refusal")
            # A whole-store comparison: the local store and the stored session still agree.
            backup = api.call("POST", "/api/session/backup")
            assert backup.status == 200 and backup.json()["written_rows"] == 0, backup.body

        assert (api.db.load_session("default"), api.db.load_rows("default"), api.db.list_history("default")) == stored
        assert table_rows(store) == local and contacts_in(store) == 19
        assert not list(store.parent.glob(".*restore-*"))  # nothing built aside is left behind
        alarms = [r.getMessage() for r in caplog.records if "missed" in r.getMessage()]
        assert alarms == []
        # With room on the disk, the same restore goes through.
        assert api.call("POST", "/api/session/restore", body={"version": first_version}).status == 200
        wait_until(lambda: api.runtime.state is State.CONNECTED, message="reconnected after the restore")
        assert contacts_in(api.network.current().store_path) == 10


def test_importing_the_live_session_applies_it_and_the_client_does_not_undo_it(api: Api) -> None:
    api.pair()
    exported = api.call("GET", "/api/session/restore").json()["session_data"]  # 10 contacts
    client = api.network.current()
    client.write_store(rows=5)
    wait_until(lambda: mirrored(api.runtime, api.db), message="the 5 contacts mirrored")

    reply = api.call("POST", "/api/session/backup", body={"session_id": "default", "session_data": exported})

    assert reply.status == 201 and reply.json()["applied_live"] is True, reply.body
    assert client.stopped.is_set()  # applied as a restore: stop, rewrite, reconnect
    wait_until(lambda: api.runtime.state is State.CONNECTED, message="reconnected with the import")
    current = api.network.current()
    assert contacts_in(current.store_path) == 10
    current.write_store(rows=1)
    wait_until(lambda: mirrored(api.runtime, api.db), message="a later write mirrored")
    assert len([r for r in api.db.load_rows("default") if r.table == "whatsmeow_contacts"]) == 11
    assert reply.json()["version"] in [h.version for h in api.db.list_history("default")]  # can be rolled back to


def test_qr_as_json_and_png_decodes_to_the_same_text(api: Api) -> None:
    import zxingcpp
    from PIL import Image

    wait_until(lambda: api.runtime.state is State.QR)
    reply = api.call("GET", "/api/session/qr")
    assert reply.status == 200
    payload = reply.json()
    assert payload["qr"] == api.runtime.qr_code()
    prefix = "data:image/png;base64,"
    assert payload["image"].startswith(prefix)
    from_json = Image.open(io.BytesIO(base64.b64decode(payload["image"][len(prefix) :])))
    png = api.call("GET", "/api/session/qr", headers={"Accept": "image/png"})
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    for image in (from_json, Image.open(io.BytesIO(png.body))):
        assert [r.text for r in zxingcpp.read_barcodes(image)] == [payload["qr"]]

    api.network.current().scan_qr()
    wait_until(lambda: api.runtime.state is State.CONNECTED)
    assert api.call("GET", "/api/session/qr").status == 404


def test_send_queues_in_the_outbox_and_delivers_also_after_a_disconnection(api: Api) -> None:
    assert api.call("POST", "/api/messages/send", body={"to": "5511999999999", "message": "oi"}).status == 409
    api.pair()
    for bad in (
        {"to": "123", "message": "oi"},
        {"to": "5511999999999", "message": ""},
        {"to": 5511, "message": "x"},
        {"message": "x"},
        {"to": "5511999999999", "message": "x" * 5000},
    ):
        assert api.call("POST", "/api/messages/send", body=bad).status == 400, bad
    assert api.call("POST", "/api/messages/send", raw=b"{not json").status == 400

    sent = api.call("POST", "/api/messages/send", body={"to": "+55 (11) 99999-9999", "message": "Olá!"})
    assert sent.status == 202 and sent.json()["to"] == "5511999999999@s.whatsapp.net"
    assert sent.json()["status"] == "queued"
    wait_until(lambda: [m.text for m in api.network.sent] == ["Olá!"], message="delivery")
    seeds = api.call("POST", "/api/messages/send", body={"to": "5511999999999@c.us", "message": "Oi de novo"})
    assert seeds.status == 202 and seeds.json()["to"] == "5511999999999@s.whatsapp.net"  # the seeds' form
    wait_until(lambda: [m.text for m in api.network.sent] == ["Olá!", "Oi de novo"], message="both delivered")

    api.network.current().emit(events.Disconnected())
    wait_until(lambda: api.runtime.state is State.RECONNECTING)
    api.outbox.flush = passes = Calls(api.outbox.flush)  # (its thread calls self.flush)
    later = api.call("POST", "/api/messages/send", body={"to": "5511999999999", "message": "Seu pedido saiu"})
    assert later.status == 202 and later.json()["connected"] is False
    passes.mark()
    passes.wait(message="an outbox pass over the queued message")  # one that could have sent it
    assert len(api.network.sent) == 2
    api.network.current().emit(events.Connected())
    wait_until(lambda: [m.text for m in api.network.sent][2:] == ["Seu pedido saiu"], message="on reconnect")
    wait_until(
        lambda: (
            [(m.status, m.reason) for m in api.db.list_messages("default") if m.id == later.json()["id"]]
            == [("sent", "api")]
        ),
        message="logged as sent",
    )


def test_start_on_a_healthy_connection_leaves_it_alone_and_says_it_is_connected(api: Api) -> None:
    api.pair()
    client = api.network.current()

    reply = api.call("POST", "/api/session/start")

    assert reply.status == 200, reply.body
    assert reply.json() == {
        "success": True,
        "session_id": "default",
        "state": "connected",
        "connected": True,
        "phone": DEVICE_JID.split(":", 1)[0].split("@", 1)[0],
    }
    assert len(api.network.clients) == 1 and not client.stopped.is_set()  # one connection, still up
    assert api.runtime.state is State.CONNECTED
    # After a stop, start is what connects again.
    assert api.call("POST", "/api/session/stop").status == 202
    wait_until(lambda: api.runtime.state is State.DISCONNECTED, message="stopped")
    assert api.call("POST", "/api/session/start").status == 202
    wait_until(lambda: api.runtime.state is State.CONNECTED, message="connected again")
    assert len(api.network.clients) == 2


def test_logout_unlinks_and_pairs_again(api: Api) -> None:
    api.pair()
    logout = api.call("POST", "/api/session/logout")
    assert logout.status == 200 and logout.json()["unlinked_remotely"] is True
    wait_until(lambda: api.runtime.state is State.QR, message="pairing again")
    assert api.db.load_session("default") is None
    assert api.call("POST", "/api/session/logout", body={"session_id": "other"}).status == 409


def test_without_an_outbox_send_goes_out_at_once_or_409(db: Database, whatsmeow_template: Path, tmp_path: Path) -> None:
    config = Config.from_env({"DATA_DIR": str(tmp_path), "API_TOKEN": TOKEN})
    network = FakeWhatsApp(schema_template=whatsmeow_template)
    runtime = build_runtime(config, db, network.factory, timing=FAST)
    client = create_app(runtime, db).test_client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    runtime.start()
    try:
        wait_until(lambda: runtime.state is State.QR)
        body = {"to": "5511999999999", "message": "oi"}
        assert client.post("/api/messages/send", json=body, headers=headers).status_code == 409
        network.current().scan_qr()
        wait_until(lambda: runtime.state is State.CONNECTED)
        reply = client.post("/api/messages/send", json=body, headers=headers)
        assert reply.status_code == 200 and reply.get_json()["message_id"] == network.sent[0].message_id
    finally:
        runtime.stop()


def test_errors_are_json_with_the_right_codes(api: Api) -> None:
    assert api.call("GET", "/api/session/backup").status == 405
    assert api.call("GET", "/api/session/backup").json()["success"] is False
    assert api.call("GET", "/api/nothing-here").status == 404
    assert api.call("POST", "/api/session/backup", raw=b"[1,2]").status == 400


def test_a_huge_body_is_refused_from_its_headers_before_any_of_it_is_read(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/session/backup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 300000000\r\n\r\n{"
        )
        answer = sock.recv(4096)  # within the socket's 5 s, and nothing more is sent: from the headers
    assert answer.startswith(b"HTTP/1.1 413")


def test_idle_and_half_sent_connections_do_not_starve_the_health_check(api: Api) -> None:
    idle = []
    try:
        for n in range(200):
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
            if n % 2:
                sock.sendall(b"GET /api/session/status HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        started = time.monotonic()
        assert api.call("GET", "/healthz", token=None).status == 200
        # Starved, it would be answered only once the idle ones are dropped (or never).
        assert time.monotonic() - started < IDLE_TIMEOUT_SECONDS
    finally:
        for sock in idle:
            sock.close()


def test_openapi_document_lists_exactly_the_served_routes(api: Api) -> None:
    spec = api.call("GET", "/api/openapi.json").json()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    app = create_app(api.runtime, api.db)
    served = {
        (method, re.sub(r"<(?:[^:>]+:)?(\w+)>", r"{\1}", rule.rule))  # Flask's <int:x> is OpenAPI's {x}
        for rule in app.url_map.iter_rules()
        if not rule.endpoint.startswith("console.")  # the console's pages are HTML (README), not the API
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == served
    assert spec["openapi"].startswith("3.")


def test_no_key_material_in_any_response_or_log(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api.pair()
    document = json.loads(export_document(api.db, "default")[1])
    secrets = {
        cell["b64"]
        for table in document["tables"]
        for row in table["rows"]
        for cell in row
        if isinstance(cell, dict) and "b64" in cell and len(cell["b64"]) >= 16
    }
    assert len(secrets) > 50

    api.bodies.clear()
    for method, path, body in [
        ("POST", "/api/session/backup", None),
        ("GET", "/api/session/status", None),
        (
            "POST",
            "/api/session/backup",
            {"session_data": {"format": "zapkeep.session", "format_version": 1, "tables": document["tables"][:2]}},
        ),
        ("POST", "/api/session/restore", {}),
        ("GET", "/api/session/qr", None),
        ("POST", "/api/messages/send", {"to": "5511999999999", "message": "oi"}),
        ("POST", "/api/session/logout", None),
    ]:
        api.call(method, path, body=body)
    wait_until(lambda: api.runtime.state is State.QR)

    seen = b"\n".join(api.bodies).decode() + "\n" + caplog.text
    leaked = [s for s in secrets if s in seen or s[:24] in seen]
    assert leaked == []
    assert not re.search(r"[A-Za-z0-9+/]{40,}={0,2}", caplog.text.replace(DEVICE_JID, ""))


def test_create_app_refuses_to_serve_without_a_token(db: Database, whatsmeow_template: Path, tmp_path: Path) -> None:
    config = Config.from_env({"DATA_DIR": str(tmp_path)})
    runtime = build_runtime(config, db, FakeWhatsApp(schema_template=whatsmeow_template).factory)
    with pytest.raises(ValueError, match="API token"):
        create_app(runtime, db)


BAD_INPUT = [
    ("POST", "/api/session/restore", b"[" * 5000 + b"]" * 5000),  # deeper than Python recurses
    ("POST", "/api/session/restore", b'{"version": 1e400}'),
    ("POST", "/api/session/restore", b'{"version": Infinity}'),
    ("POST", "/api/session/restore", b'{"version": NaN}'),
    ("POST", "/api/session/restore", b'{"version": 1.5}'),
    ("GET", "/api/session/restore?version=9223372036854775808", None),
    ("GET", "/api/session/restore?version=%D9%A3", None),  # an Arabic-Indic 3
    ("POST", "/api/messages/send", b'{"to": "5511912345678", "message": "a\\ud800b"}'),
    ("POST", "/api/messages/send", b'{"to": "5511912345678", "message": "a\\u0000b"}'),
    (
        "POST",
        "/api/messages/send",
        b'{"to": "\\uff15\\uff15\\uff11\\uff11\\uff19\\uff11\\uff12\\uff13\\uff14\\uff15\\uff16", "message": "oi"}',
    ),
    ("POST", "/api/messages/send", b'{"to": "5511912345678", "message": "\xff"}'),
    ("DELETE", "/api/session/delete?session_id=", None),
    ("DELETE", "/api/session/delete?session_id=0", None),
]


def test_bad_input_gets_a_4xx_json_answer_and_changes_nothing(api: Api) -> None:
    api.pair()
    before = (api.db.load_session("default"), api.db.list_history("default"), api.db.list_messages("default"))
    for method, path, raw in BAD_INPUT:
        reply = api.call(method, path, raw=raw)
        assert 400 <= reply.status < 500, (path, raw and raw[:60], reply.status, reply.body[:200])
        assert reply.json()["success"] is False
    document = json.loads(export_document(api.db, "default")[1])  # a good document of the live session...
    document["metadata"]["note"] = "a\u0000b"  # ...that PostgreSQL's JSONB could not hold
    for session_id in ("default", "elsewhere"):
        body = json.dumps({"session_id": session_id, "session_data": document}).encode()
        assert api.call("POST", "/api/session/backup", raw=body).status == 400
    after = (api.db.load_session("default"), api.db.list_history("default"), api.db.list_messages("default"))
    assert after == before


def test_a_wrong_method_says_which_are_allowed(api: Api) -> None:
    reply = api.call("PUT", "/api/session/status")
    assert reply.status == 405 and "GET" in reply.headers["allow"]


CUSTOMER = "5511912345678@s.whatsapp.net"
DEFAULT = (("session_id", "default"),)  # the labels of a per-session metric of the session "default"


def scrape(api: Api, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    reply = api.call("GET", "/metrics", token=token)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }


def test_metrics_parse_and_move_when_a_backup_and_a_message_happen(api: Api) -> None:
    api.pair()
    before = scrape(api)
    assert before[("zapkeep_state", (("session_id", "default"), ("state", "connected")))] == 1.0
    assert before[("zapkeep_state", (("session_id", "default"), ("state", "qr")))] == 0.0
    assert before[("zapkeep_lease_owned", DEFAULT)] == 1.0 and before[("zapkeep_fencing_token", DEFAULT)] >= 1
    assert before[("process_open_fds", ())] > 0 and before[("process_resident_memory_bytes", ())] > 0

    client = api.network.current()
    client.emit(events.IncomingMessage("3EB0METRICS1", CUSTOMER, CUSTOMER, "Ana", "oi", False, False, int(time.time())))
    wait_until(lambda: len(api.network.sent) == 1, message="the reply")
    client.write_store(rows=3)
    wait_until(lambda: mirrored(api.runtime, api.db), message="the 3 rows mirrored")

    def moved() -> dict[str, float]:
        after = scrape(api)
        names = {
            "received": ("zapkeep_messages_received_total", (("outcome", "replied"), ("session_id", "default"))),
            "sent": ("zapkeep_messages_sent_total", (("outcome", "sent"), ("session_id", "default"))),
            "rows": ("zapkeep_mirror_rows_total", DEFAULT),
            "batches": ("zapkeep_mirror_batch_seconds_count", DEFAULT),
        }
        return {label: after.get(key, 0.0) - before.get(key, 0.0) for label, key in names.items()}

    wait_until(lambda: moved()["sent"] == 1.0, message="the send counted")
    change = moved()
    assert change["received"] == 1.0 and change["rows"] >= 3 and change["batches"] >= 1, change
    assert api.call("GET", "/metrics", token="wrong").status == 401

    assert api.host is not None
    api.host.config = replace(api.host.config, metrics_token="scraper-token-0123456789")
    assert scrape(api, token="scraper-token-0123456789")[("zapkeep_lease_owned", DEFAULT)] == 1.0
    assert scrape(api)[("zapkeep_lease_owned", DEFAULT)] == 1.0  # the API token opens it too


def test_metrics_still_answer_while_the_database_is_away(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.pair()
    assert scrape(api)[("zapkeep_database_up", DEFAULT)] == 1.0

    def away(session_id: str) -> None:
        raise ConnectionRefusedError("the database is away")

    monkeypatch.setattr(api.db, "outbox_depth", away)
    during = scrape(api)  # the numbers that matter most during an outage are still there
    assert during[("zapkeep_database_up", DEFAULT)] == 0.0
    assert during[("zapkeep_state", (("session_id", "default"), ("state", "connected")))] == 1.0
    assert ("zapkeep_outbox_queued", DEFAULT) not in during


def test_during_a_postgresql_outage_the_status_answers_from_the_process_and_readiness_names_the_database(
    whatsmeow_template: Path, tmp_path: Path
) -> None:
    cluster = PostgresCluster().start()
    # Production waits 10 s for a pooled connection; here a request that waited for the pool would
    # hang past the client's 60 s: the outage must be known and not waited for.
    db = PostgresDatabase(cluster.create_database(), connect_timeout=2, wait_timeout=600)
    db.open()
    down = False
    try:
        with serving(db, whatsmeow_template, tmp_path, LEASE_TTL_SECONDS="3", LEASE_RENEW_SECONDS="1") as api:
            api.pair()
            assert api.call("GET", "/readyz").status == 200
            phone = api.runtime.status().phone
            cluster.stop_server()
            down = True

            status = api.call("GET", "/api/session/status?session_id=default")
            assert status.status == 200, status.body
            session = status.json()["session"]
            assert session["database"].startswith("unreachable since "), session["database"]
            assert session["phone"] == phone and session["stored"] is None and session["history"] is None
            ready = api.call("GET", "/readyz")
            assert ready.status == 503 and ready.json()["reason"].startswith("database unreachable since "), ready.body
            metrics = scrape(api)
            assert (
                metrics[("zapkeep_database_up", DEFAULT)] == 0.0 and ("zapkeep_outbox_queued", DEFAULT) not in metrics
            )
            chats = api.call("GET", "/api/chats")  # it needs the database: refused, not waited for
            assert chats.status == 503 and chats.headers["retry-after"] == "5", chats.body

            # The lease cannot be renewed: disconnected. That is the database's doing, not another instance's.
            wait_until(lambda: api.runtime.state is State.STANDBY, message="disconnected without a lease")
            standby = api.call("GET", "/readyz").json()
            assert standby["state"] == "standby" and "another instance" not in standby["reason"], standby
            assert standby["reason"].startswith("database unreachable since "), standby
            assert api.call("GET", "/api/session/status").status == 200

            cluster.start_server()
            down = False
            # (a host that shares its sessions rebuilds a session it lost and takes again: its runtime now)
            wait_until(lambda: api.hosted_state() is State.CONNECTED, timeout=60, message="owner again")
            assert api.call("GET", "/readyz").status == 200
            back = api.call("GET", "/api/session/status?session_id=default").json()["session"]
            assert back["database"] == "reachable" and back["stored"] is not None and back["history"]
    finally:
        if down:
            cluster.start_server()  # (a failed run: the shutdown stores what it can)
        db.close()
        cluster.stop()


def test_the_read_api_lists_chats_pages_messages_shows_the_outbox_and_releases_a_paused_chat(api: Api) -> None:
    api.pair()
    client = api.network.current()
    other = "5511955554444@s.whatsapp.net"

    def customer(chat: str, text: str, n: int) -> None:
        client.emit(events.IncomingMessage(f"3EB0READ{n:04d}", chat, chat, "Ana", text, False, False, int(time.time())))

    customer(CUSTOMER, "oi", 1)
    wait_until(lambda: len(api.network.sent) == 1, message="the greeting")
    customer(CUSTOMER, "quero falar com um atendente", 2)  # a hand-off: the bot goes quiet there
    wait_until(lambda: len(api.network.sent) == 2, message="the hand-off reply")
    customer(CUSTOMER, "alô?", 3)
    customer(other, "bom dia", 4)
    wait_until(lambda: len(api.network.sent) == 3, message="the other chat answered")
    wait_until(lambda: len(api.db.list_messages("default")) == 7, message="all logged")

    listed = api.call("GET", "/api/chats").json()["chats"]
    assert [c["chat"] for c in listed] == [other, CUSTOMER]  # the latest activity first
    (mine,) = [c for c in listed if c["chat"] == CUSTOMER]
    assert mine["paused"] is True and mine["pause_reason"] == "handoff" and mine["unanswered"] == 1
    assert mine["last_message"]["text"] == "alô?" and mine["last_message"]["direction"] == "in"
    assert next(c for c in listed if c["chat"] == other)["paused"] is False

    first = api.call("GET", f"/api/chats/{CUSTOMER}/messages?limit=3").json()
    texts = [m["text"] for m in first["messages"]]
    assert len(texts) == 3 and texts[0] == "alô?" and texts[2] == "quero falar com um atendente"
    assert [m["direction"] for m in first["messages"]] == ["in", "out", "in"]  # newest first
    rest = api.call("GET", f"/api/chats/{CUSTOMER}/messages?limit=3&before={first['next_before']}").json()
    assert [m["direction"] for m in rest["messages"]] == ["out", "in"] and rest["next_before"] is None
    assert rest["messages"][1]["text"] == "oi"  # the greeting's question, the oldest
    one = api.call("GET", f"/api/messages/{rest['messages'][1]['id']}").json()["message"]
    assert one["text"] == "oi" and one["type"] == "text" and one["chat"] == CUSTOMER and one["status"] == "replied"
    assert api.call("GET", "/api/messages/999999").status == 404
    for bad in (
        "/api/chats?limit=0",
        "/api/chats?limit=x",
        f"/api/chats/{CUSTOMER}/messages?before=-1",
        "/api/chats/not-a-jid/messages",
        "/api/outbox?status=sent",
    ):
        assert api.call("GET", bad).status == 400, bad

    api.network.current().emit(events.Disconnected())
    wait_until(lambda: api.runtime.state is State.RECONNECTING)
    queued = api.call("POST", "/api/messages/send", body={"to": other, "message": "Seu pedido saiu"}).json()
    outbox = api.call("GET", "/api/outbox?status=queued").json()["messages"]
    assert [(m["id"], m["text"], m["status"]) for m in outbox] == [(queued["id"], "Seu pedido saiu", "queued")]

    released = api.call("POST", f"/api/chats/{CUSTOMER}/release")
    assert released.status == 200 and released.json()["released"] is True
    assert api.call("POST", f"/api/chats/{CUSTOMER}/release").json()["released"] is False  # not paused any more
    assert next(c for c in api.call("GET", "/api/chats").json()["chats"] if c["chat"] == CUSTOMER)["paused"] is False
    api.network.current().emit(events.Connected())
    customer(CUSTOMER, "oi de novo", 5)  # the bot answers this chat again
    wait_until(lambda: any(s.to == CUSTOMER and s.text for s in api.network.sent[3:]), message="answered again")


def test_lid_chats_are_listed_with_their_phone_and_taken_wherever_the_api_takes_a_chat(api: Api) -> None:
    api.pair()
    client = api.network.current()
    lid_chat = "987654321012345@lid"

    def customer(text: str, n: int, phone: str | None = None) -> None:
        client.emit(
            events.IncomingMessage(
                f"3EB0LID{n:04d}",
                lid_chat,
                "987654321012345:3@lid",
                "Ana",
                text,
                False,
                False,
                int(time.time()),
                chat_phone=phone,
            )
        )

    customer("oi", 1, phone=CUSTOMER)
    wait_until(lambda: len(api.network.sent) == 1, message="the greeting")
    customer("quero falar com um atendente", 2)  # a hand-off pauses the LID chat
    wait_until(lambda: len(api.network.sent) == 2, message="the hand-off reply")
    wait_until(lambda: len(api.db.list_messages("default")) == 4, message="all logged")

    (listed,) = api.call("GET", "/api/chats").json()["chats"]
    assert (listed["chat"], listed["phone"], listed["paused"]) == (lid_chat, CUSTOMER.split("@")[0], True)
    page = api.call("GET", f"/api/chats/{lid_chat}/messages").json()
    assert page["chat"] == lid_chat and [m["text"] for m in page["messages"]][-1] == "oi"
    assert api.call("POST", f"/api/chats/{lid_chat}/release").json()["released"] is True
    sent = api.call("POST", "/api/messages/send", body={"to": lid_chat, "message": "Seu pedido saiu"})
    assert sent.status in (200, 202) and sent.json()["to"] == lid_chat
    wait_until(lambda: len(api.network.sent) == 3, message="the operator's message")
    assert [m.to for m in api.network.sent] == [lid_chat] * 3  # never at the phone JID
    assert api.call("GET", "/api/chats/987654321012345@lidx/messages").status == 400


def test_pausing_the_whole_bot_stops_replies_and_keeps_logging(api: Api) -> None:
    api.pair()
    client = api.network.current()

    def customer(text: str, n: int) -> None:
        client.emit(
            events.IncomingMessage(f"3EB0PAUSE{n:03d}", CUSTOMER, CUSTOMER, "Ana", text, False, False, int(time.time()))
        )

    assert api.call("GET", "/api/bot").json()["replies_paused"] is False
    assert api.call("POST", "/api/bot/pause").json()["replies_paused"] is True
    customer("oi, vocês abrem hoje?", 1)
    wait_until(lambda: len(api.db.list_messages("default")) == 1, message="logged while paused")
    (logged,) = api.db.list_messages("default")
    assert (logged.status, logged.reason) == ("ignored", "bot_paused")
    assert api.db.replies_paused("default")  # kept in the database: a restart or a take-over keeps it
    assert api.network.sent == []

    assert api.call("POST", "/api/bot/resume").json()["replies_paused"] is False
    customer("oi?", 2)
    wait_until(lambda: len(api.network.sent) == 1, message="answered again")


def test_contacts_check_asks_whatsapp_which_numbers_are_on_it(api: Api) -> None:
    body = {"numbers": ["+55 11 91234-5678", "5511900000000@c.us"]}
    wait_until(lambda: api.runtime.state is State.QR)
    assert api.call("POST", "/api/contacts/check", body=body).status == 409  # not connected
    api.pair()
    api.network.registered.add("5511912345678")
    reply = api.call("POST", "/api/contacts/check", body=body)
    assert reply.status == 200, reply.body
    # WhatsApp was asked once, for the numbers as it knows them (digits with the country code)...
    assert api.network.number_checks == [["5511912345678", "5511900000000"]]
    assert reply.json()["contacts"] == [  # ...and its answer is the API's, number by number
        {"number": "5511912345678", "on_whatsapp": True, "jid": "5511912345678@s.whatsapp.net"},
        {"number": "5511900000000", "on_whatsapp": False, "jid": None},
    ]
    for bad in (
        {"numbers": []},
        {"numbers": ["123"]},
        {"numbers": "5511912345678"},
        {"numbers": [5511]},
        {"numbers": ["120363025246125888@g.us"]},
        {"numbers": ["5511912345678"] * 51},
        {"numbers": ["5511912345678", "123"]},
    ):
        assert api.call("POST", "/api/contacts/check", body=bad).status == 400, bad
    assert len(api.network.number_checks) == 1  # a refused request asks WhatsApp nothing


def daemon_call(port: int, method: str, path: str, body: Any = None, timeout: float = 60) -> Reply:
    """A call to a real daemon's API (``tests.redeploy.Daemon``), its answer seen for the OpenAPI check."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {REDEPLOY_TOKEN}", "Content-Type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
    response = conn.getresponse()
    reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    conn.close()
    ANSWERS.add((method, path.split("?", 1)[0], reply.status))
    return reply


@pytest.fixture
def loopback_whatsapp(tmp_path: Path) -> Iterator[Callable[..., tuple[FakeServer, Daemon]]]:
    """A real daemon (``tests.fake_daemon``, embedded SQLite) connected to a loopback WhatsApp."""
    server = FakeServer()
    daemons: list[Daemon] = []

    def start(**env: str) -> tuple[FakeServer, Daemon]:
        command = [sys.executable, "-m", "tests.fake_daemon", server.address]
        daemon = Daemon(tmp_path / f"host{len(daemons)}", "", command=command, env=env)
        daemons.append(daemon)
        create_paired_store(daemon.store)
        daemon.start()
        wait_until(lambda: daemon.status()["state"] == "connected", timeout=60, message="the daemon connected")
        return server, daemon

    try:
        yield start
    finally:
        server.release_checks()
        for daemon in daemons:
            daemon.stop_if_running()
        server.close()


def test_slow_number_checks_hold_up_neither_customer_replies_nor_the_probes(loopback_whatsapp) -> None:
    """Issue 23: 8 number checks WhatsApp's servers were slow to answer held every server thread
    (/healthz waited) and every worker of the client process (a customer's reply waited)."""
    server, daemon = loopback_whatsapp()
    server.hold_checks()
    server.registered.add("5511912345678")
    answers: list[Reply] = []
    checks = [
        threading.Thread(
            target=lambda: answers.append(
                daemon_call(daemon.port, "POST", "/api/contacts/check", {"numbers": ["5511912345678"]}, timeout=120)
            )
        )
        for _ in range(8)
    ]
    for thread in checks:
        thread.start()
    refused = lambda: [a for a in answers if a.status == 429]  # noqa: E731
    wait_until(
        lambda: len(refused()) == 6 and server.checks_waiting() == 2,
        timeout=30,
        message="2 checks waiting for WhatsApp, 6 refused",
    )
    assert all(a.json()["message"].startswith("2 number checks are running") for a in refused())
    assert all(a.headers["retry-after"] == "5" for a in refused())
    # Meanwhile the probes answer, and so does a customer: read, typed to and replied to.
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/healthz", timeout=30) as response:
        assert response.status == 200
    server.customer_sends(
        {
            "message_id": "3EB0CUSTOMER",
            "chat": "5511987654321@s.whatsapp.net",
            "sender": "5511987654321@s.whatsapp.net",
            "push_name": "Ana",
            "text": "oi",
            "from_me": False,
            "is_group": False,
            "timestamp": int(time.time()),
            "kind": "text",
        }
    )
    wait_until(lambda: "3EB0CUSTOMER" in server.read, timeout=30, message="the customer's message read")
    wait_until(
        lambda: any(s.to == "5511987654321@s.whatsapp.net" for s in server.sent), timeout=30, message="the reply"
    )
    assert server.checks_waiting() == 2  # the reply went past them
    server.release_checks()
    for thread in checks:
        thread.join(timeout=60)
    answered = [a for a in answers if a.status == 200]
    assert len(answered) == 2 and len(answers) == 8
    assert all(a.json()["contacts"][0]["on_whatsapp"] is True for a in answered)
    # The cap counts checks running, not checks ever made: both places are free again.
    assert daemon_call(daemon.port, "POST", "/api/contacts/check", {"numbers": ["5511900000000"]}).status == 200


def test_a_number_check_whatsapp_does_not_answer_in_time_is_a_504_that_says_so(loopback_whatsapp) -> None:
    server, daemon = loopback_whatsapp(ZAPKEEP_FAKE_CALL_TIMEOUT="5")
    server.hold_checks()
    reply = daemon_call(daemon.port, "POST", "/api/contacts/check", {"numbers": ["5511912345678"]})
    assert reply.status == 504, reply.body
    assert reply.json()["message"] == (
        "WhatsApp did not answer the number check in time "
        "(check_numbers: no answer from the client within 5 s); try again later"
    )
    assert "SendOutcomeUnknown" not in daemon.log()
    server.release_checks()  # (WhatsApp's late answer: nobody waits for it any more)
    reply = daemon_call(daemon.port, "POST", "/api/contacts/check", {"numbers": ["5511912345678"]})
    assert reply.status == 200, reply.body


def multipart(fields: dict[str, str], file: tuple[str, str, bytes] | None) -> tuple[bytes, str]:
    """A multipart/form-data body as a browser or curl -F sends it: (body, content type)."""
    boundary = "zapkeep-test-boundary-7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    if file is not None:
        name, mimetype, data = file
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: {mimetype}\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_received_photo_is_logged_with_its_file_and_downloads_through_the_api(api: Api) -> None:
    api.pair()
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40  # (a JPEG's first bytes, then anything)
    api.network.files["MEDIA-REF-1"] = photo
    client = api.network.current()
    client.emit(
        events.IncomingMessage(
            "3EB0PHOTO1",
            CUSTOMER,
            CUSTOMER,
            "Ana",
            "olha a foto",
            False,
            False,
            int(time.time()),
            kind="image",
            mimetype="image/jpeg",
            size=len(photo),
            media="MEDIA-REF-1",
        )
    )
    client.emit(events.IncomingMessage("3EB0TEXT1", CUSTOMER, CUSTOMER, "Ana", "oi", False, False, int(time.time())))
    wait_until(lambda: len(api.db.list_messages("default", CUSTOMER)) >= 3, message="logged")
    listed = api.call("GET", f"/api/chats/{CUSTOMER}/messages").json()["messages"]
    (logged,) = [m for m in listed if m["message_id"] == "3EB0PHOTO1"]
    assert (logged["type"], logged["mimetype"], logged["media_size"], logged["text"]) == (
        "image",
        "image/jpeg",
        len(photo),
        "olha a foto",
    )
    download = api.call("GET", f"/api/messages/{logged['id']}/media")
    assert download.status == 200 and download.body == photo
    assert download.headers["content-type"] == "image/jpeg" and "attachment" in download.headers["content-disposition"]
    text_only = next(m for m in listed if m["message_id"] == "3EB0TEXT1")
    assert api.call("GET", f"/api/messages/{text_only['id']}/media").status == 404
    api.network.files["MEDIA-REF-2"] = b"%PDF-1.4 ..."
    client.emit(  # what a sender chose: a type with a line break in it, a name in Portuguese
        events.IncomingMessage(
            "3EB0DOC1",
            CUSTOMER,
            CUSTOMER,
            "Ana",
            "",
            False,
            False,
            int(time.time()),
            kind="document",
            mimetype="text/html\r\nSet-Cookie: x=1",
            size=12,
            file_name="orçamento.pdf",
            media="MEDIA-REF-2",
        )
    )
    wait_until(lambda: any(m.message_id == "3EB0DOC1" for m in api.db.list_messages("default", CUSTOMER)))
    document = next(m for m in api.db.list_messages("default", CUSTOMER) if m.message_id == "3EB0DOC1")
    served = api.call("GET", f"/api/messages/{document.id}/media")
    assert served.status == 200 and served.headers["content-type"] == "application/octet-stream"
    assert "set-cookie" not in served.headers and served.headers["x-content-type-options"] == "nosniff"
    assert "filename*=UTF-8''or%C3%A7amento.pdf" in served.headers["content-disposition"]
    del api.network.files["MEDIA-REF-1"]  # expired on WhatsApp's servers
    gone = api.call("GET", f"/api/messages/{logged['id']}/media")
    assert gone.status == 502 and "expired" in gone.json()["message"]


def test_files_sent_through_the_api_go_out_through_the_outbox(api: Api) -> None:
    api.pair()
    image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 300
    body, content_type = multipart(
        {"to": "5511912345678", "caption": "nosso cardápio"}, ("menu.png", "image/png", image)
    )
    queued = api.call("POST", "/api/messages/send", raw=body, headers={"Content-Type": content_type})
    assert queued.status == 202, queued.body
    pdf = b"%PDF-1.7 " + b"x" * 1000
    body, content_type = multipart({"to": "5511912345678"}, ("orçamento.pdf", "application/pdf", pdf))
    assert api.call("POST", "/api/messages/send", raw=body, headers={"Content-Type": content_type}).status == 202
    wait_until(lambda: len([s for s in api.network.sent if s.kind != "text"]) == 2, message="both files sent")
    first, second = [s for s in api.network.sent if s.kind != "text"]
    assert (first.kind, first.data, first.mimetype, first.text) == ("image", image, "image/png", "nosso cardápio")
    assert (second.kind, second.data, second.file_name) == ("document", pdf, "orçamento.pdf")
    row = api.db.message("default", queued.json()["id"])
    assert row is not None and (row.status, row.message_type, row.media_size) == ("sent", "image", len(image))
    assert api.db.outgoing_file(row.id) is None  # sent: the bytes are not kept

    body, content_type = multipart({"to": "5511912345678", "caption": "sem arquivo"}, None)
    refused = api.call("POST", "/api/messages/send", raw=body, headers={"Content-Type": content_type})
    assert refused.status == 400 and "file" in refused.json()["message"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_deeply_nested_session_document_gets_400_with_a_message_and_changes_nothing(api: Api) -> None:
    api.pair()
    before = (api.db.load_session("default"), api.db.list_history("default"), api.db.list_sessions())
    client = api.network.current()
    for session_id in ("default", "copy"):  # applied live, and an admin's import of another session
        for text in (
            _nested(100_000),
            '{"format": "zapkeep.session", "tables": ' + _nested(5000) + "}",
            '{"format": "zapkeep.sealed-session", "sealed": ' + _nested(5000) + "}",
        ):
            reply = api.call("POST", "/api/session/backup", body={"session_id": session_id, "session_data": text})
            assert reply.status == 400, (session_id, len(text), reply.status, reply.body[:200])
            assert "nested too deeply" in reply.json()["message"]
        # As JSON in the body: every depth up to the one where the body's own parser gives up.
        for depth in range(850, 1010, 5):
            for inner in (_nested(depth), '{"a": ' * depth + "1" + "}" * depth):
                raw = f'{{"session_id": "{session_id}", "session_data": {inner}}}'.encode()
                reply = api.call("POST", "/api/session/backup", raw=raw)
                assert reply.status == 400, (session_id, depth, reply.status, reply.body[:200])
                assert reply.json()["success"] is False and reply.json()["message"]
    assert (api.db.load_session("default"), api.db.list_history("default"), api.db.list_sessions()) == before
    assert not client.stopped.is_set() and api.runtime.state is State.CONNECTED


@contextmanager
def another_server(
    api: Api, *, trusted_proxy: str | None = None, sign_in_attempts: FailedAttempts | None = None
) -> Iterator[int]:
    """Another real waitress server over the same runtime, as the daemon builds it with these settings."""
    app = create_app(api.runtime, api.db, sign_in_attempts=sign_in_attempts)
    server = ApiServer(app, "127.0.0.1", 0, threads=4, trusted_proxy=trusted_proxy)
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def raw_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, list[tuple[str, str]]]:
    """Status and every header (Set-Cookie may come twice), from a chosen loopback address."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheaders()
    finally:
        conn.close()


def console_sign_in(
    port: int, password: str, *, headers: dict[str, str] | None = None, source: str = "127.0.0.1"
) -> tuple[int, list[tuple[str, str]]]:
    """The sign-in form as a browser posts it (its CSRF token in the form and in its cookie)."""
    form = f"csrf_token=form-token&password={password}".encode()
    sent = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Cookie": "zapkeep_sign_in=form-token",
        **(headers or {}),
    }
    return raw_request(port, "POST", "/console/sign-in", body=form, headers=sent, source=source)


def test_behind_a_trusted_proxy_the_console_cookie_is_secure_and_the_client_is_the_forwarded_one(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="session_api.access")
    # Railway's proxy appends the address it saw; whatever the client wrote before it is not believed.
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    for trusted, believed in ((None, False), ("10.9.9.9", False), ("*", True), ("127.0.0.1", True)):
        caplog.clear()
        with another_server(api, trusted_proxy=trusted) as port:
            _, page = raw_request(port, "GET", "/", headers=forwarded)
            status, signed = console_sign_in(port, TOKEN, headers=forwarded)
        assert status == 303, trusted
        cookies = [v for n, v in page + signed if n.lower() == "set-cookie" and "Max-Age=0" not in v]  # (not deletions)
        assert {cookie.split("=", 1)[0] for cookie in cookies} >= {"zapkeep_sign_in", "zapkeep_console"}
        for cookie in cookies:
            assert ("; Secure" in cookie) is believed, (trusted, cookie)
        clients = {r.client for r in caplog.records if getattr(r, "route", None) == "/console/sign-in"}
        assert clients == {"203.0.113.9" if believed else "127.0.0.1"}, trusted
    # Without TRUST_PROXY a client cannot make itself look like HTTPS or like another address.
    refused = api.call("GET", "/api/session/status", token="wrong", headers={"X-Forwarded-For": "203.0.113.50"})
    assert refused.status == 401 and api.failed_attempts.waiting("203.0.113.50") is None


def test_the_export_is_never_cached(api: Api) -> None:
    api.pair()
    for query in ("?clear=true", "?session_id=default", f"?version={api.db.list_history('default')[0].version}"):
        exported = api.call("GET", "/api/session/restore" + query)
        assert exported.status == 200 and exported.headers["cache-control"] == "no-store", query


def test_the_console_sign_in_limit_holds_across_addresses(api: Api) -> None:
    """100 wrong passwords within a moment from 20 loopback addresses: most are not even compared."""
    clock = [0.0]
    with another_server(api, sign_in_attempts=sign_in_attempts(clock=lambda: clock[0])) as port:
        statuses = [
            console_sign_in(port, f"guess-{attempt}", source=f"127.0.0.{2 + attempt % 20}")[0] for attempt in range(100)
        ]
        compared = statuses.count(401)
        assert statuses.count(429) == 100 - compared and compared <= SIGN_IN_OVERALL_BUDGET.burst
        refused, _ = console_sign_in(port, TOKEN, source="127.0.0.99")  # a fresh address waits too
        assert refused == 429
        clock[0] += SIGN_IN_OVERALL_BUDGET.refill_seconds  # the guessing stops: one attempt comes back
        status, headers = console_sign_in(port, TOKEN, source="127.0.0.99")
        assert status == 303 and any(v.startswith("zapkeep_console=") for n, v in headers if n.lower() == "set-cookie")
