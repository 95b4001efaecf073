"""The real neonize client in its client process: nothing leaks into the daemon, and a round
always ends when asked, even in a dial that hangs, and when the daemon is killed. (Many sessions in
one client process: tests/test_client_processes.py.)"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.connection import events
from bot.connection.client_process import HANDLED_WAIT_SECONDS, UNLOGGED_WINDOW, ClientCallError, ProcessClient
from bot.process.errors import CallTimeout
from tests.fake_network import NEONIZE_BUFFER, FakeServer
from tests.fake_whatsapp import wait_until
from tests.synthetic import create_paired_store

ROOT = Path(__file__).resolve().parent.parent


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def client_processes() -> list[int]:
    """This test process's children running a client round (the suite's PostgreSQL is a child too)."""
    listed = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "bot.connection.client_process"], capture_output=True
    )
    return [int(pid) for pid in listed.stdout.split()]


@pytest.fixture
def black_hole_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """A loopback proxy that accepts connections and never answers: a dial that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield accepted
    server.close()
    for connection in accepted:
        connection.close()


def test_rounds_of_the_real_client_leave_no_descriptor_or_process_behind(tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    errors = []
    counts = []
    for _ in range(6):
        errors.append(ProcessClient(store, lambda event: None).run())
        counts.append(open_descriptors())
    assert all("proxyconnect tcp" in (error or "") for error in errors)  # each round dialled, and failed
    assert store.exists()  # whatsmeow created its store in the child
    assert counts[-1] <= counts[1], counts  # in-process, every round kept ~2 more descriptors open
    assert client_processes() == []


def test_stop_ends_a_round_whose_dial_hangs(tmp_path: Path, black_hole_proxy: list[socket.socket]) -> None:
    client = ProcessClient(tmp_path / "whatsmeow.sqlite3", lambda event: None, stop_grace_seconds=2)
    ended: list[str | None] = []
    runner = threading.Thread(target=lambda: ended.append(client.run()))
    runner.start()
    wait_until(lambda: black_hole_proxy, timeout=30, message="the dial reaching the proxy")
    started = time.monotonic()
    client.stop()  # whatsmeow itself would wait for the dial to give up (a minute)
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - started < 8
    assert ended and ended[0] is not None  # the round reports that it ended without connecting
    assert client_processes() == []
    with pytest.raises(ClientCallError, match="not running"):
        client.send_text("5511912345678@s.whatsapp.net", "oi")


def test_the_rounds_end_when_the_daemon_is_killed(tmp_path: Path, black_hole_proxy: list[socket.socket]) -> None:
    """Two sessions' rounds in the daemon's one client process: a kill -9 of the daemon ends it."""
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import logging, sys, threading, time; from pathlib import Path\n"
            "from bot.connection.client_process import process_client_factory\n"
            "factory = process_client_factory(logging.WARNING)\n"
            "rounds = [factory(Path(sys.argv[1]) / f's{n}.sqlite3', lambda e: None) for n in range(2)]\n"
            "for r in rounds: threading.Thread(target=r.run, daemon=True).start()\n"
            "while None in [r.pid for r in rounds]: time.sleep(0.01)\n"
            "print(*{r.pid for r in rounds}, flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        children = [int(pid) for pid in daemon.stdout.readline().split()]
        assert len(children) == 1  # one client process for both
        wait_until(lambda: len(black_hole_proxy) == 2, timeout=30, message="both dials reaching the proxy")
        daemon.kill()  # kill -9: no chance to stop its rounds
        daemon.wait()
        child = children[0]
        wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=10, message="child gone")
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    "event",
    [
        events.QrCode("2@abc,def"),
        events.PairingCode("ABCD-EFGH"),
        events.Paired(jid="5511987654321:7@s.whatsapp.net", platform="android"),
        events.Connected(),
        events.Disconnected(),
        events.LoggedOut(reason="401"),
        events.StreamReplaced(),
        events.TemporaryBan(code="101", expires_in_seconds=3600),
        events.ConnectFailure(reason="405: client outdated"),
        events.KeepAliveTimeout(error_count=3),
        events.KeepAliveRestored(),
        events.IncomingMessage(
            "3EB0", "5511@s.whatsapp.net", "5511@s.whatsapp.net", "Zé \ud800", "oi\x00", False, False, 1
        ),
        events.IncomingMessage(
            "3EB1", "98765@lid", "98765:3@lid", "Ana", "oi", False, False, 1, chat_phone="5511@s.whatsapp.net"
        ),
        events.Receipt(message_ids=["3EB0A", "3EB0B"], chat="5511@s.whatsapp.net", status="read", timestamp=1),
    ],
)
def test_every_event_crosses_the_pipe_unchanged(event: events.ClientEvent) -> None:
    import json

    assert events.from_wire(json.loads(json.dumps(events.to_wire(event)))) == event


