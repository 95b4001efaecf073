"""The admin API of a daemon hosting many sessions (issue 25): sessions created, listed, shown and
deleted over the API; every session route per session; a send from the session it names; writes
for a session another daemon owns go through that owner as commands and come back with its answer.
Real waitress servers on loopback, hosts (``bot.host.Host``) on one database, a fake WhatsApp."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from bot.host import Host
from bot.session.state import State
from database import Database
from session_api import create_app, execute_command
from session_api.commands import REPLAY_HEADER
from session_api.server import ApiServer
from tests.synthetic import table_rows
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, make_config
from tests.test_api import ANSWERS, TOKEN, Reply, every_answer_seen_is_documented, multipart  # noqa: F401 (a fixture)
from tests.test_host import QUICK, customer, pair, state_of
from tests.test_messaging import RULES, incoming


@dataclass
class Daemon:
    """A host behind its API on loopback, running the commands other daemons send its sessions."""

    host: Host
    app: Flask
    server: ApiServer

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: tuple[bytes, str] | None = None,
        token: str = TOKEN,
        extra_headers: dict[str, str] | None = None,
    ) -> Reply:
        """``raw``: a body as sent, with its content type."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        headers = {"Authorization": f"Bearer {token}", **(extra_headers or {})}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        if raw is not None:
            data, headers["Content-Type"] = raw
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        conn.close()
        ANSWERS.add((method, path.split("?", 1)[0], reply.status))
        return reply

    def stream(self, path: str, until: Callable[[list[dict], dict | None], bool]) -> tuple[list[dict], dict | None]:
        """Read an event stream until ``until(events, last status)``: the events' bodies, the last status."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        ANSWERS.add(("GET", path.split("?", 1)[0], response.status))
        assert response.status == 200
        seen: list[dict] = []
        status: dict | None = None
        try:
            event_type = None
            while not until(seen, status):
                line = response.readline().decode().rstrip("\n")
                if line.startswith("event: "):
                    event_type = line.removeprefix("event: ")
                elif line.startswith("data: ") and event_type == "status":
                    status = json.loads(line.removeprefix("data: "))
                elif line.startswith("data: "):
                    seen.append(json.loads(line.removeprefix("data: ")))
        finally:
            conn.close()
        return seen, status


class Daemons:
    def __init__(self, db: Database, network: FakeWhatsApp, tmp_path: Path) -> None:
        self.db, self.network, self.tmp_path = db, network, tmp_path
        self.running: list[Daemon] = []

    def start(self, name: str = "a", **env: str) -> Daemon:
        config = make_config(self.tmp_path / name, API_TOKEN=TOKEN, **env)
        host = Host(
            config, self.db, self.network.factory, RULES, host_timing=QUICK, owner_id=f"host-{name}", timing=FAST
        )
        app = create_app(host, self.db)
        # The owner's answer is waited for as long as a loaded machine may take (the 202 of an
        # answer that does not come is tested with an owner that never answers).
        app.config["COMMAND_WAIT_SECONDS"] = 60.0
        host.command_handler = lambda command: execute_command(app, command)  # as the daemon does
        server = ApiServer(app, "127.0.0.1", 0, threads=4)
        daemon = Daemon(host, app, server)
        self.running.append(daemon)
        server.start()
        host.start()
        return daemon

    def stop_all(self) -> None:
        for daemon in self.running:
            daemon.server.stop()
            daemon.host.stop()


@pytest.fixture
def daemons(db: Database, network: FakeWhatsApp, tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(db, network, tmp_path)
    yield made
    made.stop_all()


def listed(daemon: Daemon) -> dict[str, dict[str, Any]]:
    reply = daemon.call("GET", "/api/sessions")
    assert reply.status == 200
    return {entry["session_id"]: entry for entry in reply.json()["sessions"]}


def test_sessions_are_created_listed_shown_and_deleted_over_the_api(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    a = daemons.start(MAX_SESSIONS="2")
    assert list(listed(a)) == ["default"] and listed(a)["default"]["hosted_here"] is True

    created = a.call("POST", "/api/sessions", {"session_id": "vendas"})
    assert created.status == 201, created.body
    assert created.json()["session"]["session_id"] == "vendas" and a.host.hosted() == ["default", "vendas"]
    before = db.session_ids()
    for bad in (
        {"session_id": "vendas"},
        {"session_id": "third"},  # MAX_SESSIONS=2
        {"session_id": "../x"},
        {},
        {"session_id": "x", "pair_phone": "12"},
        {"session_id": "x", "rules": "../../etc/passwd"},
        {"session_id": "x", "rules": "missing.toml"},  # under the rules directory, but no such file
    ):
        refused = a.call("POST", "/api/sessions", bad)
        assert refused.status == (409 if bad.get("session_id") in ("vendas", "third") else 400), (bad, refused.body)
        assert refused.json()["success"] is False
    assert db.session_ids() == before and a.host.hosted() == ["default", "vendas"]  # nothing changed

    wait_until(lambda: state_of(a.host, "vendas") is State.QR, message="vendas shows a QR")
    qr = a.call("GET", "/api/sessions/vendas/qr")
    assert qr.status == 200 and qr.json()["qr"] == a.host.services("vendas").runtime.qr_code()
    pair(a.host, network, "vendas")
    entry = listed(a)["vendas"]
    assert (entry["state"], entry["connected"], entry["hosted_here"], entry["owner"]) == (
        "connected",
        True,
        True,
        "host-a",
    )
    assert entry["phone"] is not None
    one = a.call("GET", "/api/sessions/vendas").json()["session"]  # as the status route gives it
    seed = a.call("GET", "/api/session/status?session_id=vendas").json()["session"]
    assert one.keys() == seed.keys()
    for field in ("session_id", "state", "connected", "phone", "owner_id", "fencing_token"):
        assert one[field] == seed[field], field
    assert (one["session_id"], one["state"], one["lease"]["owner_id"]) == ("vendas", "connected", "host-a")

    deleted = a.call("DELETE", "/api/sessions/vendas?purge=true")
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert a.host.hosted() == ["default"] and "vendas" not in db.session_ids() and list(listed(a)) == ["default"]
    for method, path in (
        ("GET", "/api/sessions/vendas"),
        ("DELETE", "/api/sessions/vendas"),
        ("GET", "/api/sessions/vendas/chats"),
        ("POST", "/api/sessions/vendas/stop"),
    ):
        assert a.call(method, path).status == 404, (method, path)


def two_paired(daemons: Daemons, network: FakeWhatsApp) -> Daemon:
    """A daemon hosting default and vendas, both paired."""
    a = daemons.start()
    assert a.call("POST", "/api/sessions", {"session_id": "vendas"}).status == 201
    pair(a.host, network, "default")
    pair(a.host, network, "vendas")
    return a


def test_a_send_naming_a_session_goes_out_from_that_sessions_number(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    a = two_paired(daemons, network)

    sends = [
        ("/api/messages/send", {"session_id": "vendas", "to": customer(1), "message": "do corpo"}),
        ("/api/sessions/vendas/send", {"to": customer(2), "message": "do caminho"}),
        ("/api/messages/send", {"to": customer(3), "message": "sem sessão"}),
    ]
    for path, body in sends:
        reply = a.call("POST", path, body)
        assert reply.status == 202, reply.body
    wait_until(lambda: len(network.sent) == 3, message="three sends")
    assert {(m.to, m.session_id) for m in network.sent} == {
        (customer(1), "vendas"),
        (customer(2), "vendas"),
        (customer(3), "default"),
    }

    for body in ({"session_id": "nobody", "to": customer(4), "message": "oi"},):
        assert a.call("POST", "/api/messages/send", body).status == 404
    assert a.call("POST", "/api/sessions/nobody/send", {"to": customer(4), "message": "oi"}).status == 404
    assert a.call("POST", "/api/messages/send", {"session_id": "", "to": customer(4), "message": "oi"}).status == 400
    assert db.outbox_messages("nobody", None, 50) == [] and len(network.sent) == 3


def test_writes_for_a_session_another_daemon_owns_go_through_it_and_its_answer_comes_back(
    daemons: Daemons, network: FakeWhatsApp, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = daemons.start("a")
    assert a.call("POST", "/api/sessions", {"session_id": "vendas"}).status == 201
    pair(a.host, network, "vendas")
    b = daemons.start("b", SESSION_ID="suporte")  # hosts suporte alone: vendas is a's
    assert b.host.hosted() == ["suporte"]

    # Reads answer from what the owner publishes.
    wait_until(lambda: listed(b)["vendas"]["connected"] is True, message="vendas's state published")
    entry = listed(b)["vendas"]
    assert (entry["state"], entry["owner"], entry["hosted_here"]) == ("connected", "host-a", False)
    status = b.call("GET", "/api/session/status?session_id=vendas").json()["session"]
    assert (status["state"], status["connected"], status["lease"]["owner_id"]) == ("connected", True, "host-a")
    _, streamed = b.stream("/api/sessions/vendas/events", lambda seen, status: status is not None)
    assert streamed is not None
    assert (streamed["session_id"], streamed["state"], streamed["owner"], streamed["lease"]["held"]) == (
        "vendas",
        "connected",
        "host-a",
        True,
    )

    # A send and a stop asked of b are done by a, and a's answers come back.
    sent = b.call("POST", "/api/sessions/vendas/send", {"to": customer(1), "message": "via b"})
    assert sent.status == 202 and sent.json()["status"] == "queued", sent.body
    command_id = int(sent.headers[REPLAY_HEADER.lower()])
    wait_until(lambda: any(m.to == customer(1) and m.session_id == "vendas" for m in network.sent), message="sent")
    command = b.call("GET", f"/api/commands/{command_id}").json()
    assert (command["state"], command["owner"], command["status_code"]) == ("finished", "host-a", 202)
    assert command["answer"] == sent.json()
    pdf = b"%PDF-1.7 " + b"x" * 1000  # a file as a form: the command keeps the body as it was sent
    form = multipart({"session_id": "vendas", "to": customer(2)}, ("orçamento.pdf", "application/pdf", pdf))
    assert b.call("POST", "/api/messages/send", raw=form).status == 202
    wait_until(lambda: any(m.to == customer(2) for m in network.sent), message="the file sent")
    (document,) = [m for m in network.sent if m.to == customer(2)]
    assert (document.session_id, document.kind, document.data, document.file_name) == (
        "vendas",
        "document",
        pdf,
        "orçamento.pdf",
    )
    stopped = b.call("POST", "/api/session/stop", {"session_id": "vendas"})
    assert stopped.status == 202 and stopped.json()["session_id"] == "vendas", stopped.body
    wait_until(lambda: state_of(a.host, "vendas") is State.DISCONNECTED, message="a stopped vendas")
    assert a.call("POST", "/api/sessions/vendas/start").status == 202
    wait_until(lambda: state_of(a.host, "vendas") is State.CONNECTED, message="vendas connected again")

    # The seed's delete of the stored copy goes through the owner, which says it stores it again.
    wait_until(lambda: db.load_session("vendas") is not None, message="vendas stored")
    # (A client cannot pass for a replay to skip the owner: the header marks answers, never requests.)
    deleted = b.call("DELETE", "/api/session/delete?session_id=vendas", extra_headers={REPLAY_HEADER: "1"})
    assert deleted.status == 200, deleted.body
    assert "store it again at its next change" in deleted.json()["note"]
    assert db.command(int(deleted.headers[REPLAY_HEADER.lower()])).claimed_by == "host-a"
    assert db.load_session("vendas") is None
    network.current(session_id="vendas").write_store(3)  # its next change: the whole session stored again
    store = a.host.services("vendas").runtime.config.store_path

    def stored_in_full() -> bool:
        local = sum(len(rows) for rows in table_rows(store).values())
        return db.load_session("vendas") is not None and len(db.load_rows("vendas")) == local

    wait_until(stored_in_full, message="vendas stored again in full by its owner")
    said = [r.getMessage() for r in caplog.records if "vendas" in r.getMessage()]
    assert any("deleted by an operator" in line for line in said)  # the owner knew: said as what it is
    assert not [line for line in said if "missed" in line]  # never blamed on change capture

    # Deleting the session itself: by its owner, for good.
    gone = b.call("DELETE", "/api/sessions/vendas")
    assert gone.status == 200 and gone.json()["deleted"] is True, gone.body
    assert "vendas" not in a.host.hosted() and "vendas" not in db.session_ids()
    assert b.call("GET", "/api/sessions/vendas").status == 404


def test_a_write_waits_a_few_seconds_for_the_owner_then_answers_202_with_the_command(
    daemons: Daemons, db: Database
) -> None:
    b = daemons.start("b", SESSION_ID="suporte")
    b.app.config["COMMAND_WAIT_SECONDS"] = 0.2  # (the owner below never answers)
    db.register_session("ghost")
    db.acquire_lease("ghost", "host-z", ttl_seconds=600)  # a live owner that runs no host
    queued = b.call("POST", "/api/sessions/ghost/reconnect")
    assert queued.status == 202, queued.body
    answer = queued.json()
    assert answer["state"] == "queued" and answer["session_id"] == "ghost"
    command = b.call("GET", f"/api/commands/{answer['command_id']}").json()
    assert (command["state"], command["method"], command["path"]) == ("queued", "POST", "/api/sessions/ghost/reconnect")
    assert b.call("GET", "/api/commands/999999").status == 404

    # A session nobody runs is acted on directly: no client to act on, its stored data to delete.
    db.register_session("idle")
    refused = b.call("POST", "/api/sessions/idle/reconnect")
    assert refused.status == 409 and "not running" in refused.json()["message"]
    assert b.call("DELETE", "/api/sessions/idle").status == 200 and "idle" not in db.session_ids()


def test_the_event_stream_of_a_session_carries_that_sessions_events_only(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    a = two_paired(daemons, network)
    for session_id, n in (("default", 1), ("vendas", 2)):  # default's first: the stream passes it
        network.current(session_id=session_id).emit(incoming("oi", chat=customer(n)))
        wait_until(lambda s=session_id: db.list_messages(s) != [], message=f"{session_id} logged")
    seen, status = a.stream(
        "/api/events?session_id=vendas&after=0",
        lambda seen, status: status is not None and any(e["type"] == "message.received" for e in seen),
    )
    assert {e["session_id"] for e in seen} == {"vendas"}
    assert status is not None and status["session_id"] == "vendas"


def test_a_daemon_standing_by_for_a_session_sends_its_writes_to_the_owner(
    daemons: Daemons, network: FakeWhatsApp
) -> None:
    a = daemons.start("a")
    pair(a.host, network, "default")
    b = daemons.start("b", SESSION_ID="default")  # one number's daemon: it stands by while a owns it
    wait_until(lambda: state_of(b.host, "default") is State.STANDBY, message="b stands by")
    wait_until(lambda: listed(b)["default"]["state"] == "connected", message="a's state published")
    assert (listed(b)["default"]["owner"], listed(b)["default"]["hosted_here"]) == ("host-a", True)
    stopped = b.call("POST", "/api/sessions/default/stop")
    assert stopped.status == 202 and stopped.headers[REPLAY_HEADER.lower()], stopped.body
    wait_until(lambda: state_of(a.host, "default") is State.DISCONNECTED, message="a stopped its client")
    assert state_of(b.host, "default") is State.STANDBY
