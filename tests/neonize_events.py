"""A client round of the real ``bot.connection.whatsapp.NeonizeClient`` in ``bot.connection.client_process``, fed
neonize's own protobuf events offline (no machine here reaches WhatsApp).

The round connects for real (and fails at the closed proxy of ``HTTPS_PROXY``: whatsmeow keeps
the client registered, its store answers), then hands neonize's dispatcher the events Go would
hand it: each one serialised as Go serialises it, through ``Event.execute`` (the callback Go
calls) and the QR callback, to the handlers ``NeonizeClient`` registered. What reaches the daemon
is what the daemon would see. The calls the daemon makes then run the real client's methods
against the real library, offline; an error comes back as ``<neonize's exception type>: <its
message>``, so a wrong signature (a ``TypeError``) cannot pass for an offline refusal.

    python -m tests.neonize_events LOG_LEVEL      (started by tests/test_neonize_events.py)
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")  # connect() must never leave the machine

from bot.connection import client_process, events

# The customers of the script (tests/test_neonize_events.py checks what each becomes).
PHONE = "5511912345678"
LID = "987654321012345"  # written into the store's whatsmeow_lid_map by the test, with PHONE
LID_WITH_ALT = "111222333444555"
LID_WITH_ALT_PHONE = "5511955554444"
LID_UNKNOWN = "999888777666555"
ANSWERED_LID = "444555666777888"  # our own message in a LID chat: the recipient's phone is RecipientAlt
ANSWERED_LID_PHONE = "5511933332222"
GROUP = "120363025246125888"
DEVICE = "5511987654321"
QR = b"2@ref,bm9pc2U=,aWRlbnRpdHk=,YWR2"
TIMESTAMP = 1_700_000_000


def scripted_events() -> list[object]:
    """neonize's protobuf events, filled as goneonize fills them."""
    from neonize.events import (
        ConnectedEv,
        ConnectFailureEv,
        DisconnectedEv,
        KeepAliveRestoredEv,
        KeepAliveTimeoutEv,
        LoggedOutEv,
        MessageEv,
        PairStatusEv,
        ReceiptEv,
        StreamReplacedEv,
        TemporaryBanEv,
    )
    from neonize.proto.Neonize_pb2 import AddressingMode, ConnectFailureReason, MessageInfo, MessageSource
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import ExtendedTextMessage, Message
    from neonize.utils import build_jid

    def jid(user: str, server: str = "s.whatsapp.net", device: int = 0) -> object:
        built = build_jid(user, server)
        built.Device = device
        return built

    def message(
        message_id: str,
        chat: object,
        sender: object,
        text: str,
        *,
        from_me: bool = False,
        group: bool = False,
        lid: bool = False,
        sender_alt: object | None = None,
        recipient_alt: object | None = None,
    ) -> object:
        source = MessageSource(
            Chat=chat,
            Sender=sender,
            IsFromMe=from_me,
            IsGroup=group,
            AddressingMode=AddressingMode.LID if lid else AddressingMode.PN,
        )
        if sender_alt is not None:
            source.SenderAlt.CopyFrom(sender_alt)
        if recipient_alt is not None:
            source.RecipientAlt.CopyFrom(recipient_alt)
        info = MessageInfo(MessageSource=source, ID=message_id, Pushname="Ana", Timestamp=TIMESTAMP, Type="text")
        return MessageEv(Info=info, Message=Message(extendedTextMessage=ExtendedTextMessage(text=text)))

    pairing = PairStatusEv.PStatus
    scripted = [
        PairStatusEv(ID=jid(DEVICE, device=7), Platform="android", Status=pairing.Value("SUCCESS")),
        PairStatusEv(ID=jid(""), Status=pairing.Value("ERROR"), Error="key mismatch"),
        ConnectedEv(status=True),
        DisconnectedEv(status=True),
        KeepAliveTimeoutEv(ErrorCount=3, LastSuccess=TIMESTAMP),
        KeepAliveRestoredEv(),
        TemporaryBanEv(Code=TemporaryBanEv.TempBanReason.Value("SENT_TOO_MANY_SAME_MESSAGE"), Expire=3600),
        ConnectFailureEv(Reason=ConnectFailureReason.Value("CLIENT_OUTDATED"), Message="update the client"),
        LoggedOutEv(OnConnect=False, Reason=ConnectFailureReason.Value("MAIN_DEVICE_GONE")),
        StreamReplacedEv(),
        ReceiptEv(
            MessageSource=MessageSource(Chat=jid(PHONE), Sender=jid(PHONE, device=2), IsFromMe=False, IsGroup=False),
            MessageIDs=["3EB0A"],
            Timestamp=TIMESTAMP,
            Type=ReceiptEv.ReceiptType.Value("READ"),
        ),
        message("PN1", jid(PHONE), jid(PHONE, device=2), "oi"),
        message("LID1", jid(LID, "lid"), jid(LID, "lid", device=3), "oi, do LID", lid=True),
        message(
            "LID2",
            jid(LID_WITH_ALT, "lid"),
            jid(LID_WITH_ALT, "lid", device=1),
            "oi, com telefone",
            lid=True,
            sender_alt=jid(LID_WITH_ALT_PHONE, device=1),
        ),
        message("LID3", jid(LID_UNKNOWN, "lid"), jid(LID_UNKNOWN, "lid"), "quem sou eu", lid=True),
        message(
            "LID4",
            jid(ANSWERED_LID, "lid"),
            jid(DEVICE, "s.whatsapp.net", device=7),
            "aqui é a Maria",
            from_me=True,
            lid=True,
            recipient_alt=jid(ANSWERED_LID_PHONE),
        ),
        message("GROUP1", jid(GROUP, "g.us"), jid(PHONE, device=2), "oi grupo", group=True),
    ]
    return [as_go_fills_it(event) for event in scripted]