@pytest.mark.parametrize(
    "message", [{"event": "Exploit", "fields": {}}, {"event": "Connected", "fields": {"x": 1}}, {"event": "QrCode"}]
)
def test_anything_else_on_the_pipe_is_refused(message: dict) -> None:
    with pytest.raises(ValueError):
        events.from_wire(message)


@pytest.mark.parametrize(
    ("fields", "protocol_type", "kind"),
    [
        (["conversation"], None, "text"),
        (["extendedTextMessage", "messageContextInfo"], None, "text"),
        (["audioMessage"], None, "audio"),
        (["imageMessage"], None, "image"),
        (["stickerMessage"], None, "sticker"),
        (["reactionMessage"], None, "reaction"),
        (["protocolMessage"], "REVOKE", "revoke"),
        (["protocolMessage"], "MESSAGE_EDIT", "edit"),
        (["editedMessage"], None, "edit"),
        (["pollCreationMessageV3"], None, "poll"),
        (["pollUpdateMessage"], None, "poll_vote"),
        (["senderKeyDistributionMessage"], None, "protocol"),
        (["groupInviteMessage"], None, "other"),
    ],
)
def test_each_kind_of_message_is_told_apart(fields: list[str], protocol_type: str | None, kind: str) -> None:
    assert events.message_kind(fields, protocol_type) == kind


def test_whatsmeow_acknowledges_no_more_than_neonizes_buffer_beyond_what_the_daemon_logged(tmp_path: Path) -> None:
    """whatsmeow acknowledges a message before its handler runs: once acknowledged, a daemon that
    dies before logging it loses it. The client process holds the handler while a window of
    messages is with the daemon unlogged, so what is acknowledged and unlogged is that window and
    neonize's buffer, not a whole backlog."""
    server = FakeServer()
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    delivered: queue.Queue[events.ClientEvent] = queue.Queue()
    client = ProcessClient(store, delivered.put, child=[sys.executable, "-m", "tests.fake_network", server.address])
    ended: list[str | None] = []
    runner = threading.Thread(target=lambda: ended.append(client.run()))
    runner.start()
    try:
        assert isinstance(delivered.get(timeout=30), events.Connected)
        backlog = 3 * NEONIZE_BUFFER
        for n in range(backlog):
            server.customer_sends(message(n))
        handled = 0
        started = time.monotonic()
        while handled < backlog:
            event = delivered.get(timeout=30)
            assert isinstance(event, events.IncomingMessage)
            assert event.message_id == f"M{handled:05d}"  # in order, each once
            # (+2: the message in hand, and one the reader took before the buffer filled; and one
            # for each HANDLED_WAIT_SECONDS a handler waited in vain, as it then goes on)
            waited_out = int((time.monotonic() - started) / HANDLED_WAIT_SECONDS)
            assert len(server.acknowledged) <= handled + UNLOGGED_WINDOW + NEONIZE_BUFFER + 2 + waited_out
            if handled == 0:  # the daemon is slow to log the first one: the backlog waits at the server
                wait_until(lambda: len(server.acknowledged) >= NEONIZE_BUFFER, message="neonize's buffer full")
                waited_out = int((time.monotonic() - started) / HANDLED_WAIT_SECONDS)
                assert server.backlog() >= backlog - UNLOGGED_WINDOW - NEONIZE_BUFFER - 2 - waited_out
            client.message_handled(event.message_id)
            handled += 1
        wait_until(lambda: len(server.acknowledged) == backlog, message="all acknowledged")
    finally:
        client.stop()
        runner.join(timeout=20)
        server.close()
    assert ended == [None]


