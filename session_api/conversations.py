"""The read API over the message log, for CRMs and dashboards: chats, a chat's messages (paged,
newest first), one message, the outbox; giving a paused chat back to the bot, and pausing or
resuming the whole bot's replies."""

from __future__ import annotations

import re
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, abort, current_app, request

from database import LoggedMessage
from bot.connection.events import MAX_DOWNLOAD_BYTES
from bot.process.errors import SessionDocumentError, StateConflictError, first_line
from session_api.request_helpers import (
    db,
    jsonable,
    ok,
    path_session_exists,
    require_running,
    require_token,
    requested_session,
    runtime,
    session_parts,
    take_path_session,
)
from session_api.routes import MIMETYPE

bp = Blueprint("conversations", __name__)
bp.before_request(require_token)
bp.before_request(path_session_exists)
bp.url_value_preprocessor(take_path_session)

MAX_PAGE = 200
MAX_ID = 2**62
OUTBOX_STATUSES = ("queued", "sending", "failed")
# Every chat the log can hold: people, groups, LIDs, status broadcasts, newsletters.
CHAT = re.compile(r"[0-9A-Za-z.:_-]{1,64}@(s\.whatsapp\.net|g\.us|lid|broadcast|newsletter)")


@bp.get("/api/chats")
@bp.get("/api/sessions/<session_id>/chats")
def chats() -> tuple[Response, int]:
    session_id = requested_session()
    now = datetime.now(UTC)
    found = db().list_chats(session_id, _limit())
    listed = []
    for chat in found:
        listed.append(
            {
                "chat": chat.chat_jid,
                "phone": phone_of_chat(chat.chat_jid, chat.phone_jid),
                "last_message": jsonable(
                    {
                        "text": chat.last_text,
                        "direction": chat.last_direction,
                        "type": chat.last_type,
                        "at": chat.last_at,
                    }
                ),
                "unanswered": chat.unanswered,
                "paused": chat.paused_until is not None and chat.paused_until > now,
                **jsonable({"paused_until": chat.paused_until, "pause_reason": chat.pause_reason}),
            }
        )
    return ok(session_id=session_id, chats=listed)


@bp.get("/api/chats/<chat>/messages")
@bp.get("/api/sessions/<session_id>/chats/<chat>/messages")
def chat_messages(chat: str) -> tuple[Response, int]:
    session_id = requested_session()
    chat = _chat_arg(chat)
    limit = _limit()
    before = _whole_arg("before", high=MAX_ID)
    page = db().chat_messages(session_id, chat, before, limit)
    next_before = page[-1].id if len(page) == limit else None
    return ok(session_id=session_id, chat=chat, messages=[_message(m) for m in page], next_before=next_before)


@bp.get(f"/api/messages/<int(max={MAX_ID}):row_id>")
@bp.get(f"/api/sessions/<session_id>/messages/<int(max={MAX_ID}):row_id>")
def message(row_id: int) -> tuple[Response, int]:
    session_id = requested_session()
    found = db().message(session_id, row_id)
    if found is None:
        abort(404, f"no message {row_id} in session {session_id}")
    return ok(session_id=session_id, message=_message(found))


