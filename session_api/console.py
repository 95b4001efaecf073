"""The operator's web console at ``/``: sign in, the sessions page (every number: create, remove),
the session page (state, pairing, actions) and the messages page of one session (``?session=ID``,
else the daemon's default session). Pages are Jinja templates; their script (``static/console.js``)
calls the JSON API (``/api/sessions/<id>/...``) from the signed-in browser and listens to the
session's event stream. No build step, no CDN."""

from __future__ import annotations

import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote

from flask import Blueprint, Response, abort, current_app, redirect, render_template, request

from bot.process.config import is_valid_session_id
from session_api import console_auth
from session_api.console_words import language, words
from session_api.guard import FailedAttempts, FailureBudget
from session_api.request_helpers import config, host

bp = Blueprint(
    "console", __name__, template_folder="templates", static_folder="static", static_url_path="/console/static"
)

SIGN_IN_BUDGET = FailureBudget(burst=5, refill_seconds=10.0)  # then one attempt every 10 s
# And from every address together (many addresses must not multiply the guesses): 20 at once,
# then one every 3 s; an admin waits that long at most once the guessing stops.
SIGN_IN_OVERALL_BUDGET = FailureBudget(burst=20, refill_seconds=3.0, addresses=1)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def sign_in_attempts(clock: Callable[[], float] = time.monotonic) -> FailedAttempts:
    return FailedAttempts(SIGN_IN_BUDGET, clock, overall=SIGN_IN_OVERALL_BUDGET)


@bp.after_request
def harden(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.get("/")
def home() -> Response:
    session = console_auth.current_session()
    if session is None:
        return _sign_in_page()
    return _page("session.html", session)


@bp.get("/console/messages")
def messages() -> Response:
    session = console_auth.current_session()
    if session is None:
        return redirect("/", code=303)  # type: ignore[return-value]
    return _page("messages.html", session)


@bp.get("/console/sessions")
def sessions() -> Response:
    session = console_auth.current_session()
    if session is None:
        return redirect("/", code=303)  # type: ignore[return-value]
    return _page("sessions.html", session)


@bp.post("/console/sign-in")
def sign_in() -> Response:
    form_token = request.form.get("csrf_token", "")
    cookie_token = request.cookies.get(console_auth.SIGN_IN_COOKIE, "")
    if not cookie_token or not hmac.compare_digest(form_token.encode(), cookie_token.encode()):
        return _sign_in_page(words()["failed"].format(reason="CSRF"), 403)
    attempts: FailedAttempts = current_app.extensions["zapkeep.console_attempts"]
    # Unlike the API's random token, a console password is chosen by a person: over the budget,
    # no password is even compared (the right one waits too), so guessing stays slow.
    wait = attempts.waiting(request.remote_addr or "-")
    if wait is not None:
        return _sign_in_page(words()["too_many"].format(seconds=math.ceil(wait)), 429)
    given = request.form.get("password", "")
    if not any(hmac.compare_digest(given.encode(), secret.encode()) for secret in _passwords()):
        wait = attempts.fail(request.remote_addr or "-")
        if wait is not None:
            return _sign_in_page(words()["too_many"].format(seconds=math.ceil(wait)), 429)
        return _sign_in_page(words()["wrong_password"], 401)
    session_id, _ = console_auth.sessions().create()
    response = redirect("/", code=303)
    _set_cookie(response, console_auth.COOKIE, session_id)
    response.delete_cookie(console_auth.SIGN_IN_COOKIE, path="/")
    return response  # type: ignore[return-value]


@bp.post("/console/sign-out")
def sign_out() -> Response:
    session = console_auth.current_session()
    if session is not None:
        console_auth.require_csrf(session, request.form.get("csrf_token", ""))
        console_auth.sessions().end(request.cookies.get(console_auth.COOKIE))
    response = redirect("/", code=303)
    response.delete_cookie(console_auth.COOKIE, path="/")
    return response  # type: ignore[return-value]


def _passwords() -> list[str]:
    """CONSOLE_PASSWORD when set (then the API token does not open the console), else the API token."""
    password = config().console_password
    return [password] if password else [current_app.config["API_TOKEN"]]


def _sign_in_page(message: str | None = None, status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    body = render_template("console/sign_in.html", w=words(), lang=language(), csrf_token=token, message=message)
    response = Response(body, status=status, mimetype="text/html")
    _set_cookie(response, console_auth.SIGN_IN_COOKIE, token)
    return response


def _set_cookie(response: Response, name: str, value: str) -> None:
    """Never readable by script, never sent by another site, only over HTTPS when that is how we are reached."""
    response.set_cookie(name, value, httponly=True, samesite="Strict", secure=console_auth.cookie_is_secure(), path="/")


def _chosen_session() -> tuple[str, str]:
    """The session a page shows (``?session=ID``, else the default one) and the query that keeps it
    on the links between pages (none for the default: the seed's addresses stay as they were)."""
    default = host().default_session_id  # the daemon's default session (also when it is not hosted)
    chosen = request.args.get("session", default)
    if not is_valid_session_id(chosen):
        abort(400, "session must be 1-100 letters, digits, '-' or '_'")
    return chosen, "" if chosen == default else f"?session={quote(chosen)}"


def _page(template: str, session: console_auth.ConsoleSession) -> Response:
    chosen, query = _chosen_session()
    context = {
        "sessionId": chosen,
        "csrfToken": session.csrf_token,
        "words": words(),
        "lang": language(),
    }
    body = render_template(
        f"console/{template}",
        w=words(),
        lang=language(),
        csrf_token=session.csrf_token,
        context=json.dumps(context),
        page=template.removesuffix(".html"),
        session_id=chosen,
        session_query=query,
    )
    return Response(body, mimetype="text/html")
