"""The only module that imports neonize: a thin client that speaks in ``bot.connection.events`` types.

It runs in the client process (``bot.connection.client_process``, one client per connection round,
many rounds in one process), never in the daemon.

Import it only after logging is configured: ``import neonize`` calls ``logging.basicConfig``
(a no-op once the root logger has handlers). Handlers run one at a time on Go's thread, so
each one only translates the event and hands it to the sink.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from neonize.client import NewClient
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
from neonize.utils import extract_text
from neonize.proto.Neonize_pb2 import JID, ConnectFailureReason, IsOnWhatsAppResponse, MessageSource
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message, ProtocolMessage
from neonize.utils.enum import ChatPresence, ChatPresenceMedia, ClientName, ReceiptType
from neonize.utils.jid import Jid2String, JIDToNonAD

from bot.connection import events

log = logging.getLogger("bot.whatsapp")  # pinned: the name operators see in log lines

# neonize names a client in Go by its uuid (default: the store path), and a collected client's
# finalizer stops that name: every round gets a name of its own, or an ended round of a session,
# collected late, would stop the session's next one in the same process.
_ROUND_NUMBERS = itertools.count(1)


def configure_library_logging(level: int) -> None:
    """Go's log level follows this logger; left unset, Go would send DEBUG lines too."""
    logging.getLogger("neonize.utils.log").setLevel(level)
    logging.getLogger("neonize.utils.ffmpeg").setLevel(logging.ERROR)  # (audio and video sends say it themselves)