def message(n: int) -> dict[str, object]:
    return {
        "message_id": f"M{n:05d}",
        "chat": "5511999990000@s.whatsapp.net",
        "sender": "5511999990000@s.whatsapp.net",
        "push_name": "Cliente",
        "text": f"mensagem {n}",
        "from_me": False,
        "is_group": False,
        "timestamp": int(time.time()),
        "kind": "text",
    }


def test_neonizes_receipts_become_delivered_and_read_and_the_rest_nothing() -> None:
    """neonize's Receipt, built the way Go fills it, through bot.connection.whatsapp (in a child: neonize
    never loads in the test process)."""
    script = """
import json, logging
from bot.process import logs
logs.configure(logging.WARNING)
from bot.connection import whatsapp
from neonize.events import ReceiptEv
from neonize.proto.Neonize_pb2 import JID, MessageSource
def receipt(kind, from_me=False):
    chat = JID(User="5511912345678", Server="s.whatsapp.net", IsEmpty=False)
    source = MessageSource(Chat=chat, Sender=chat, IsFromMe=from_me, IsGroup=False)
    ev = ReceiptEv(MessageSource=source, MessageIDs=["3EB0A", "3EB0B"], Timestamp=1700000000,
                   Type=ReceiptEv.ReceiptType.Value(kind))
    found = whatsapp.receipt_of(ev)
    return None if found is None else [found.message_ids, found.chat, found.status, found.timestamp]
print(json.dumps({kind: receipt(kind) for kind in ("DELIVERED", "READ", "PLAYED", "READ_SELF", "RETRY", "SERVER_ERROR")}
                 | {"READ from our own device": receipt("READ", from_me=True)}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    ids, chat = ["3EB0A", "3EB0B"], "5511912345678@s.whatsapp.net"
    assert found["DELIVERED"] == [ids, chat, "delivered", 1700000000]
    assert found["READ"] == [ids, chat, "read", 1700000000] and found["PLAYED"][2] == "read"
    assert found["READ_SELF"] is None and found["RETRY"] is None and found["SERVER_ERROR"] is None
    assert found["READ from our own device"] is None


MEDIA_SCRIPT = """
import base64, json, logging, sys
from bot.process import logs
logs.configure(logging.WARNING)
from bot.connection import whatsapp
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import DocumentMessage, FutureProofMessage, ImageMessage, Message
key = b"k" * 32
photo = Message(ephemeralMessage=FutureProofMessage(message=Message(imageMessage=ImageMessage(
    mimetype="image/jpeg", fileLength=1234, caption="olha", mediaKey=key, directPath="/v/t62.7118-24/x"))))
document = Message(documentWithCaptionMessage=FutureProofMessage(message=Message(documentMessage=DocumentMessage(
    mimetype="application/pdf", fileLength=99, fileName="orcamento.pdf", caption="segue"))))
found = {}
for name, message in (("photo", photo), ("document", document), ("text", Message(conversation="oi"))):
    media = whatsapp.media_of(message)
    if "media" in media:
        again = Message.FromString(base64.b64decode(media.pop("media")))
        media["ref"] = [field.name for field, _ in again.ListFields()]
        media["key_kept"] = again.imageMessage.mediaKey == key if name == "photo" else None
    found[name] = {**media, "kind": whatsapp.kind_of(message)}