def as_go_fills_it(event: object) -> object:
    """goneonize sets every field of its (proto2, all required) messages: what Go left unset
    arrives as its zero value, an absent JID as an empty one (User "", Server "")."""
    while missing := event.FindInitializationErrors():
        for path in missing:
            *parents, name = path.split(".")
            holder = event
            for parent in parents:
                holder = getattr(holder, parent)
            field = holder.DESCRIPTOR.fields_by_name[name]
            if field.message_type is not None:
                getattr(holder, name).SetInParent()
            else:
                setattr(holder, name, getattr(holder, name))
    return event


class ScriptedRound:
    """``NeonizeClient`` whose round, after its real (failing) connect, receives the script's events."""

    def __init__(self, store_path: Path, sink: events.EventSink) -> None:
        from bot.connection import whatsapp

        self.real = whatsapp.NeonizeClient(store_path, sink)
        self._stopped = threading.Event()

    def run(self) -> str | None:
        from neonize.events import EVENT_TO_INT

        error = self.real.run()  # offline: fails at the proxy, and the client stays registered in Go
        neonize_client = self.real._client
        qr = ctypes.create_string_buffer(QR)
        neonize_client._NewClient__onQr(0, ctypes.addressof(qr))  # as Go calls it with a new code
        neonize_client._NewClient__onLoginStatus(0, 1)  # (neonize's own would print a bare "1")
        for event in scripted_events():
            data = event.SerializeToString()
            buffer = ctypes.create_string_buffer(data, len(data))
            neonize_client.event.execute(0, ctypes.addressof(buffer), len(data), EVENT_TO_INT[type(event)])
        self._stopped.wait()
        return error

    def stop(self) -> None:
        self._stopped.set()
        self.real.stop()

    def message_handled(self, message_id: str) -> None:
        pass  # (the client process's window takes it)

    def __getattr__(self, name: str) -> Callable[..., object]:
        """The daemon's calls (``client_process.CALLS``), on the real client; an error names its type."""
        if name not in client_process.CALLS:
            raise AttributeError(name)
        method = getattr(self.real, name)

        def call(*args: object) -> object:
            try:
                return method(*args)
            except Exception as exc:
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from None

        return call


if __name__ == "__main__":
    client_process.run_child(sys.argv[1:], ScriptedRound)  # never returns
