"""Webhooks and the event stream, with a real HTTP receiver on loopback, the daemon's own assembly
behind a real waitress server, and the fake WhatsApp: signed, in order per chat, each event
accepted once, nothing lost while the receiver is down or across a restart, never in the way of a
reply; GET /api/events resumes from Last-Event-ID without gaps."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot.connection import events
from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES, Config
from bot.wiring import Services, build_services
from bot.session.state import State
from bot.messages.webhooks import Dispatcher
from database import Database
from session_api import create_app
from session_api.server import ApiServer
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST

TOKEN = "webhook-test-token-0123456789abcdef"
SECRET = "webhook-secret-for-tests"
ANA = "5511912345678@s.whatsapp.net"
BETO = "5511955554444@s.whatsapp.net"
FAST_RETRIES = {"retry_seconds": (0.2, 0.4, 0.8), "post_timeout": 2.0}


class Receiver:
    """A CRM's endpoint: accepts (200), is down (503) or hangs, as the test says."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.arrivals: dict[int, float] = {}  # event id -> when first accepted (monotonic)
        self.refused = 0
        self.hanging = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.mode in ("down", "redirect"):
                    receiver.refused += 1
                    self.send_response(503 if receiver.mode == "down" else 302)
                    if receiver.mode == "redirect":
                        self.send_header("Location", receiver.url)
                else:
                    if receiver.mode == "hang":
                        receiver.hanging.set()
                        receiver.release.wait(30)
                    receiver.accepted.append((dict(self.headers), body))
                    receiver.arrivals.setdefault(int(self.headers["X-Zapkeep-Event-Id"]), time.monotonic())
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/zapkeep-hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.accepted]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


