"""Signing in to the web console: server-side sessions behind an HttpOnly, SameSite=Strict cookie,
and a CSRF token each session carries. A signed-in browser may also call the JSON API (that is
what the console's pages do); a request that changes anything must then carry the session's CSRF
token in ``X-CSRF-Token``. The bearer scheme of the API is unchanged."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import abort, current_app, request

COOKIE = "zapkeep_console"
SIGN_IN_COOKIE = "zapkeep_sign_in"  # the sign-in form's own CSRF token (double submit)
CSRF_HEADER = "X-CSRF-Token"
LIFETIME_SECONDS = 12 * 3600  # then the console signs in again (an open tab polls: no idle timeout)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class ConsoleSession:
    csrf_token: str
    expires_at: float


class ConsoleSessions:
    """In memory: a redeploy signs everyone out, which is also what a leaked cookie should get."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, ConsoleSession] = {}

    def create(self) -> tuple[str, ConsoleSession]:
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(secrets.token_urlsafe(32), self._clock() + LIFETIME_SECONDS)
        with self._lock:
            now = self._clock()
            self._sessions = {k: v for k, v in self._sessions.items() if v.expires_at > now}
            self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.expires_at <= self._clock():
                self._sessions.pop(session_id, None)
                return None
            return session

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


def sessions() -> ConsoleSessions:
    return current_app.extensions["zapkeep.console_sessions"]


def current_session() -> ConsoleSession | None:
    return sessions().get(request.cookies.get(COOKIE))


def signed_in_browser() -> bool:
    """The request comes from a signed-in console (then a change needs the CSRF header too)."""
    session = current_session()
    if session is None:
        return False
    if request.method not in SAFE_METHODS:
        require_csrf(session, request.headers.get(CSRF_HEADER, ""))
    return True


def require_csrf(session: ConsoleSession, given: str) -> None:
    if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        abort(403, "missing or wrong CSRF token; reload the page")


def cookie_is_secure() -> bool:
    """Secure when the browser speaks HTTPS to us, or to the platform's proxy in front when
    TRUST_PROXY lets the server believe its X-Forwarded-Proto (which then sets the scheme)."""
    return request.is_secure
