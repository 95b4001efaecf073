"""neonize's own events and calls through ``bot.connection.whatsapp`` and the client process, offline: the
handlers it registers, its reading of JIDs (against neonize's ``Jid2String``), LID chats, the
number check's translation and the signatures of every call the daemon makes. neonize runs in
children only (never in the test process)."""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bot.connection import events
from bot.connection.client_process import ClientCallError, ProcessClient
from tests import neonize_events as script
from tests.synthetic import create_paired_store

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9"}


@pytest.fixture
def scripted_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A round of the real client process over a paired store whose LID map knows one customer;
    yields the client (daemon side) and what it received, in order."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    conn = sqlite3.connect(store)
    with conn:  # (whatsmeow fills this from the server's usync answers and messages' sender_pn)
        conn.execute("INSERT INTO whatsmeow_lid_map (lid, pn) VALUES (?, ?)", (script.LID, script.PHONE))
    conn.close()
    received: queue.Queue[events.ClientEvent] = queue.Queue()
    client = ProcessClient(store, received.put, child=[sys.executable, "-m", "tests.neonize_events"])
    ended: list[str | None] = []
    runner = threading.Thread(target=lambda: ended.append(client.run()))
    runner.start()

    def finish() -> str | None:
        """Stop the round; how it ended."""
        client.stop()
        runner.join(timeout=30)
        assert not runner.is_alive() and len(ended) == 1
        return ended[0]

    try:
        yield client, received, finish
    finally:
        client.stop()
        runner.join(timeout=30)


def take_the_script(received: queue.Queue[events.ClientEvent]) -> list[events.ClientEvent]:
    """What reached the daemon, up to the script's last event (a group message)."""
    got = [received.get(timeout=60)]
    while not (isinstance(got[-1], events.IncomingMessage) and got[-1].message_id == "GROUP1"):
        got.append(received.get(timeout=60))
    return got


def test_neonizes_events_reach_the_daemon_as_what_they_mean(scripted_round) -> None:
    client, received, finish = scripted_round
    got = take_the_script(received)
    assert got[:12] == [
        events.QrCode(script.QR.decode()),
        events.Paired(jid=f"{script.DEVICE}:7@s.whatsapp.net", platform="android"),
        events.ConnectFailure("pairing failed: key mismatch"),
        events.Connected(),
        events.Disconnected(),
        events.KeepAliveTimeout(error_count=3),
        events.KeepAliveRestored(),
        events.TemporaryBan(code="SENT_TOO_MANY_SAME_MESSAGE", expires_in_seconds=3600),
        events.ConnectFailure("CLIENT_OUTDATED: update the client"),  # neonize's reason numbers mean nothing
        events.LoggedOut(reason="MAIN_DEVICE_GONE"),
        events.StreamReplaced(),
        events.Receipt(
            message_ids=["3EB0A"], chat=f"{script.PHONE}@s.whatsapp.net", status="read", timestamp=1700000000
        ),
    ]
    messages = {m.message_id: m for m in got[12:] if isinstance(m, events.IncomingMessage)}
    assert len(messages) == 6
    phone_chat = f"{script.PHONE}@s.whatsapp.net"
    pn = messages["PN1"]
    assert (pn.chat, pn.sender, pn.chat_phone) == (phone_chat, f"{script.PHONE}:2@s.whatsapp.net", None)
    assert (pn.push_name, pn.text, pn.from_me, pn.is_group, pn.timestamp, pn.kind) == (
        "Ana",
        "oi",
        False,
        False,
        script.TIMESTAMP,
        "text",
    )
    # LID chats: the chat stays the LID (answered there); the phone comes from the message or the LID map.
    lid = messages["LID1"]
    assert (lid.chat, lid.sender, lid.chat_phone) == (f"{script.LID}@lid", f"{script.LID}:3@lid", phone_chat)
    assert messages["LID2"].chat == f"{script.LID_WITH_ALT}@lid"
    assert messages["LID2"].chat_phone == f"{script.LID_WITH_ALT_PHONE}@s.whatsapp.net"  # (device dropped)
    assert (messages["LID3"].chat, messages["LID3"].chat_phone) == (f"{script.LID_UNKNOWN}@lid", None)
    ours = messages["LID4"]
    assert ours.from_me and ours.chat == f"{script.ANSWERED_LID}@lid"
    assert ours.chat_phone == f"{script.ANSWERED_LID_PHONE}@s.whatsapp.net"
    group = messages["GROUP1"]
    assert group.is_group and group.chat == f"{script.GROUP}@g.us" and group.chat_phone is None
    for message_id in messages:
        client.message_handled(message_id)
    # The events came after a real connect(), refused at the closed proxy (nothing left the machine).
    assert "proxyconnect tcp" in (finish() or "")
    assert received.empty()  # nothing more, nothing twice