BROKEN_ANSWERS = {  # what a hostile or broken receiver answers (http.client refuses each one)
    "garbage": b"garbage\r\n\r\n",
    "long header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "150 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H-%d: v\r\n" % n for n in range(150)) + b"\r\n",
    "broken chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


class BrokenReceiver:
    """A receiver on a raw socket that answers the events of ``poisoned`` chats (every chat when
    None) with ``kind``: one of BROKEN_ANSWERS, or "trickle" (a 200 status line, then one header
    line every ``trickle_seconds``, for ever). Other events get a plain 200."""

    def __init__(self, kind: str, poisoned: str | None = None, trickle_seconds: float = 0.5) -> None:
        self.kind = kind
        self.poisoned = poisoned
        self.trickle_seconds = trickle_seconds
        self.attempts: dict[int, list[float]] = {}  # poisoned event id -> when each attempt came (monotonic)
        self.held: list[float] = []  # trickle: how long each attempt was held before the sender hung up
        self.accepted: list[dict] = []
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/broken-hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                event = self._read_request(conn)
                if self.poisoned is not None and event["data"].get("chat") != self.poisoned:
                    self.accepted.append(event)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                came = time.monotonic()
                self.attempts.setdefault(event["id"], []).append(came)
                if self.kind != "trickle":
                    conn.sendall(BROKEN_ANSWERS[self.kind])
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                n = 0
                while not self._closing.is_set():
                    if select.select([conn], [], [], self.trickle_seconds)[0] and not conn.recv(1):
                        self.held.append(time.monotonic() - came)  # the sender hung up
                        return
                    n += 1
                    conn.sendall(b"X-Slow-%d: 1\r\n" % n)
            except OSError:
                pass  # the sender hung up mid-answer (a 70 KB line is not read to its end)

    @staticmethod
    def _read_request(conn: socket.socket) -> dict:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionResetError("the sender hung up")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += conn.recv(65536)
        return json.loads(body)

    def close(self) -> None:
        self._closing.set()
        self._listener.close()


@dataclass
class Daemon:
    services: Services
    port: int
    network: FakeWhatsApp
    db: Database

    def customer(self, chat: str, text: str, n: int) -> None:
        self.network.current().emit(
            events.IncomingMessage(f"3EB0HOOK{n:04d}", chat, chat, "Ana", text, False, False, int(time.time()))
        )

    def pair(self) -> None:
        wait_until(lambda: self.services.runtime.state is State.QR, message="qr")
        self.network.current().scan_qr()
        wait_until(lambda: self.services.runtime.state is State.CONNECTED, message="connected")

    def call(self, method: str, path: str) -> dict:
        return json.loads(self.raw(method, path))

    def raw(self, method: str, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        body = conn.getresponse().read()
        conn.close()
        return body


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def start_daemon(db: Database, whatsmeow_template: Path, tmp_path: Path, receiver: Receiver) -> Iterator:
    running: list[tuple[Services, ApiServer]] = []

    def start(
        network: FakeWhatsApp | None = None, url: str | None = None, webhook_options: dict | None = None
    ) -> Daemon:
        config = Config.from_env(
            {
                "DATA_DIR": str(tmp_path / "data"),
                "API_TOKEN": TOKEN,
                "BACKUP_INTERVAL_SECONDS": "3600",
                "WEBHOOK_URL": url or receiver.url,
                "WEBHOOK_SECRET": SECRET,
            }
        )
        network = network or FakeWhatsApp(schema_template=whatsmeow_template)
        rules = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0)
        options = webhook_options or FAST_RETRIES
        services = build_services(config, db, network.factory, rules, timing=FAST, webhook_options=options)
        app = create_app(services.runtime, db, outbox=services.outbox, webhooks=services.webhooks)
        server = ApiServer(app, "127.0.0.1", 0, threads=8)
        server.start()
        services.start()
        running.append((services, server))
        return Daemon(services, server.port, network, db)

    yield start
    for services, server in running:
        server.stop()
        services.stop()


def stop(daemon: Daemon) -> None:
    daemon.services.stop()


def test_signed_events_reach_a_receiver_that_was_down_in_order_per_chat_and_once(start_daemon, receiver) -> None:
    receiver.mode = "down"
    daemon = start_daemon()
    daemon.pair()
    daemon.customer(ANA, "oi", 1)
    wait_until(lambda: len(daemon.network.sent) == 1, message="the greeting")
    # The fake's send returns before the outbox's mark_sent commits (and logs message.sent): the
    # customer answers a greeting they have, so the next message comes once it is recorded as sent.
    greeting = daemon.network.sent[0].message_id
    wait_until(lambda: daemon.db.is_own_message("default", greeting), message="the greeting recorded as sent")
    daemon.customer(ANA, "quero falar com um atendente", 2)  # a hand-off
    daemon.customer(BETO, "bom dia", 3)
    wait_until(lambda: len(daemon.network.sent) == 3, message="both replies")
    # (Each reply's message.sent is logged once it is recorded as sent: the events checked below.)
    wait_until(
        lambda: all(daemon.db.is_own_message("default", m.message_id) for m in daemon.network.sent),
        message="every reply recorded as sent",
    )
    client = daemon.network.current()
    client.emit(events.Receipt([greeting], ANA, "delivered", int(time.time())))
    client.emit(events.Receipt([greeting], ANA, "read", int(time.time())))
    wait_until(lambda: any(m.status == "read" for m in daemon.db.list_messages("default")), message="read")
    assert daemon.call("POST", f"/api/chats/{ANA}/release")["released"] is True
    wait_until(lambda: receiver.refused >= 3, message="deliveries refused while the receiver is down")
    failing = daemon.call("GET", "/api/webhooks")["endpoints"][0]
    assert failing["failed_attempts"] >= 1 and failing["last_error"] == "HTTP 503" and failing["pending"] > 0
    assert failing["url"] == receiver.url  # (scheme, host and path: nothing secret in it here)
    assert receiver.accepted == []
    assert (
        f'zapkeep_webhook_failing{{endpoint="{receiver.url}",session_id="default"}} 1.0'
        in daemon.raw("GET", "/metrics").decode()
    )

    receiver.mode = "ok"  # back up: everything arrives, oldest first in each chat
    last = daemon.db.last_event_id("default")
    wait_until(lambda: last in {e["id"] for e in receiver.events()}, timeout=20, message="every event delivered")
    wait_until(lambda: daemon.call("GET", "/api/webhooks")["endpoints"][0]["pending"] == 0, message="settled")
    assert (
        f'zapkeep_webhook_failing{{endpoint="{receiver.url}",session_id="default"}} 0.0'
        in daemon.raw("GET", "/metrics").decode()
    )

    delivered = receiver.events()
    ids = [e["id"] for e in delivered]
    assert len(ids) == len(set(ids))  # each event accepted once
    assert set(ids) == {e.id for e in daemon.db.events_after("default", 0)}
    for headers, body in receiver.accepted:  # every delivery verifies with the shared secret
        fields = dict(part.split("=", 1) for part in headers["X-Zapkeep-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(fields["v1"], expected)
        assert abs(time.time() - int(fields["t"])) < 120
        assert headers["X-Zapkeep-Event"] == json.loads(body)["type"]
    for chat in (ANA, BETO, None):
        in_chat = [e["id"] for e in delivered if e["data"].get("chat") == chat]
        assert in_chat == sorted(in_chat), chat
    kinds = [(e["type"], e["data"].get("status")) for e in delivered if e["data"].get("chat") == ANA]
    assert kinds[:2] == [("message.received", "replied"), ("message.sent", "sent")]
    assert ("chat.handoff", None) in kinds and ("chat.released", None) in kinds
    assert ("message.status", "delivered") in kinds and ("message.status", "read") in kinds
    states = [e["data"]["state"] for e in delivered if e["type"] == "session.state"]
    assert "qr" in states and states.index("qr") < states.index("connected")
    handoff = next(e for e in delivered if e["type"] == "chat.handoff")
    assert handoff["data"]["message"]["text"] == "quero falar com um atendente"
    assert all(e["session_id"] == "default" and e["time"] for e in delivered)


def test_a_hanging_receiver_does_not_delay_replies(start_daemon, receiver) -> None:
    receiver.mode = "hang"  # it takes each delivery and answers after 30 s
    daemon = start_daemon()
    daemon.pair()
    wait_until(receiver.hanging.is_set, message="the receiver holding a delivery")
    started = time.monotonic()
    daemon.customer(ANA, "oi", 1)
    daemon.customer(BETO, "oi", 2)
    wait_until(lambda: len(daemon.network.sent) == 2, message="both replies")
    assert not receiver.release.is_set() and receiver.accepted == []  # still hanging: replies went out meanwhile
    assert time.monotonic() - started < 10  # (the receiver's hang is 30 s)


def test_an_event_logged_before_a_stop_is_delivered_after_the_restart(start_daemon, receiver, db: Database) -> None:
    receiver.mode = "down"
    first = start_daemon()
    first.pair()
    first.customer(ANA, "oi", 7)
    wait_until(lambda: len(first.network.sent) == 1, message="the greeting")
    received = [e for e in db.events_after("default", 0) if e.event_type == "message.received"]
    assert len(received) == 1
    stop(first)  # (its events are in the database; nothing is queued in memory)

    receiver.mode = "ok"
    start_daemon(first.network)  # the next owner: the stored session restored, the endpoint's mark kept
    wait_until(lambda: received[0].id in {e["id"] for e in receiver.events()}, timeout=20, message="redelivered")
    message = next(e for e in receiver.events() if e["id"] == received[0].id)
    assert message["data"]["whatsapp_id"] == "3EB0HOOK0007" and message["data"]["text"] == "oi"


def test_the_event_stream_resumes_from_last_event_id_without_gaps(start_daemon, receiver) -> None:
    daemon = start_daemon()
    daemon.pair()
    for n in range(5):
        daemon.customer(ANA, f"mensagem {n}", 10 + n)
    wait_until(lambda: len([m for m in daemon.db.list_messages("default") if m.direction == "in"]) == 5)
    logged = [e.id for e in daemon.db.events_after("default", 0)]
    resume_from = logged[len(logged) // 2]

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": str(resume_from)})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    seen: list[int] = []
    status_seen = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (seen and seen[-1] >= logged[-1] and status_seen):
        line = response.fp.readline().decode().rstrip("\n")
        if line.startswith("id: "):
            seen.append(int(line[4:]))
        status_seen = status_seen or line == "event: status"
    conn.close()
    assert seen[0] == resume_from  # said first: a reconnect before any event resumes from there
    # Every event after the one named, in order, none missing (replies logged meanwhile may follow).
    assert seen[1 : len(logged) - logged.index(resume_from)] == [i for i in logged if i > resume_from]
    assert status_seen


def test_a_message_logged_before_a_kill_9_reaches_the_webhook_after_the_restart(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """Real daemons (``python -m tests.fake_daemon``: the daemon with the loopback WhatsApp), real
    PostgreSQL, a real SIGKILL right after the message was logged and before its delivery."""
    from database import PostgresDatabase
    from tests.fake_network import FakeServer
    from tests.redeploy import Daemon as RealDaemon
    from tests.synthetic import create_paired_store

    server = FakeServer()
    env = {"WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "LEASE_TTL_SECONDS": "3", "LEASE_RENEW_SECONDS": "1"}
    command = [sys.executable, "-m", "tests.fake_daemon", server.address]
    daemons: list[RealDaemon] = []

    def daemon(host: str) -> RealDaemon:  # made when started: its port is picked then, not a whole run earlier
        daemons.append(RealDaemon(tmp_path / host, database_url, command=command, env=env))
        return daemons[-1]

    first = daemon("host1")
    create_paired_store(first.store)
    db = PostgresDatabase(database_url)
    db.open()
    try:
        receiver.mode = "down"
        first.start()
        wait_until(lambda: first.status()["state"] == "connected", timeout=60, message="the first daemon connected")
        server.customer_sends(
            {
                "message_id": "3EB0KILL9",
                "chat": ANA,
                "sender": ANA,
                "push_name": "Ana",
                "text": "oi",
                "from_me": False,
                "is_group": False,
                "timestamp": int(time.time()),
                "kind": "text",
            }
        )
        wait_until(lambda: any(e.event_type == "message.received" for e in db.events_after("default", 0)), timeout=30)
        first.kill()  # SIGKILL: nothing more is written, nothing is handed over
        assert receiver.accepted == []

        receiver.mode = "ok"
        daemon("host2").start()  # another host: the stored session, the lease once the dead one's runs out
        wait_until(
            lambda: any(e["data"].get("whatsapp_id") == "3EB0KILL9" for e in receiver.events()),
            timeout=60,
            message="message.received delivered by the next owner",
        )
        received = [e for e in receiver.events() if e["type"] == "message.received"]
        assert [e["data"]["whatsapp_id"] for e in received] == ["3EB0KILL9"]
    finally:
        for daemon in daemons:
            daemon.stop_if_running()
        db.close()
        server.close()


def test_a_redirect_is_a_failed_delivery_not_a_lost_one(start_daemon, receiver) -> None:
    """urllib would follow a 302 as a GET without the body, and a 2xx there would count as taken."""
    receiver.mode = "redirect"
    daemon = start_daemon()
    wait_until(lambda: receiver.refused >= 2, message="redirects")
    endpoint = daemon.call("GET", "/api/webhooks")["endpoints"][0]
    assert endpoint["delivered"] == 0 and endpoint["last_error"] == "HTTP 302"
    receiver.mode = "ok"
    wait_until(lambda: any(e["type"] == "session.state" for e in receiver.events()), message="delivered after all")


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("garbage", "malformed answer (BadStatusLine)"),
        ("long header", "malformed answer (LineTooLong)"),
        ("150 headers", "got more than 100 headers"),
        ("broken chunked", "malformed answer (IncompleteRead)"),
        ("trickle", "no complete answer within 2 s"),  # one header line every 0.5 s: the 2 s deadline ends it
    ],
)
def test_a_broken_receiver_is_a_failed_attempt_with_backoff_shown_and_other_chats_go_on(
    start_daemon, db: Database, kind: str, error: str
) -> None:
    """Each answer http.client refuses, and a trickle that no socket timeout ends, used to escape
    the failure accounting: re-POSTed 5 times a second for ever, every later event stuck behind it,
    and the endpoint shown as up to date."""
    broken = BrokenReceiver(kind, poisoned=ANA)  # ANA's events get the broken answer, others a 200
    try:
        daemon = start_daemon(url=broken.url, webhook_options={"retry_seconds": (0.2, 3600), "post_timeout": 2.0})
        daemon.pair()
        daemon.customer(ANA, "oi", 1)
        endpoint = lambda: daemon.call("GET", "/api/webhooks")["endpoints"][0]  # noqa: E731
        wait_until(lambda: endpoint()["failed_attempts"] >= 2, message="two failed attempts counted")
        # The second failure waits an hour: a later event of another chat goes out, ANA's waits.
        daemon.customer(BETO, "bom dia", 2)
        wait_until(
            lambda: any(e["data"].get("chat") == BETO for e in broken.accepted),
            message="another chat's event delivered",
        )
        (attempts,) = broken.attempts.values()
        assert len(attempts) == 2  # every attempt counted, and no third one within the hour's wait
        shown = endpoint()
        assert shown["failed_attempts"] == 2 and shown["retrying"] == 1 and shown["pending"] > 0
        assert shown["failing_since"] is not None  # what the console shows as failing, not "up to date"
        assert error in shown["last_error"] and len(shown["last_error"]) <= 200
        tried, _ = db.open_deliveries(daemon.services.webhooks[0].endpoint.key, 0)
        (waiting,) = tried.values()
        assert waiting.attempts == 2 and waiting.next_attempt_at - datetime.now(UTC) > timedelta(minutes=30)
        metrics = daemon.raw("GET", "/metrics").decode()
        assert f'zapkeep_webhook_failed_attempts_total{{endpoint="{broken.url}",session_id="default"}} 2.0' in metrics
        assert f'zapkeep_webhook_failing{{endpoint="{broken.url}",session_id="default"}} 1.0' in metrics
    finally:
        broken.close()


def test_a_stop_ends_an_attempt_under_way_at_once_and_counts_no_failure(db: Database) -> None:
    """A receiver that trickles its headers held an attempt until the socket timeout (never, at
    one line a second; http.client gives up at its 100th line) and the shutdown waited for it."""
    broken = BrokenReceiver("trickle", trickle_seconds=1.0)
    dispatcher = Dispatcher(
        db, "default", broken.url, SECRET, event_types=("message.received",), owns_session=lambda: True, post_timeout=20
    )
    try:
        dispatcher.start()
        db.record_event("default", "message.received", ANA, {"chat": ANA, "text": "oi"})
        wait_until(lambda: broken.attempts, message="an attempt under way")
        dispatcher.stop()
        wait_until(lambda: broken.held, message="the attempt ended by the stop")  # (well before its 20 s deadline)
        assert dispatcher.status.failed_attempts == 0 and dispatcher.status.delivered == 0
        assert db.open_deliveries(dispatcher.endpoint.key, 0) == (
            {},
            set(),
        )  # nothing recorded: the next start delivers it
    finally:
        dispatcher.stop()
        broken.close()


def test_the_wait_before_a_retry_counts_from_the_end_of_the_failed_attempt(db: Database) -> None:
    """It counted from the start of the pass: a receiver that took 10 s to fail was tried again at
    once instead of 5 s later. Here the dispatcher's clock moves an hour while each attempt runs."""
    broken = BrokenReceiver("garbage", poisoned=ANA)
    began = datetime.now(UTC)
    dispatcher = Dispatcher(
        db,
        "default",
        broken.url,
        SECRET,
        event_types=("message.received",),
        owns_session=lambda: True,
        retry_seconds=(60,),
        clock=lambda: began + timedelta(hours=sum(len(came) for came in broken.attempts.values())),
    )
    try:
        dispatcher.start()
        db.record_event("default", "message.received", ANA, {"chat": ANA, "text": "oi"})
        wait_until(lambda: dispatcher.status.failed_attempts == 1, message="the first attempt failed")
        db.record_event("default", "message.received", BETO, {"chat": BETO, "text": "oi"})
        wait_until(lambda: broken.accepted, message="a later pass delivered another chat's event")
        assert [len(came) for came in broken.attempts.values()] == [1]  # ANA's waits its minute
        assert dispatcher.status.failed_attempts == 1
    finally:
        dispatcher.stop()
        broken.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEBHOOK_URL": "https://crm.example.com/hook"}, "WEBHOOK_SECRET must be set"),
        ({"WEBHOOK_URL": "ftp://crm.example.com/hook", "WEBHOOK_SECRET": "s"}, "http:// or https://"),
        ({"WEBHOOK_URL": "https://user:pa55@crm.example.com/", "WEBHOOK_SECRET": "s"}, "must not carry a user"),
        ({"WEBHOOK_URL": "https://crm.example.com:port/", "WEBHOOK_SECRET": "s"}, "does not parse"),
        ({"WEBHOOK_EVENTS": "message.received,message.deleted"}, "unknown event 'message.deleted'"),
    ],
)
def test_webhook_settings_are_checked_at_boot(env: dict[str, str], message: str) -> None:
    from bot.process.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        Config.from_env(env)
    assert "pa55" not in str(caught.value)
