"""``GET /api/events``: the session's status as server-sent events, pushed as it changes.

The console's pages listen to it, and so can any API client (bearer token). Each event is the
whole status (``event: status``), so a client that reconnects is current at its first event.
waitress gives each open stream a worker thread, so streams are few and short: at most
``MAX_STREAMS`` at once (then 503), each ended after ``STREAM_SECONDS`` (EventSource reconnects by
itself, after the ``retry`` it was told)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, abort, current_app

from bot.runtime import Runtime
from bot.session_state import State
from database import Database, LeaseInfo
from session_api.routes import db, jsonable, require_token, runtime

bp = Blueprint("live", __name__)
bp.before_request(require_token)

MAX_STREAMS = 4  # of the server's 8 threads: the API and the probes keep the rest
STREAM_SECONDS = 120.0
TICK_SECONDS = 0.25
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 2.0  # who holds the lease is read from the database this often, not every tick
VOLATILE = ("uptime_seconds", "next_retry_in_seconds")  # they move every tick: sent with real changes only


def stream_slots() -> threading.BoundedSemaphore:
    """Made per app (``create_app``): how many streams may be open at once."""
    return threading.BoundedSemaphore(MAX_STREAMS)


@bp.get("/api/events")
def events() -> Response:
    slots: threading.BoundedSemaphore = current_app.extensions["zapkeep.event_streams"]
    if not slots.acquire(blocking=False):
        abort(503, f"{MAX_STREAMS} event streams are open already; close one")
    response = Response(
        _stream(runtime(), db()),
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


def _stream(live: Runtime, database: Database) -> Iterator[str]:
    yield "retry: 2000\n\n"
    ends = time.monotonic() + STREAM_SECONDS
    sent: dict[str, Any] | None = None
    number = 0
    beat = time.monotonic()
    lease: LeaseInfo | None = None
    lease_read = 0.0
    while time.monotonic() < ends:
        if time.monotonic() - lease_read >= LEASE_SECONDS:
            lease_read = time.monotonic()
            try:
                lease = database.lease(live.config.session_id)
            except Exception:  # the database is away: the status says so; the stream goes on
                lease = None
        current = snapshot(live, lease)
        steady = {k: v for k, v in current.items() if k not in VOLATILE}
        if sent is None or steady != sent:
            number += 1
            sent = steady
            beat = time.monotonic()
            yield f"id: {number}\nevent: status\ndata: {json.dumps(current)}\n\n"
            if current["state"] == State.STOPPED.value:
                return  # the daemon is shutting down
        elif time.monotonic() - beat >= HEARTBEAT_SECONDS:
            beat = time.monotonic()
            yield ": keep-alive\n\n"  # also keeps waitress's idle timeout away
        time.sleep(TICK_SECONDS)