class NeonizeClient:
    """One neonize client over the local store file, for one round (``bot.connection.client_process`` runs it)."""

    def __init__(self, store_path: Path, sink: events.EventSink) -> None:
        self._client = NewClient(str(store_path), uuid=f"{store_path}#{next(_ROUND_NUMBERS)}")
        self._sink = sink
        # goneonize's GetPNFromLID has no nil check: after stop() it is a Go panic that ends the
        # process, with a message acknowledged and not yet handed over. Lookups and stop() take turns.
        self._lookups = threading.Lock()
        self._stopped = False
        self._register_handlers()

    def run(self) -> str | None:
        with self._lookups:
            if self._stopped:  # stopped before it began: whatsmeow's stop would not reach connect()
                return None
        try:
            self._client.connect()
        except Exception as exc:  # NeonizeError and friends: the reason the round ended
            return str(exc) or exc.__class__.__name__
        return None

    def stop(self) -> None:
        with self._lookups:
            self._stopped = True
        try:
            self._client.stop()
        except Exception as exc:
            log.debug("stopping the client: %s", exc)

    def send_text(self, to_jid: str, text: str) -> str:
        response = self._client.send_message(parse_jid(to_jid), text)
        return str(response.ID)

    def logout(self) -> None:
        self._client.logout()

    def request_pairing_code(self, phone: str) -> str:
        return self._client.PairPhone(phone, True, ClientName.LINUX)

    def mark_read(self, chat_jid: str, sender_jid: str, message_id: str) -> None:
        self._client.mark_read(
            message_id, chat=parse_jid(chat_jid), sender=parse_jid(sender_jid), receipt=ReceiptType.READ
        )

    def check_numbers(self, numbers: list[str]) -> list[dict[str, object]]:
        return numbers_found(numbers, self._client.is_on_whatsapp(*(f"+{n}" for n in numbers)))

    def download(self, media: str) -> str:
        data = self._client.download_any(Message.FromString(base64.b64decode(media)))
        if not data:
            raise RuntimeError("whatsmeow returned no file")
        if len(data) > events.MAX_DOWNLOAD_BYTES:
            limit = events.MAX_DOWNLOAD_BYTES // 2**20
            raise RuntimeError(f"the file is over {limit} MiB: not passed through the daemon")
        return base64.b64encode(data).decode("ascii")

    def send_media(
        self, to_jid: str, kind: str, data: str, mimetype: str, file_name: str | None, caption: str | None
    ) -> str:
        content = base64.b64decode(data)
        build = {
            "image": lambda: self._client.build_image_message(content, caption),
            "video": lambda: self._client.build_video_message(content, caption),
            "audio": lambda: self._client.build_audio_message(content),
            "document": lambda: self._client.build_document_message(
                content, caption=caption, filename=file_name, mimetype=mimetype
            ),
        }[kind]
        response = self._client.send_message(parse_jid(to_jid), build())  # uploaded by whatsmeow, then sent
        return str(response.ID)

    def set_typing(self, chat_jid: str, typing: bool) -> None:
        state = ChatPresence.CHAT_PRESENCE_COMPOSING if typing else ChatPresence.CHAT_PRESENCE_PAUSED
        self._client.send_chat_presence(parse_jid(chat_jid), state, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)

    def _register_handlers(self) -> None:
        client, sink = self._client, self._sink
        # Plain closures: neonize holds bound methods only weakly.
        client.event.qr(lambda _, data: sink(events.QrCode(data.decode(errors="replace"))))
        # Replaces neonize's print() of a bare integer on every login-status change.
        client._NewClient__onLoginStatus = lambda uuid, status: log.debug("login status %s", status)

        @client.event(PairStatusEv)
        def on_pair(_: NewClient, ev: PairStatusEv) -> None:
            if ev.Error:
                sink(events.ConnectFailure(f"pairing failed: {ev.Error}"))
            else:
                sink(events.Paired(jid=Jid2String(ev.ID), platform=ev.Platform))

        client.event(ConnectedEv)(lambda _, ev: sink(events.Connected()))
        client.event(DisconnectedEv)(lambda _, ev: sink(events.Disconnected()))
        client.event(LoggedOutEv)(lambda _, ev: sink(events.LoggedOut(reason=_reason_name(ev.Reason))))
        client.event(StreamReplacedEv)(lambda _, ev: sink(events.StreamReplaced()))
        client.event(TemporaryBanEv)(
            lambda _, ev: sink(events.TemporaryBan(code=_ban_name(ev.Code), expires_in_seconds=int(ev.Expire)))
        )
        client.event(ConnectFailureEv)(
            lambda _, ev: sink(events.ConnectFailure(reason=f"{_reason_name(ev.Reason)}: {ev.Message}".strip(": ")))
        )
        client.event(KeepAliveTimeoutEv)(lambda _, ev: sink(events.KeepAliveTimeout(error_count=ev.ErrorCount)))
        client.event(KeepAliveRestoredEv)(lambda _, ev: sink(events.KeepAliveRestored()))

        @client.event(ReceiptEv)
        def on_receipt(_: NewClient, ev: ReceiptEv) -> None:
            receipt = receipt_of(ev)
            if receipt is not None:
                sink(receipt)

        @client.event(MessageEv)
        def on_message(_: NewClient, ev: MessageEv) -> None:
            source = ev.Info.MessageSource
            sink(
                events.IncomingMessage(
                    message_id=ev.Info.ID,
                    chat=Jid2String(source.Chat),
                    sender=Jid2String(source.Sender),
                    chat_phone=self._phone_of_lid_chat(source),
                    push_name=ev.Info.Pushname,
                    text=extract_text(ev.Message) or "",
                    from_me=source.IsFromMe,
                    is_group=source.IsGroup,
                    timestamp=_unix_seconds(ev.Info.Timestamp),
                    kind=kind_of(ev.Message),
                    **media_of(ev.Message),
                )
            )

    def _phone_of_lid_chat(self, source: MessageSource) -> str | None:
        """The phone JID of a one-to-one chat WhatsApp addresses by LID (``<lid>@lid``): the
        message's alternative address (the customer's for theirs, the recipient's for ours), else
        whatsmeow's LID map (runs on Go's thread, inside connect(): never call it before, Go
        panics); None for other chats and unknown LIDs."""
        if source.Chat.Server != LID_SERVER or source.IsGroup:
            return None
        alt = source.RecipientAlt if source.IsFromMe else source.SenderAlt
        if alt.User and alt.Server == PHONE_SERVER:
            return Jid2String(JIDToNonAD(alt))
        with self._lookups:
            if self._stopped:
                return None
            try:
                known = self._client.get_pn_from_lid(JIDToNonAD(source.Chat))
            except Exception as exc:  # the map is a nicety: the chat is answered by its LID anyway
                log.debug("LID map lookup failed: %s", exc)
                return None
        return Jid2String(JIDToNonAD(known)) if known.User and known.Server == PHONE_SERVER else None


