"""``GET /api/events``: server-sent events. The events the database logged (the webhooks'
events: ``message.received``, ``chat.handoff``...), each with its id, resumable from
``Last-Event-ID`` without gaps; and the session's status as it changes (``event: status``, the
whole status, without an id: a client that reconnects is current at once).

The console's pages listen to it, and so can any API client (bearer token).
waitress gives each open stream a worker thread, so streams are few and short: at most
``MAX_STREAMS`` at once (then 503), each ended after ``STREAM_SECONDS`` (EventSource reconnects by
itself, after the ``retry`` it was told)."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, request

from bot.runtime import Runtime
from bot.session.state import State
from bot.messages.webhooks import body_of
from database import Database, LeaseInfo
from session_api.request_helpers import (
    db,
    jsonable,
    path_session_exists,
    require_token,
    requested_session,
    session_parts,
    take_path_session,
)

bp = Blueprint("live", __name__)
bp.before_request(require_token)
bp.before_request(path_session_exists)
bp.url_value_preprocessor(take_path_session)

MAX_STREAMS = 4  # of the server's 10 threads: the API and the probes keep the rest
STREAM_SECONDS = 120.0
TICK_SECONDS = 0.25
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 2.0  # who holds the lease is read from the database this often, not every tick
VOLATILE = ("uptime_seconds", "next_retry_in_seconds")  # they move every tick: sent with real changes only


def stream_slots() -> threading.BoundedSemaphore:
    """Made per app (``create_app``): how many streams may be open at once."""
    return threading.BoundedSemaphore(MAX_STREAMS)


def end_streams(app: Flask) -> None:
    """The server is stopping: open streams end now, not at their next heartbeat."""
    ending = app.extensions.get("zapkeep.streams_end")
    if ending is not None:
        ending.set()


@bp.get("/api/events")
@bp.get("/api/sessions/<session_id>/events")
def events() -> Response:
    """The requested session's events (``?session_id=``, or the path's; the default session's)."""
    session_id = requested_session()
    after = _last_event_id()
    if after is None:
        after = db().last_event_id(session_id)  # a new listener: what happens from now on
    parts = session_parts()
    status = _published(session_id) if parts is None else functools.partial(snapshot, parts.runtime)
    slots: threading.BoundedSemaphore = current_app.extensions["zapkeep.event_streams"]
    if not slots.acquire(blocking=False):
        abort(503, f"{MAX_STREAMS} event streams are open already; close one")
    response = Response(
        _stream(session_id, status, db(), after, current_app.extensions["zapkeep.streams_end"]),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    released = threading.Event()

    def release() -> None:  # once, also when the stream never started (the client left at once)
        if not released.is_set():
            released.set()
            slots.release()

    response.call_on_close(release)
    return response


def snapshot(live: Runtime, lease: LeaseInfo | None) -> dict[str, Any]:
    """The status as the console shows it: with its readiness, the lease, and which QR code is up."""
    status = jsonable(asdict(live.status()))
    code = live.qr_code()
    status["qr_id"] = None if code is None else hashlib.sha256(code.encode()).hexdigest()[:16]
    status["readiness"] = asdict(live.readiness())
    held = lease is not None and lease.owner_id is not None and lease.expires_in_seconds > 0
    status["lease"] = None if lease is None else {"owner_id": lease.owner_id, "held": held}
    return status


def _published(session_id: str) -> Callable[[LeaseInfo | None], dict[str, Any]]:
    """The status of a session this daemon does not run: what its owner publishes, read from the
    database as often as the lease (and kept while the database is away)."""
    database = db()
    read: dict[str, Any] = {"at": -LEASE_SECONDS, "published": {"state": "not_running", "connected": False}}

    def status(lease: LeaseInfo | None) -> dict[str, Any]:
        if time.monotonic() - read["at"] >= LEASE_SECONDS:
            read["at"] = time.monotonic()
            try:
                found = next((o for o in database.session_overview() if o.session_id == session_id), None)
            except Exception:  # the database is away: the last published state stands
                found = None
            if found is not None:
                read["published"] = jsonable(asdict(found))
        held = lease is not None and lease.owner_id is not None and lease.expires_in_seconds > 0
        lease_view = None if lease is None else {"owner_id": lease.owner_id, "held": held}
        return {"session_id": session_id, **read["published"], "lease": lease_view}

    return status


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("after")
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        abort(400, "Last-Event-ID (or ?after=) must be an event id")
    return int(raw)


def _stream(
    session_id: str,
    status: Callable[[LeaseInfo | None], dict[str, Any]],
    database: Database,
    after: int,
    ending: threading.Event,
) -> Iterator[str]:
    # The id up front: a client that reconnects before any event resumes from here, not from "now".
    yield f"retry: 2000\nid: {after}\n\n"
    ends = time.monotonic() + STREAM_SECONDS
    sent: dict[str, Any] | None = None
    beat = time.monotonic()
    lease: LeaseInfo | None = None
    lease_read = 0.0
    while time.monotonic() < ends and not ending.is_set():
        if time.monotonic() - lease_read >= LEASE_SECONDS:
            lease_read = time.monotonic()
            try:
                lease = database.lease(session_id)
            except Exception:  # the database is away: the status says so; the stream goes on
                lease = None
        try:
            logged = database.events_after(session_id, after, 100)
        except Exception:  # the database is away: the events wait for it, the stream goes on
            logged = []
        for event in logged:
            after = event.id
            beat = time.monotonic()
            yield f"id: {event.id}\nevent: {event.event_type}\ndata: {body_of(event).decode()}\n\n"
        current = status(lease)
        steady = {k: v for k, v in current.items() if k not in VOLATILE}
        if sent is None or steady != sent:
            sent = steady
            beat = time.monotonic()
            yield f"event: status\ndata: {json.dumps(current)}\n\n"
            if current["state"] == State.STOPPED.value:
                return  # the daemon is shutting down
        elif time.monotonic() - beat >= HEARTBEAT_SECONDS:
            beat = time.monotonic()
            yield ": keep-alive\n\n"  # also keeps waitress's idle timeout away
        ending.wait(TICK_SECONDS)