# Offline, through the real client: the calls reach whatsmeow (its own error), never a wrong signature.
client = whatsapp.NeonizeClient(sys.argv[1], lambda event: None)
errors = {}
for name, call in (
    ("download", lambda: client.download(base64.b64encode(photo.ephemeralMessage.message.SerializeToString()).decode())),
    ("send_document", lambda: client.send_media("5511912345678@s.whatsapp.net", "document",
                                                base64.b64encode(b"%PDF-1.7").decode(), "application/pdf", "a.pdf", "c")),
):
    try:
        call()
        errors[name] = None
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"found": found, "errors": errors}))
"""


def test_neonizes_media_messages_give_their_file_and_a_reference_to_download_it(tmp_path: Path) -> None:
    """bot.connection.whatsapp's reading of photos and documents (wrapped as WhatsApp wraps them), and its
    download and send calls against the real library offline (in a child: never in this process)."""
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    result = subprocess.run(
        [sys.executable, "-c", MEDIA_SCRIPT, str(store)],
        cwd=ROOT,
        env={**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    found = answer["found"]
    assert found["photo"] == {
        "mimetype": "image/jpeg",
        "size": 1234,
        "file_name": None,
        "ref": ["imageMessage"],
        "key_kept": True,
        "kind": "image",
    }
    assert found["document"]["file_name"] == "orcamento.pdf" and found["document"]["ref"] == ["documentMessage"]
    assert found["document"]["kind"] == "document" and found["text"] == {"kind": "text"}
    # Offline (never connected), each call got as far as whatsmeow's own refusal: the download asked
    # for the file, the send built the document and asked for a media connection to upload it. A
    # wrong argument or an undecodable reference fails earlier, in other words.
    assert answer["errors"] == {
        "download": "DownloadError: client is nil",
        "send_document": "UploadError: failed to refresh media connections: client is nil",
    }, result.stderr[-2000:]


def test_a_customer_reply_never_waits_behind_slow_number_checks(tmp_path: Path) -> None:
    """Issue 23: four number checks that WhatsApp's servers do not answer held every worker of the
    client process, and a reply (its read receipt, its typing) waited behind them for a minute."""
    server = FakeServer()
    server.hold_checks()
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    delivered: queue.Queue[events.ClientEvent] = queue.Queue()
    client = ProcessClient(store, delivered.put, child=[sys.executable, "-m", "tests.fake_network", server.address])
    ended: list[str | None] = []
    runner = threading.Thread(target=lambda: ended.append(client.run()))
    runner.start()
    checks: list[threading.Thread] = []
    answers: list[list[dict[str, object]]] = []
    try:
        assert isinstance(delivered.get(timeout=30), events.Connected)
        for n in range(4):
            checks.append(threading.Thread(target=lambda n=n: answers.append(client.check_numbers([f"55119{n:08d}"]))))
            checks[-1].start()
        wait_until(lambda: server.checks_waiting() == 4, timeout=30, message="4 checks waiting for WhatsApp")
        client.set_typing("5511999990000@s.whatsapp.net", True)
        client.mark_read("5511999990000@s.whatsapp.net", "5511999990000@s.whatsapp.net", "M00001")
        message_id = client.send_text("5511999990000@s.whatsapp.net", "Olá! Como posso ajudar?")
        assert [(s.to, s.message_id) for s in server.sent] == [("5511999990000@s.whatsapp.net", message_id)]
        wait_until(lambda: "M00001" in server.read, message="the read receipt")
        assert server.checks_waiting() == 4 and answers == []  # the checks still wait: the reply went past them
        server.release_checks()
        for thread in checks:
            thread.join(timeout=30)
        assert sorted(a[0]["number"] for a in answers) == [f"55119{n:08d}" for n in range(4)]
    finally:
        server.release_checks()
        client.stop()
        runner.join(timeout=20)
        server.close()
    assert ended == [None]


def test_a_check_without_an_answer_in_time_is_a_timeout_not_an_unknown_send(tmp_path: Path) -> None:
    server = FakeServer()
    server.hold_checks()
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    delivered: queue.Queue[events.ClientEvent] = queue.Queue()
    child = [sys.executable, "-m", "tests.fake_network", server.address]
    client = ProcessClient(store, delivered.put, call_timeout_seconds=1, child=child)
    runner = threading.Thread(target=client.run)
    runner.start()
    try:
        assert isinstance(delivered.get(timeout=30), events.Connected)
        with pytest.raises(CallTimeout, match="check_numbers: no answer from the client within 1 s"):
            client.check_numbers(["5511999990000"])
    finally:
        server.release_checks()
        client.stop()
        runner.join(timeout=20)
        server.close()