LID_SERVER = "lid"
PHONE_SERVER = "s.whatsapp.net"


def numbers_found(numbers: list[str], answers: Sequence[IsOnWhatsAppResponse]) -> list[dict[str, object]]:
    """whatsmeow's answers to IsOnWhatsApp (asked as "+<digits>"), in the order the numbers were asked;
    a number it did not answer for is not on WhatsApp."""
    by_number = {answer.Query.lstrip("+"): answer for answer in answers}
    found = []
    for number in numbers:
        answer = by_number.get(number)
        on = answer is not None and answer.IsIn
        found.append({"number": number, "on_whatsapp": on, "jid": Jid2String(answer.JID) if on else None})
    return found


def _reason_name(value: int) -> str:
    """neonize's ConnectFailureReason by name (LOGGED_OUT, CLIENT_OUTDATED...): its numbers are
    neonize's own (1-10), not whatsmeow's 401-503, and mean nothing to an operator."""
    return _enum_name(ConnectFailureReason, value)


def _ban_name(value: int) -> str:
    return _enum_name(TemporaryBanEv.TempBanReason, value)


def _enum_name(enum: object, value: int) -> str:
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:  # a newer whatsmeow's reason: its number is all there is
        return str(value)


def receipt_of(ev: ReceiptEv) -> events.Receipt | None:
    """A delivery or read receipt from the other side; None for the rest (our own devices, retries...)."""
    status = events.receipt_status(ReceiptEv.ReceiptType.Name(ev.Type))
    if status is None or ev.MessageSource.IsFromMe:
        return None
    return events.Receipt(
        message_ids=list(ev.MessageIDs),
        chat=Jid2String(ev.MessageSource.Chat),
        status=status,
        timestamp=_unix_seconds(ev.Timestamp),
    )


_WRAPPERS = ("ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2", "viewOnceMessageV2Extension")


_MEDIA = ("imageMessage", "audioMessage", "videoMessage", "documentMessage", "stickerMessage")


def unwrapped(message: Message) -> Message:
    for _ in range(3):  # disappearing and view-once messages wrap the real one
        wrapper = next((w for w in _WRAPPERS if message.HasField(w)), None)
        if wrapper is None:
            break
        message = getattr(message, wrapper).message
    if message.HasField("documentWithCaptionMessage"):
        message = message.documentWithCaptionMessage.message
    return message


def media_of(message: Message) -> dict[str, object]:
    """A file's mimetype, size and name, and what whatsmeow needs to download it (only that media
    part of the message, serialised); nothing for a message without a file."""
    message = unwrapped(message)
    field = next((f for f in _MEDIA if message.HasField(f)), None)
    if field is None:
        return {}
    part = getattr(message, field)
    only = Message()
    getattr(only, field).CopyFrom(part)
    return {
        "mimetype": part.mimetype or None,
        "size": int(part.fileLength) if 0 < part.fileLength < 2**63 else None,  # (a uint64: a sender may lie)
        "file_name": (part.fileName or None) if field == "documentMessage" else None,
        "media": base64.b64encode(only.SerializeToString()).decode("ascii"),
    }


def kind_of(message: Message) -> str:
    """text, audio, image, ..., reaction, edit, revoke (see ``events.message_kind``)."""
    message = unwrapped(message)
    fields = [descriptor.name for descriptor, _ in message.ListFields()]
    protocol_type = None
    if message.HasField("protocolMessage"):
        protocol_type = ProtocolMessage.Type.Name(message.protocolMessage.type)
    return events.message_kind(fields, protocol_type)


def parse_jid(text: str) -> JID:
    """'5511999999999:12@s.whatsapp.net' -> neonize's JID (device kept; the inverse of Jid2String)."""
    user, _, server = text.partition("@")
    user, _, device = user.partition(":")
    user, _, agent = user.partition(".")
    return JID(
        User=user,
        Server=server or "s.whatsapp.net",
        Device=int(device or 0),
        RawAgent=int(agent or 0),
        Integrator=0,
        IsEmpty=False,
    )


def _unix_seconds(value: int) -> int:
    if not value:
        return int(time.time())
    return value // 1000 if value > 10**12 else value  # neonize builds differ: seconds or milliseconds
