"""Writes for a session that another live process owns go through that owner: the request is
stored as a durable command (``whatsapp_session_commands``), the owner's host replays it against
its own API (``execute_command``) and stores the answer, and this process answers with it, or
with 202 and the command's id when it takes longer than a few seconds (``GET /api/commands/<id>``).

A replayed request carries ``REPLAY_HEADER``: it is answered where it lands, never forwarded again
(a header any client may send, which only ever keeps its request from being forwarded)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, abort, current_app, request

from database import Command, CommandRequest
from session_api.hosting import OneRuntime
from session_api.request_helpers import db, host, jsonable, ok, require_token, requested_session

log = logging.getLogger(__name__)

bp = Blueprint("commands", __name__)
bp.before_request(require_token)

REPLAY_HEADER = "X-Zapkeep-Command"
WAIT_SECONDS = 5.0  # for the owner's answer, before answering 202 (app.config["COMMAND_WAIT_SECONDS"])
POLL_SECONDS = 0.075

View = TypeVar("View", bound=Callable[..., Any])


def through_owner(view: View) -> View:
    """A write view: run here, unless another process owns the requested session right now (then
    it becomes a command for that owner)."""

    @functools.wraps(view)
    def here_or_at_the_owner(*args: Any, **kwargs: Any) -> Any:
        owner = _owner_elsewhere()
        if owner is None:
            return view(*args, **kwargs)
        return _forward(owner)

    return here_or_at_the_owner  # type: ignore[return-value]


def _owner_elsewhere() -> str | None:
    """The live owner of the requested session when it is another process and this one does not
    own it (not hosted here, or hosted in standby); else None: the request is answered here."""
    if REPLAY_HEADER in request.headers or isinstance(host(), OneRuntime):
        return None  # (one bare runtime runs no commands, so it sends none either)
    session_id = requested_session()
    parts = host().services(session_id)
    if parts is not None and parts.runtime.fence is not None:
        return None
    lease = db().lease(session_id)
    if lease is None or lease.owner_id is None or lease.expires_in_seconds <= 0:
        return None  # nobody runs it: acted on directly
    return None if lease.owner_id == host().instance_id else lease.owner_id


def _forward(owner: str) -> tuple[Response, int]:
    session_id = requested_session()
    command = CommandRequest(
        method=request.method,
        path=request.path,
        query=request.query_string.decode("latin-1"),
        content_type=request.content_type,
        body=request.get_data(cache=True),
    )
    command_id = db().enqueue_command(session_id, command)
    log.info(
        "API: %s %s for session %s sent to its owner %s (command %d)",
        request.method,
        request.path,
        session_id,
        owner,
        command_id,
    )
    deadline = time.monotonic() + current_app.config.get("COMMAND_WAIT_SECONDS", WAIT_SECONDS)
    while True:
        found = db().command(command_id)
        if found is not None and found.finished_at is not None and found.status_code is not None:
            response = current_app.json.response(found.answer)
            response.headers[REPLAY_HEADER] = str(command_id)
            return response, found.status_code
        if time.monotonic() >= deadline:
            return ok(202, command_id=command_id, session_id=session_id, state=_state(found))
        time.sleep(POLL_SECONDS)


def _state(command: Command | None) -> str:
    if command is None or command.claimed_by is None:
        return "queued"
    return "running" if command.finished_at is None else "finished"


@bp.get("/api/commands/<int(max=9223372036854775807):command_id>")
def command_status(command_id: int) -> tuple[Response, int]:
    """A command sent to a session's owner: waiting, taken by its owner, or finished with the
    owner's answer (``status_code`` and ``answer``, as the owner's API gave them)."""
    found = db().command(command_id)
    if found is None:
        abort(404, f"no command {command_id}")
    return ok(
        command_id=found.id,
        session_id=found.session_id,
        method=found.method,
        path=found.path,
        state=_state(found),
        owner=found.claimed_by,
        status_code=found.status_code,
        answer=found.answer,
        **jsonable({"created_at": found.created_at, "finished_at": found.finished_at}),
    )


def execute_command(app: Flask, command: Command) -> tuple[int, dict[str, Any]]:
    """The owner's side: replay the stored request against this process's API (its token, marked
    as a replay) and return the answer to store, (status, JSON object)."""
    stored = command.request
    headers = {"Authorization": f"Bearer {app.config['API_TOKEN']}", REPLAY_HEADER: str(command.id)}
    with app.test_client() as client:
        response = client.open(
            stored.path,
            method=stored.method,
            query_string=stored.query,
            data=stored.body,
            content_type=stored.content_type,
            headers=headers,
        )
        answer = response.get_json(silent=True)
        status = response.status_code
        response.close()
    if not isinstance(answer, dict):
        answer = {"success": False, "message": f"the owner answered {status} with no JSON object"}
    return status, answer
