"""What every admin API blueprint shares: the token hook, the request parsing (JSON bodies,
session ids, versions, recipients), the answers (``ok``, ``jsonable``) and the HTTP errors."""

from __future__ import annotations

import hmac
import json
import math
import re
from datetime import datetime
from typing import Any

from werkzeug.exceptions import HTTPException, TooManyRequests
from flask import Response, abort, current_app, g, jsonify, request

from bot.process.config import Config, is_valid_session_id
from bot.messages.chatbot import UNSTORABLE
from bot.process.errors import first_line
from bot.runtime import Runtime
from bot.session.state import State
from database import Database, Fence
from session_api.console_auth import signed_in_browser
from session_api.hosting import SessionHost, SessionParts

PHONE = re.compile(r"[0-9]{10,15}")  # ASCII only: \d would take Arabic-Indic or fullwidth digits
JID = re.compile(r"[0-9A-Za-z.:_-]{1,64}@(s\.whatsapp\.net|g\.us|lid)")


def host() -> SessionHost:
    return current_app.extensions["zapkeep.host"]


def config() -> Config:
    """The daemon's configuration (its token, passwords, keys: the same for every session)."""
    return host().config


def requested_session() -> str:
    """The request's session, resolved once: the path's ``<session_id>``, else ``session_id`` in a
    POST's body (JSON or form) or in the query, else the daemon's default session. An empty or
    malformed one is an error: ``?session_id=`` must never mean "the default session" to a DELETE."""
    if "session_id" in g:
        return g.session_id
    if "path_session" in g:
        value: Any = g.path_session
    else:
        source: dict[str, Any] = {}
        if request.method == "POST" and request.mimetype == "multipart/form-data":
            request.get_data(cache=True, parse_form_data=False)  # kept: a command stores the body as sent
            source = dict(request.form)
        elif request.method == "POST":
            source = json_body()
        if "session_id" in source:
            value = source["session_id"]
        else:
            value = request.args.get("session_id", host().default_session_id)
    if not isinstance(value, str) or not is_valid_session_id(value):
        abort(400, "session_id must be 1-100 letters, digits, '-' or '_'")
    g.session_id = value
    return value


def take_path_session(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """A blueprint's URL value preprocessor: ``/api/sessions/<session_id>/...`` names the session,
    and the view (the same one as the route without it) finds it in ``requested_session()``."""
    if values is not None and "session_id" in values:
        g.path_session = values.pop("session_id")


def session_parts() -> SessionParts | None:
    """The requested session's parts when it is hosted here."""
    return host().services(requested_session())


def runtime() -> Runtime:
    """The requested session's runtime; 409 when this daemon does not host it (views that act on
    the live client call ``require_running`` first, which says more)."""
    parts = session_parts()
    if parts is None:
        abort(409, f"session {requested_session()} is not running on this daemon")
    return parts.runtime


def db() -> Database:
    return current_app.extensions["zapkeep.db"]


class TooManyWrongTokens(TooManyRequests):
    description = "too many wrong tokens from this address; wait and try again"


class InsufficientStorage(HTTPException):
    """507 (werkzeug has no class for it): the disk has no room for what was asked."""

    code = 507
    description = "no space left on the disk"


def require_token() -> None:
    """The bearer token, or a signed-in console (whose pages call this API from the browser)."""
    if signed_in_browser():
        return
    require_one_of(current_app.config["API_TOKEN"])


def require_one_of(*tokens: str | None) -> None:
    """A bearer token equal to one of these, else 401 (and wrong tokens are slowed down)."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer":
        matches = [hmac.compare_digest(given.strip().encode(), t.encode()) for t in tokens if t]
        if any(matches):
            return
    wait = current_app.extensions["zapkeep.failed_attempts"].fail(request.remote_addr or "-")
    if wait is not None:
        raise TooManyWrongTokens(retry_after=math.ceil(wait))
    abort(401, "missing or wrong bearer token")


def ok(http_status: int = 200, /, **payload: Any) -> tuple[Response, int]:
    return jsonify(success=True, **payload), http_status


def json_body(required: bool = False) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw:
        if required:
            abort(400, "a JSON object body is required")
        return {}
    body = strict_json(raw)
    if not isinstance(body, dict):
        abort(400, "the body must be a JSON object")
    return body


def strict_json(raw: bytes) -> Any:
    """JSON as the database can store it: UTF-8, no NaN or Infinity (nor 1e400), not nested
    deeper than Python can follow, no NUL and no lone surrogate in any string."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError:
        abort(400, "the body is not UTF-8 text")
    except RecursionError:
        abort(400, "the JSON is nested too deeply")
    except ValueError as exc:
        abort(400, f"the body is not valid JSON: {first_line(exc)}")
    pending = [value]
    while pending:  # iterative: a deep document must not exhaust the stack here either
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and UNSTORABLE.search(item):
            abort(400, "a text in the body holds a NUL character or a lone surrogate")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text[:20]} is out of range")
    return number


def fence_for(session_id: str) -> Fence | None:
    """Writes of a session hosted here carry its lease; a standby daemon may not write it. Other
    sessions (no live owner: writes for a live owner elsewhere went to it as a command) are
    written as an admin's (unfenced) operation."""
    parts = host().services(session_id)
    if parts is None:
        return None
    fence = parts.runtime.fence
    if fence is None:
        abort(
            409,
            f"this daemon does not own session {session_id} right now ({parts.runtime.state.value}); "
            "use the owner's API",
        )
    return fence


def require_running(session_id: str) -> None:
    """Operations on the live client: a session hosted here, once it has booted."""
    parts = host().services(session_id)
    if parts is None:
        abort(409, f"session {session_id} is not running on this daemon")
    if parts.runtime.state is State.STARTING:
        abort(503, "the session is starting; try again in a few seconds")


def require_known(session_id: str) -> None:
    """404 unless the session is hosted here, or registered or stored in the database."""
    if host().services(session_id) is None and session_id not in db().session_ids():
        abort(404, f"no session {session_id}")


def path_session_exists() -> None:
    """A blueprint's hook, after the token's: a session named in the path must exist (404)."""
    if "path_session" in g:
        require_known(requested_session())


def normalise_recipient(value: str) -> str | None:
    """A phone number (+, spaces, dots, dashes and parentheses allowed), a JID, or the ``@c.us``
    form of whatsapp-web.js-based systems, as whatsmeow's JID."""
    value = value.strip()
    if value.endswith("@c.us"):
        value = value.removesuffix("@c.us") + "@s.whatsapp.net"
    if JID.fullmatch(value):
        return value
    digits = re.sub(r"[\s()+.-]", "", value)
    return f"{digits}@s.whatsapp.net" if PHONE.fullmatch(digits) else None


MAX_VERSION = 2**31 - 1  # history versions are INTEGER columns


def _version_arg(value: Any) -> int | None:
    """A history version: a JSON integer or a string of ASCII digits, 1..2^31-1 (1.5 is not 1)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,10}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        abort(400, f"version must be a whole number from 1 to {MAX_VERSION}")
    return value


def _iso(value: datetime) -> str:
    return value.isoformat() if value.tzinfo else value.isoformat() + "Z"


def jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: _iso(value) if isinstance(value, datetime) else value for key, value in fields.items()}
