"""The ``session_api`` blueprint: every route needs ``Authorization: Bearer <API_TOKEN>``."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import segno
from werkzeug.exceptions import TooManyRequests
from flask import Blueprint, Response, abort, current_app, jsonify, request

from bot.messages.chatbot import UNSTORABLE
from bot.process.errors import (
    CallTimeout,
    DiskFullError,
    NotFoundError,
    SessionDocumentError,
    StateConflictError,
    first_line,
)
from bot.messages.outbox import Outbox
from bot.session.persistence import export_document, import_document
from bot.runtime import Runtime
from bot.session.sealing import Sealer
from database import FencedOut, LeaseInfo, OutgoingFile, SessionSummary, is_unavailable
from session_api.openapi import openapi_document
from session_api.request_helpers import (
    PHONE,
    InsufficientStorage,
    _iso,
    _version_arg,
    db,
    fence_for,
    json_body,
    jsonable,
    normalise_recipient,
    ok,
    require_own_session,
    require_token,
    runtime,
    session_id_from,
)

bp = Blueprint("session_api", __name__)
bp.before_request(require_token)

MAX_MESSAGE_CHARS = 4096
# Number checks at once: each holds a server thread for as long as WhatsApp's servers take, and the
# probes and the rest of the API need theirs (the client process runs checks beside the replies).
MAX_CONCURRENT_CHECKS = 2


class TooManyChecks(TooManyRequests):
    description = f"{MAX_CONCURRENT_CHECKS} number checks are running already; try again when one has answered"


@bp.post("/api/session/backup")
def backup() -> tuple[Response, int]:
    body = json_body()
    session_id = session_id_from(body)
    if "session_data" in body:
        data = body["session_data"]
        text = data if isinstance(data, str) else json.dumps(data)
        fence = fence_for(session_id)
        try:
            text = _sealer().open_export(text)  # an export sealed with this daemon's (or an old) key
            if fence is not None:  # the live session: applied as a restore, never overwritten by the client
                version = runtime().import_document(text).version
            else:
                version = import_document(db(), session_id, text)
        except SessionDocumentError as exc:
            abort(400, f"session_data refused: {exc}")
        except DiskFullError as exc:
            raise InsufficientStorage(first_line(exc)) from None
        except (FencedOut, StateConflictError) as exc:
            abort(409, first_line(exc))
        return ok(201, session_id=session_id, imported=True, version=version, applied_live=fence is not None)
    require_own_session(session_id)
    result = runtime().backup_now("api")
    if result is None:
        abort(409, f"no paired live session to back up (state {runtime().state.value})")
    return ok(
        session_id=session_id,
        written=result.written_rows > 0 or result.new_snapshot,
        written_rows=result.written_rows,
        new_snapshot=result.new_snapshot,
        version=result.version,
        checksum=result.checksum,
        size_bytes=result.size_bytes,
        rows=result.total_rows,
        duration_ms=round(result.duration_ms, 1),
    )


@bp.get("/api/session/restore")
def export() -> Response:
    session_id = session_id_from()
    version = _version_arg(request.args.get("version"))
    clear = request.args.get("clear", "").lower() in ("1", "true", "yes")
    try:
        record, document_text = export_document(db(), session_id, version)
    except NotFoundError as exc:
        abort(404, str(exc))
    except SessionDocumentError as exc:  # a stored payload that does not decrypt
        abort(409, first_line(exc))
    if not clear:
        document_text = _sealer().seal_export(document_text, record.session_id)
    head = json.dumps(
        {
            "success": True,
            "session_id": record.session_id,
            "version": record.version,
            "checksum": record.checksum,
            "size_bytes": len(document_text.encode()),
            "updated_at": _iso(record.updated_at),
        }
    )
    # The document is already JSON: splice it in rather than parse and re-encode megabytes.
    # Never kept by a browser or a proxy cache: a clear export (or any export without a key) holds
    # the private keys, and a sealed one is still the whole session.
    return Response(
        head[:-1] + ', "session_data": ' + document_text + "}",
        mimetype="application/json",
        headers={"Cache-Control": "no-store"},
    )


@bp.post("/api/session/restore")
def restore() -> tuple[Response, int]:
    body = json_body()
    session_id = session_id_from(body)
    require_own_session(session_id)
    version = _version_arg(body.get("version"))
    try:
        outcome = runtime().restore(version)
    except NotFoundError as exc:
        abort(404, str(exc))
    except DiskFullError as exc:
        raise InsufficientStorage(first_line(exc)) from None
    except (StateConflictError, SessionDocumentError) as exc:
        abort(409, first_line(exc))
    return ok(**asdict(outcome), state=runtime().state.value)


@bp.get("/api/session/status")
def status() -> tuple[Response, int]:
    wanted = request.args.get("session_id")
    if wanted is not None:
        session_id_from()  # validates
    stored = _stored_view(runtime().config.session_id)
    live = runtime().status()  # (after: it says what the reads just found of the database)
    away = live.database_unreachable_since
    ids = sorted(set(stored.sessions) | {live.session_id}) if stored is not None else [live.session_id]
    sessions = []
    for session_id in ids:
        entry: dict[str, Any] = {"session_id": session_id}
        if session_id == live.session_id:
            # What this process knows answers also while the database is away, and says so.
            entry.update(jsonable(asdict(live)))
            entry["database"] = "reachable" if away is None else f"unreachable since {_iso(away)}"
            entry["history"] = None if stored is None else stored.history
        lease = None if stored is None else stored.leases.get(session_id)
        held = lease is not None and lease.owner_id is not None and lease.expires_in_seconds > 0
        if session_id != live.session_id:
            # Another daemon's session: what the database says of it.
            entry.update(state="running_elsewhere" if held else "not_running", connected=None)
        entry["lease"] = None if lease is None else {**asdict(lease), "held": held}
        summary = None if stored is None else stored.sessions.get(session_id)
        entry["stored"] = None if summary is None else jsonable(asdict(summary))
        sessions.append(entry)
    if wanted is not None:
        match = [s for s in sessions if s["session_id"] == wanted]
        if not match:
            abort(404, f"no session {wanted}")
        return ok(session=match[0])
    return ok(sessions=sessions)


@dataclass(frozen=True)
class StoredView:
    sessions: dict[str, SessionSummary]
    history: list[dict[str, Any]]  # of this daemon's session
    leases: dict[str, LeaseInfo | None]


def _stored_view(own_session: str) -> StoredView | None:
    """What the database says of the sessions; None while it is unreachable (never waited for)."""
    if db().unreachable_since is not None:
        return None
    try:
        sessions = {s.session_id: s for s in db().list_sessions()}
        history = [jsonable(asdict(h)) for h in db().list_history(own_session)]
        leases = {session_id: db().lease(session_id) for session_id in sorted(set(sessions) | {own_session})}
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        return None
    return StoredView(sessions, history, leases)


@bp.delete("/api/session/delete")
def delete() -> tuple[Response, int]:
    session_id = session_id_from()
    purge = request.args.get("purge", "").lower() in ("1", "true", "yes")
    try:
        deleted = db().delete_session(session_id, keep_history=not purge, fence=fence_for(session_id))
    except FencedOut as exc:
        abort(409, str(exc))
    if not deleted:
        abort(404, f"no stored session {session_id}")
    note = None
    if session_id == runtime().config.session_id and runtime().status().connected:
        note = "this daemon is still connected and will store the session again; POST /api/session/logout to unlink"
    return ok(session_id=session_id, deleted=True, history_purged=purge, note=note)


@bp.get("/api/session/qr")
def qr() -> Response | tuple[Response, int]:
    session_id = session_id_from()
    require_own_session(session_id)
    code = runtime().qr_code()
    if code is None:
        abort(404, f"no QR code pending (state {runtime().state.value})")
    png = io.BytesIO()
    segno.make_qr(code).save(png, kind="png", scale=8, border=4)
    if request.accept_mimetypes.best_match(["application/json", "image/png"]) == "image/png":
        return Response(png.getvalue(), mimetype="image/png", headers={"Cache-Control": "no-store"})
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return ok(session_id=session_id, qr=code, image=image, state=runtime().state.value)


@bp.post("/api/session/pairing-code")
def pairing_code() -> tuple[Response, int]:
    """Link by phone number instead of scanning: the code to type in WhatsApp, while a QR is pending."""
    body = json_body(required=True)
    session_id = session_id_from(body)
    require_own_session(session_id)
    phone = body.get("phone")
    digits = re.sub(r"[\s()+-]", "", phone) if isinstance(phone, str) else ""
    if not PHONE.fullmatch(digits):
        abort(400, "phone must be a phone number with country code, 10-15 digits")
    try:
        code = runtime().request_pairing_code(digits)
    except StateConflictError as exc:
        abort(409, str(exc))
    except Exception as exc:  # neonize's own errors (the servers refused, the dial failed)
        abort(502, f"WhatsApp gave no pairing code: {first_line(exc)}")
    return ok(session_id=session_id, phone=digits, pairing_code=code)


@bp.post("/api/session/logout")
def logout() -> tuple[Response, int]:
    session_id = session_id_from(json_body())
    require_own_session(session_id)
    try:
        unlinked = runtime().logout()
    except StateConflictError as exc:
        abort(409, str(exc))
    return ok(session_id=session_id, unlinked_remotely=unlinked, state=runtime().state.value)


@bp.post("/api/session/reconnect")
def reconnect() -> tuple[Response, int]:
    return _connection_action(Runtime.reconnect)


@bp.post("/api/session/stop")
def stop_connection() -> tuple[Response, int]:
    return _connection_action(Runtime.stop_connection)


@bp.post("/api/session/start")
def start_connection() -> tuple[Response, int]:
    session_id = session_id_from(json_body())
    require_own_session(session_id)
    try:
        started = runtime().start_connection()
    except StateConflictError as exc:
        abort(409, str(exc))
    if started:
        return ok(202, session_id=session_id, state=runtime().state.value)
    live = runtime().status()  # already connected: left alone
    return ok(session_id=session_id, state=live.state, connected=live.connected, phone=live.phone)


def _connection_action(action: Callable[[Runtime], None]) -> tuple[Response, int]:
    session_id = session_id_from(json_body())
    require_own_session(session_id)
    try:
        action(runtime())
    except StateConflictError as exc:
        abort(409, str(exc))
    return ok(202, session_id=session_id, state=runtime().state.value)


@bp.post("/api/messages/send")
def send() -> tuple[Response, int]:
    """JSON ``{"to", "message"}``; or multipart/form-data with ``to``, ``file`` and an optional
    ``caption`` (an image, document, audio or video, sent through the outbox like a text)."""
    multipart = request.mimetype == "multipart/form-data"
    if multipart:
        to, text = request.form.get("to"), request.form.get("caption", "")
    else:
        body = json_body(required=True)
        to, text = body.get("to"), body.get("message")
    if not isinstance(to, str) or not (jid := normalise_recipient(to)):
        abort(400, "to must be a phone number with country code (10-15 digits) or a WhatsApp JID")
    file = _uploaded_file() if multipart else None
    if not isinstance(text, str) or len(text) > MAX_MESSAGE_CHARS or (file is None and not text.strip()):
        abort(400, f"message must be a non-empty text of at most {MAX_MESSAGE_CHARS} characters")
    if UNSTORABLE.search(text):
        abort(400, "message must not hold NUL or lone surrogates")
    require_own_session(runtime().config.session_id)
    outbox: Outbox | None = current_app.extensions["zapkeep.outbox"]
    if file is not None and outbox is None:
        abort(409, "files are sent through the outbox, which this daemon does not run")
    if outbox is None:
        try:
            message_id = runtime().gateway.send_text(jid, text)
        except StateConflictError as exc:
            abort(409, str(exc))
        return ok(to=jid, message_id=message_id, status="sent")
    if runtime().status().jid is None:
        abort(
            409,
            f"session {runtime().config.session_id} is not paired ({runtime().state.value}); "
            "nothing could deliver the message",
        )
    queued = outbox.enqueue(jid, text, reason="api", expires_in=current_app.config["REPLY_EXPIRY"], file=file)
    return ok(202, to=jid, id=queued, status="queued", connected=runtime().gateway.is_connected())


MIMETYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,128}")
MAX_FILE_BYTES = 32 * 1024 * 1024  # (WhatsApp's own limits: 16 MB for media, 100 MB+ for documents)
FILE_KINDS = ("image", "document", "audio", "video")


def _uploaded_file() -> OutgoingFile:
    upload = request.files.get("file")
    if upload is None:
        abort(400, "a multipart send needs a file field")
    data = upload.read(MAX_FILE_BYTES + 1)
    if not data or len(data) > MAX_FILE_BYTES:
        abort(400, f"file must hold 1 byte to {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    mimetype = upload.mimetype or "application/octet-stream"
    if not MIMETYPE.fullmatch(mimetype):
        abort(400, "the file's Content-Type must be a media type such as image/png")
    kind = request.form.get("type") or next(
        (k for k in ("image", "audio", "video") if mimetype.startswith(f"{k}/")), "document"
    )
    if kind not in FILE_KINDS:
        abort(400, f"type must be one of {', '.join(FILE_KINDS)}")
    if kind in ("audio", "video") and shutil.which("ffprobe") is None:
        # neonize probes audio and video with ffmpeg's tools before it sends them.
        abort(409, "audio and video need ffmpeg on this host (apt-get install ffmpeg); send it as a document")
    name = upload.filename or None
    if name is not None and (UNSTORABLE.search(name) or len(name) > 255):
        abort(400, "the file's name must be at most 255 characters, without NUL or lone surrogates")
    return OutgoingFile(kind, data, mimetype, name)


MAX_NUMBERS = 50


@bp.post("/api/contacts/check")
def check_contacts() -> tuple[Response, int]:
    """Which phone numbers are on WhatsApp (whatsmeow's IsOnWhatsApp), asked of WhatsApp's servers."""
    numbers = json_body(required=True).get("numbers")
    if not isinstance(numbers, list) or not 1 <= len(numbers) <= MAX_NUMBERS:
        abort(400, f"numbers must be a list of 1 to {MAX_NUMBERS} phone numbers")
    jids = [normalise_recipient(n) if isinstance(n, str) else None for n in numbers]
    if any(jid is None or not jid.endswith("@s.whatsapp.net") for jid in jids):
        abort(400, "each number must be a phone number with country code (10-15 digits)")
    require_own_session(runtime().config.session_id)
    digits = [jid.split("@", 1)[0] for jid in jids if jid is not None]
    checks: threading.BoundedSemaphore = current_app.extensions["zapkeep.number_checks"]
    if not checks.acquire(blocking=False):
        raise TooManyChecks(retry_after=5)
    try:
        contacts = runtime().gateway.check_numbers(digits)
    except StateConflictError as exc:
        abort(409, str(exc))
    except CallTimeout as exc:
        abort(504, f"WhatsApp did not answer the number check in time ({first_line(exc)}); try again later")
    except Exception as exc:  # neonize's own errors (the servers refused, the connection dropped)
        abort(502, f"WhatsApp gave no answer: {first_line(exc)}")
    finally:
        checks.release()
    return ok(contacts=contacts)


@bp.get("/api/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


def _sealer() -> Sealer:
    """Exports are sealed, and sealed exports opened, with the daemon's configured keys."""
    return Sealer.from_config(runtime().config)
