"""The ``session_api`` blueprint: every route needs ``Authorization: Bearer <API_TOKEN>``."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict

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
from bot.session.persistence import export_document, import_document
from bot.runtime import Runtime
from bot.session.sealing import Sealer
from database import FencedOut, OutgoingFile
from session_api.commands import through_owner
from session_api.openapi import openapi_document
from session_api.request_helpers import (
    PHONE,
    InsufficientStorage,
    _iso,
    _version_arg,
    config,
    db,
    fence_for,
    json_body,
    normalise_recipient,
    ok,
    path_session_exists,
    require_known,
    require_running,
    require_token,
    requested_session,
    runtime,
    session_parts,
    take_path_session,
)

bp = Blueprint("session_api", __name__)
bp.before_request(require_token)
bp.before_request(path_session_exists)
bp.url_value_preprocessor(take_path_session)

MAX_MESSAGE_CHARS = 4096
# Number checks at once: each holds a server thread for as long as WhatsApp's servers take, and the
# probes and the rest of the API need theirs (the client process runs checks beside the replies).
MAX_CONCURRENT_CHECKS = 2


class TooManyChecks(TooManyRequests):
    description = f"{MAX_CONCURRENT_CHECKS} number checks are running already; try again when one has answered"


@bp.post("/api/session/backup")
@bp.post("/api/sessions/<session_id>/backup")
@through_owner
def backup() -> tuple[Response, int]:
    body = json_body()
    session_id = requested_session()
    if "session_data" in body:
        data = body["session_data"]
        text = data if isinstance(data, str) else json.dumps(data)
        fence = fence_for(session_id)
        try:
            text = _sealer().open_export(text)  # an export sealed with this daemon's (or an old) key
            if fence is not None:  # a live session: applied as a restore, never overwritten by the client
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
    require_running(session_id)
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
@bp.get("/api/sessions/<session_id>/restore")
def export() -> Response:
    session_id = requested_session()
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
@bp.post("/api/sessions/<session_id>/restore")
@through_owner
def restore() -> tuple[Response, int]:
    body = json_body()
    session_id = requested_session()
    require_running(session_id)
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


@bp.delete("/api/session/delete")
@through_owner
def delete() -> tuple[Response, int]:
    """The stored copy only (``DELETE /api/sessions/<id>`` removes the session); a live owner does
    it (a request here for a session owned elsewhere went to it as a command) and says it will
    store the session again at its next change."""
    session_id = requested_session()
    purge = request.args.get("purge", "").lower() in ("1", "true", "yes")
    fence = fence_for(session_id)
    try:
        deleted = db().delete_session(session_id, keep_history=not purge, fence=fence)
    except FencedOut as exc:
        abort(409, str(exc))
    if not deleted:
        abort(404, f"no stored session {session_id}")
    note = None
    if fence is not None:
        live = runtime()
        _stored_copy_deleted(live)
        if live.status().jid is not None:
            note = (
                f"session {session_id} runs on this daemon, which will store it again at its next change; "
                "POST /api/session/logout to unlink it"
            )
    return ok(session_id=session_id, deleted=True, history_purged=purge, note=note)


def _stored_copy_deleted(live: Runtime) -> None:
    """The mirror learns that its rows are gone: the next change stores the whole session again,
    rather than a reconciliation "repairing" rows that change capture never missed."""
    told = getattr(live, "stored_copy_deleted", None)  # (the runtime's side lands with issue 25's host)
    if told is not None:
        told()


@bp.get("/api/session/qr")
@bp.get("/api/sessions/<session_id>/qr")
@through_owner
def qr() -> Response | tuple[Response, int]:
    session_id = requested_session()
    require_running(session_id)
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
@bp.post("/api/sessions/<session_id>/pairing-code")
@through_owner
def pairing_code() -> tuple[Response, int]:
    """Link by phone number instead of scanning: the code to type in WhatsApp, while a QR is pending."""
    body = json_body(required=True)
    session_id = requested_session()
    require_running(session_id)
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
@bp.post("/api/sessions/<session_id>/logout")
@through_owner
def logout() -> tuple[Response, int]:
    session_id = requested_session()
    require_running(session_id)
    try:
        unlinked = runtime().logout()
    except StateConflictError as exc:
        abort(409, str(exc))
    return ok(session_id=session_id, unlinked_remotely=unlinked, state=runtime().state.value)


@bp.post("/api/session/reconnect")
@bp.post("/api/sessions/<session_id>/reconnect")
@through_owner
def reconnect() -> tuple[Response, int]:
    return _connection_action(Runtime.reconnect)


@bp.post("/api/session/stop")
@bp.post("/api/sessions/<session_id>/stop")
@through_owner
def stop_connection() -> tuple[Response, int]:
    return _connection_action(Runtime.stop_connection)


@bp.post("/api/session/start")
@bp.post("/api/sessions/<session_id>/start")
@through_owner
def start_connection() -> tuple[Response, int]:
    session_id = requested_session()
    require_running(session_id)
    try:
        started = runtime().start_connection()
    except StateConflictError as exc:
        abort(409, str(exc))
    if started:
        return ok(202, session_id=session_id, state=runtime().state.value)
    live = runtime().status()  # already connected: left alone
    return ok(session_id=session_id, state=live.state, connected=live.connected, phone=live.phone)


def _connection_action(action: Callable[[Runtime], None]) -> tuple[Response, int]:
    session_id = requested_session()
    require_running(session_id)
    try:
        action(runtime())
    except StateConflictError as exc:
        abort(409, str(exc))
    return ok(202, session_id=session_id, state=runtime().state.value)


@bp.post("/api/messages/send")
@bp.post("/api/sessions/<session_id>/send")
@through_owner
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
    session_id = requested_session()
    require_known(session_id)
    require_running(session_id)
    outbox = session_parts().outbox  # type: ignore[union-attr]  # (hosted: require_running)
    if file is not None and outbox is None:
        abort(409, "files are sent through the outbox, which this daemon does not run")
    if outbox is None:
        try:
            message_id = runtime().gateway.send_text(jid, text)
        except StateConflictError as exc:
            abort(409, str(exc))
        return ok(to=jid, message_id=message_id, status="sent")
    if runtime().status().jid is None:
        abort(409, f"session {session_id} is not paired ({runtime().state.value}); nothing could deliver the message")
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
@bp.post("/api/sessions/<session_id>/contacts/check")
@through_owner
def check_contacts() -> tuple[Response, int]:
    """Which phone numbers are on WhatsApp (whatsmeow's IsOnWhatsApp), asked of WhatsApp's servers."""
    numbers = json_body(required=True).get("numbers")
    if not isinstance(numbers, list) or not 1 <= len(numbers) <= MAX_NUMBERS:
        abort(400, f"numbers must be a list of 1 to {MAX_NUMBERS} phone numbers")
    jids = [normalise_recipient(n) if isinstance(n, str) else None for n in numbers]
    if any(jid is None or not jid.endswith("@s.whatsapp.net") for jid in jids):
        abort(400, "each number must be a phone number with country code (10-15 digits)")
    require_running(requested_session())
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
    return Sealer.from_config(config())
