"""The admin HTTP API: ``create_app(host, db)`` builds the Flask app around the daemon's sessions."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from datetime import timedelta

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from bot.messages.outbox import Outbox
from bot.messages.webhooks import Dispatcher
from bot.runtime import Runtime
from database import Database, is_unavailable
from session_api.commands import execute_command
from session_api.guard import FailedAttempts
from session_api.hosting import OneRuntime, SessionHost
from session_api.server import MAX_BODY_BYTES

log = logging.getLogger(__name__)
access = logging.getLogger("session_api.access")
PROBES = ("/healthz", "/readyz")
__all__ = ["create_app", "execute_command"]


def create_app(
    host: SessionHost | Runtime,
    db: Database,
    *,
    outbox: Outbox | None = None,
    reply_expiry: timedelta = timedelta(hours=24),
    failed_attempts: FailedAttempts | None = None,
    webhooks: list[Dispatcher] | None = None,
    sign_in_attempts: FailedAttempts | None = None,
) -> Flask:
    """``host``: the daemon's sessions (``bot.host.Host``), or one bare runtime served with
    ``outbox`` and ``webhooks`` (with an outbox, /api/messages/send queues and the message waits out
    a disconnection; without one it sends at once or answers 409). ``failed_attempts``: how wrong
    tokens are slowed down (10 at once from an address, then one every 6 s)."""
    from session_api import commands, console, conversations, instances, live, sessions
    from session_api.console_auth import ConsoleSessions
    from session_api.request_helpers import require_one_of
    from session_api.routes import MAX_CONCURRENT_CHECKS, bp

    if isinstance(host, Runtime):
        host = OneRuntime(host, outbox, webhooks or [])
    token = host.config.api_token
    if not token:
        raise ValueError("the admin API needs an API token; it is never served open")
    app = Flask(__name__, static_folder=None)  # the console's files are its blueprint's
    app.config.update(API_TOKEN=token, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep fields in their declared order
    app.extensions["zapkeep.host"] = host
    app.extensions["zapkeep.db"] = db
    app.extensions["zapkeep.failed_attempts"] = failed_attempts or FailedAttempts()
    app.extensions["zapkeep.console_sessions"] = ConsoleSessions()
    app.extensions["zapkeep.console_attempts"] = sign_in_attempts or console.sign_in_attempts()
    app.extensions["zapkeep.event_streams"] = live.stream_slots()
    app.extensions["zapkeep.streams_end"] = threading.Event()
    app.extensions["zapkeep.downloads"] = threading.BoundedSemaphore(2)  # of the server's 10 threads
    app.extensions["zapkeep.forwards"] = threading.BoundedSemaphore(commands.MAX_FORWARDS)  # 4 more
    app.extensions["zapkeep.number_checks"] = threading.BoundedSemaphore(MAX_CONCURRENT_CHECKS)  # 2 more
    app.config["REPLY_EXPIRY"] = reply_expiry
    app.config["COMMAND_WAIT_SECONDS"] = commands.WAIT_SECONDS
    app.register_blueprint(bp)
    app.register_blueprint(sessions.bp)
    app.register_blueprint(commands.bp)
    app.register_blueprint(instances.bp)
    app.register_blueprint(conversations.bp)
    app.register_blueprint(live.bp)
    app.register_blueprint(console.bp)

    @app.before_request
    def started() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def access_log(response: Response) -> Response:
        """Method, route (the pattern: no query string), status, duration and client; never
        the token or a body. Probes log at DEBUG: a platform asks every few seconds."""
        route = request.url_rule.rule if request.url_rule is not None else "-"
        duration_ms = round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1)
        level = logging.DEBUG if route in PROBES else logging.INFO
        fields = {
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "client": request.remote_addr,
        }
        access.log(level, "%s %s %d %.1f ms %s", *fields.values(), extra=fields)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus's text format; the API token, or METRICS_TOKEN when set, opens it."""
        require_one_of(token, host.config.metrics_token)
        return Response(host.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    def default_runtime() -> Runtime | None:
        parts = host.services(host.default_session_id)
        return None if parts is None else parts.runtime

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        """The process answers (the default session's state beside it, when hosted here)."""
        live = default_runtime()
        return jsonify(success=True, status="ok", state=None if live is None else live.state.value), 200

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """Serving customers (connected) or not, and why: for monitors, not the platform's restart
        probe. The default session's readiness (``/api/sessions`` lists every session's state)."""
        live = default_runtime()
        if live is None:
            reason = f"session {host.default_session_id} is not hosted here"
            return jsonify(success=False, ready=False, state="not_running", reason=reason), 503
        readiness = live.readiness()
        return jsonify(success=readiness.ready, **asdict(readiness)), 200 if readiness.ready else 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        response = jsonify(success=False, message=exc.description)
        if exc.code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="zapkeep"'
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "retry-after"):  # 405 says what is allowed
                response.headers[name] = value
        return response, exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        if is_unavailable(exc):
            log.warning("API request failed: the database is unreachable (%s)", exc.__class__.__name__)
            response = jsonify(success=False, message="the database is unreachable; try again shortly")
            response.headers["Retry-After"] = "5"
            return response, 503
        # Class name only: messages of lower layers may quote data, and data may be credentials.
        log.error("API request failed: %s", exc.__class__.__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        return jsonify(success=False, message="internal error; see the daemon's log"), 500

    return app