@bp.get(f"/api/messages/<int(max={MAX_ID}):row_id>/media")
@bp.get(f"/api/sessions/<session_id>/messages/<int(max={MAX_ID}):row_id>/media")
def media(row_id: int) -> Response:
    """A received file, downloaded through whatsmeow now (nothing of it is kept by zapkeep)."""
    session_id = requested_session()
    require_running(session_id)
    try:
        found = db().media_ref(session_id, row_id)
    except SessionDocumentError as exc:  # sealed with a key this daemon lacks
        abort(409, first_line(exc))
    if found is None:
        abort(404, f"message {row_id} of session {session_id} has no file")
    if found.size is not None and found.size > MAX_DOWNLOAD_BYTES:
        abort(413, f"the file is over {MAX_DOWNLOAD_BYTES // 2**20} MiB; open it on the phone")
    downloads: threading.BoundedSemaphore = current_app.extensions["zapkeep.downloads"]
    if not downloads.acquire(blocking=False):  # each holds a server thread for as long as WhatsApp takes
        abort(503, "other downloads are running; try again in a moment")
    try:
        data = runtime().gateway.download(found.media)
    except StateConflictError as exc:
        abort(409, str(exc))
    except Exception as exc:  # whatsmeow's own errors: expired on WhatsApp's servers, refused
        abort(502, f"WhatsApp gave no file: {first_line(exc)}")
    finally:
        downloads.release()
    # The sender chose the type and the name: only a well-formed type is passed on, the name quoted both ways.
    mimetype = found.mimetype if found.mimetype and MIMETYPE.fullmatch(found.mimetype) else "application/octet-stream"
    name = found.file_name or f"message-{row_id}"
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", name)
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"
    return Response(
        data,
        mimetype=mimetype,
        headers={"Content-Disposition": disposition, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


@bp.get("/api/outbox")
@bp.get("/api/sessions/<session_id>/outbox")
def outbox() -> tuple[Response, int]:
    session_id = requested_session()
    status = request.args.get("status") or None
    if status is not None and status not in OUTBOX_STATUSES:
        abort(400, f"status must be one of {', '.join(OUTBOX_STATUSES)}")
    found = db().outbox_messages(session_id, status, _limit())
    return ok(session_id=session_id, messages=[_message(m) for m in found])


@bp.post("/api/chats/<chat>/release")
@bp.post("/api/sessions/<session_id>/chats/<chat>/release")
def release(chat: str) -> tuple[Response, int]:
    """The bot answers this chat again (a hand-off or an operator's answer paused it)."""
    session_id = requested_session()
    chat = _chat_arg(chat)
    return ok(session_id=session_id, chat=chat, released=db().release_chat(session_id, chat))


@bp.get("/api/webhooks")
@bp.get("/api/sessions/<session_id>/webhooks")
def webhooks() -> tuple[Response, int]:
    """Each WEBHOOK_URL's deliveries: how far it has settled, failures, the last error (never the URL's secrets)."""
    parts = session_parts()
    dispatchers = [] if parts is None else parts.webhooks
    last = db().last_event_id(dispatchers[0].session_id) if dispatchers else 0
    endpoints = [
        {**jsonable(asdict(d.status)), "pending": max(0, last - d.status.settled_through)} for d in dispatchers
    ]
    return ok(endpoints=endpoints, last_event_id=last)


@bp.get("/api/bot")
@bp.get("/api/sessions/<session_id>/bot")
def bot_settings() -> tuple[Response, int]:
    session_id = requested_session()
    return ok(session_id=session_id, replies_paused=db().replies_paused(session_id))


@bp.post("/api/bot/pause")
@bp.post("/api/sessions/<session_id>/bot/pause")
def pause_bot() -> tuple[Response, int]:
    """No automatic replies in any chat until resumed (messages are logged; people answer)."""
    session_id = requested_session()
    db().set_replies_paused(session_id, True)
    return ok(session_id=session_id, replies_paused=True)


@bp.post("/api/bot/resume")
@bp.post("/api/sessions/<session_id>/bot/resume")
def resume_bot() -> tuple[Response, int]:
    session_id = requested_session()
    db().set_replies_paused(session_id, False)
    return ok(session_id=session_id, replies_paused=False)


def _message(row: LoggedMessage) -> dict[str, Any]:
    fields = asdict(row)
    fields["chat"] = fields.pop("chat_jid")
    fields["type"] = fields.pop("message_type")
    return jsonable(fields)


def phone_of_chat(chat_jid: str, phone_jid: str | None) -> str | None:
    """The customer's number: a phone chat's own, a LID chat's once WhatsApp told it; else None."""
    jid = phone_jid if chat_jid.endswith("@lid") else chat_jid
    if jid is None or not jid.endswith("@s.whatsapp.net"):
        return None
    return jid.split("@", 1)[0].split(":", 1)[0]


def _chat_arg(chat: str) -> str:
    if not CHAT.fullmatch(chat):
        abort(400, "chat must be a WhatsApp JID, e.g. 5511999999999@s.whatsapp.net or 123456789012345@lid")
    return chat


def _limit() -> int:
    return _whole_arg("limit", high=MAX_PAGE) or 50


def _whole_arg(name: str, *, high: int) -> int | None:
    """An optional query argument: ASCII digits, 1..high."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not 1 <= int(raw) <= high:
        abort(400, f"{name} must be a whole number from 1 to {high}")
    return int(raw)