def test_every_call_the_daemon_makes_reaches_whatsmeow_offline(scripted_round) -> None:
    """Each call runs the real client's method against the real library: whatsmeow refuses it for
    want of a connection, in its own words (a wrong signature would be a TypeError here)."""
    client, received, finish = scripted_round
    take_the_script(received)  # the round connected (and failed) before its events: the client is registered
    phone, lid = f"{script.PHONE}@s.whatsapp.net", f"{script.LID}@lid"
    calls = {
        "send_text": lambda: client.send_text(phone, "oi"),
        "send_text to a LID": lambda: client.send_text(lid, "oi"),
        "mark_read": lambda: client.mark_read(lid, f"{script.LID}:3@lid", "3EB0A"),
        "set_typing": lambda: client.set_typing(phone, True),
        "set_typing off": lambda: client.set_typing(lid, False),
        "check_numbers": lambda: client.check_numbers([script.PHONE]),
        "request_pairing_code": lambda: client.request_pairing_code(script.PHONE),
        "logout": lambda: client.logout(),
    }
    refusals = {}
    for name, call in calls.items():
        with pytest.raises(ClientCallError) as refused:
            call()
        refusals[name] = str(refused.value).split(": ", 1)[1]
    expected = {
        "send_text": "SendMessageError",
        "send_text to a LID": "SendMessageError",
        "mark_read": "MarkReadError",
        "set_typing": "SendPresenceError",
        "set_typing off": "SendPresenceError",
        "check_numbers": "IsOnWhatsAppError",
        "request_pairing_code": "PairPhoneError",
        "logout": "LogoutError",
    }
    assert {name: refusal.split(":")[0] for name, refusal in refusals.items()} == expected, refusals
    assert "websocket not connected" in refusals["logout"]  # (its request failed: see test_runtime's wipe)
    assert "proxyconnect tcp" in (finish() or "")


JIDS_SCRIPT = """
import json, logging
from bot.process import logs
logs.configure(logging.WARNING)
from bot.connection import whatsapp
from neonize.proto.Neonize_pb2 import JID, IsOnWhatsAppResponse
from neonize.utils.jid import Jid2String
from neonize.utils import build_jid
jids = [
    JID(User="5511912345678", Server="s.whatsapp.net", RawAgent=0, Device=0, Integrator=0, IsEmpty=False),
    JID(User="5511912345678", Server="s.whatsapp.net", RawAgent=0, Device=12, Integrator=0, IsEmpty=False),
    JID(User="987654321012345", Server="lid", RawAgent=0, Device=0, Integrator=0, IsEmpty=False),
    JID(User="987654321012345", Server="lid", RawAgent=0, Device=3, Integrator=0, IsEmpty=False),
    JID(User="5511912345678", Server="s.whatsapp.net", RawAgent=1, Device=2, Integrator=0, IsEmpty=False),
    JID(User="120363025246125888", Server="g.us", RawAgent=0, Device=0, Integrator=0, IsEmpty=False),
    JID(User="status", Server="broadcast", RawAgent=0, Device=0, Integrator=0, IsEmpty=False),
    JID(User="120363144038483540", Server="newsletter", RawAgent=0, Device=0, Integrator=0, IsEmpty=False),
]
round_trips = []
for jid in jids:
    text = Jid2String(jid)
    again = whatsapp.parse_jid(text)
    round_trips.append([text, again == jid, Jid2String(again)])
bare = whatsapp.parse_jid("5511912345678")
answers = [
    IsOnWhatsAppResponse(Query="+5511912345678", JID=build_jid("551112345678"), IsIn=True),  # (the server's form)
    IsOnWhatsAppResponse(Query="+5511900000000", JID=build_jid("5511900000000"), IsIn=False),
]
found = whatsapp.numbers_found(["5511900000000", "5511912345678", "5511977776666"], answers)
print(json.dumps({"round_trips": round_trips, "bare": [bare == build_jid("5511912345678")], "found": found}))
"""


def test_jids_read_back_as_neonize_writes_them_and_numbers_are_checked_in_the_order_asked() -> None:
    result = subprocess.run(
        [sys.executable, "-c", JIDS_SCRIPT], cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    for text, same, again in answer["round_trips"]:
        assert same and again == text, text  # parse_jid is Jid2String's inverse, device, agent and server kept
    assert [text for text, _, _ in answer["round_trips"]][2:5] == [
        "987654321012345@lid",
        "987654321012345:3@lid",
        "5511912345678.1:2@s.whatsapp.net",
    ]
    assert answer["bare"] == [True]  # a bare number is a phone JID
    assert answer["found"] == [
        {"number": "5511900000000", "on_whatsapp": False, "jid": None},
        {"number": "5511912345678", "on_whatsapp": True, "jid": "551112345678@s.whatsapp.net"},
        {"number": "5511977776666", "on_whatsapp": False, "jid": None},  # no answer: not on WhatsApp
    ]


STOPPED_SCRIPT = """
import ctypes, json, logging, os, sys
from bot.process import logs
logs.configure(logging.WARNING)
from bot.connection import events, whatsapp
from neonize.events import EVENT_TO_INT
from tests.neonize_events import scripted_events
got = []
client = whatsapp.NeonizeClient(sys.argv[1], got.append)
client.run()  # offline: refused at the proxy
client.stop()  # the round ends while Go still hands over a message from a LID chat without its phone
(late,) = [e for e in scripted_events() if getattr(e, "Info", None) is not None and e.Info.ID == "LID1"]
data = late.SerializeToString()
buffer = ctypes.create_string_buffer(data, len(data))
client._client.event.execute(0, ctypes.addressof(buffer), len(data), EVENT_TO_INT[type(late)])
print(json.dumps([events.to_wire(e) for e in got]), flush=True)
os._exit(0)
"""


def test_a_lid_message_handled_as_the_round_stops_is_still_handed_over(tmp_path: Path) -> None:
    """whatsmeow's LID map is asked from the message handler; after stop() neonize's lookup is a Go
    panic that ends the process, losing a message whatsmeow already acknowledged."""
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store)
    result = subprocess.run(
        [sys.executable, "-c", STOPPED_SCRIPT, str(store)],
        cwd=ROOT,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (late,) = [events.from_wire(e) for e in json.loads(result.stdout.strip().splitlines()[-1])]
    assert isinstance(late, events.IncomingMessage) and late.chat == f"{script.LID}@lid"
    assert late.chat_phone is None  # (the map is not asked once the round is stopping)
