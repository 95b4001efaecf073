"""The daemon's sessions: ``GET/POST /api/sessions``, ``GET/DELETE /api/sessions/<id>`` and the
seed's ``GET /api/session/status``. A session hosted here answers from its runtime (also while the
database is away); any other from what the database says of it (its owner publishes its state)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from flask import Blueprint, Response, abort, g, request

from bot.process.config import is_valid_session_id
from bot.process.errors import ConfigError, SessionExists, SessionLimit, StateConflictError, first_line
from bot.runtime import Runtime
from bot.session.state import State
from database import LeaseInfo, SessionOverview, SessionSummary, is_unavailable
from session_api.commands import through_owner
from session_api.request_helpers import (
    PHONE,
    _iso,
    db,
    host,
    json_body,
    jsonable,
    ok,
    path_session_exists,
    requested_session,
    require_token,
    take_path_session,
)

bp = Blueprint("sessions", __name__)
bp.before_request(require_token)
bp.before_request(path_session_exists)
bp.url_value_preprocessor(take_path_session)

# Published states shown as they are; "starting" (a lease held, nothing published yet) and
# "not_running" (no lease) keep the seed's words for a session this daemon does not run.
NOT_PUBLISHED = ("starting", "not_running")


@bp.get("/api/sessions")
def list_sessions() -> tuple[Response, int]:
    """Every session in the database (and any hosted here), one line each."""
    overview = {found.session_id: found for found in db().session_overview()}
    hosted = set(host().hosted())
    listed = []
    for session_id in sorted(set(overview) | hosted):
        found = overview.get(session_id)
        parts = host().services(session_id) if session_id in hosted else None
        if parts is not None and parts.runtime.state is State.STANDBY and found is not None and found.owner:
            parts = None  # standing by here: the owner's state says more
        if parts is not None:
            live = parts.runtime.status()
            entry = {
                "session_id": session_id,
                "state": live.state,
                "connected": live.connected,
                "phone": live.phone,
                "push_name": live.push_name,
                "owner": found.owner if found is not None else (live.owner_id if live.owns_session else None),
                "hosted_here": True,
                "last_mirrored_at": live.last_mirrored_at or (found.last_mirrored_at if found is not None else None),
                "last_error": live.last_error,
            }
        elif found is not None:
            entry = {
                "session_id": session_id,
                "state": found.state,
                "connected": found.connected,
                "phone": found.phone,
                "push_name": found.push_name,
                "owner": found.owner,
                "hosted_here": session_id in hosted,
                "last_mirrored_at": found.last_mirrored_at,
                "last_error": found.last_error,
            }
        else:
            continue  # (hosted, but no longer known to the host: deleted a moment ago)
        listed.append(jsonable(entry))
    return ok(sessions=listed)


@bp.post("/api/sessions")
def create_session() -> tuple[Response, int]:
    """``{"session_id", "pair_phone"?, "rules"?}``: created and started here; it goes to ``qr`` (or
    a pairing code with ``pair_phone``) like a first boot."""
    body = json_body(required=True)
    session_id = body.get("session_id")
    if not isinstance(session_id, str) or not is_valid_session_id(session_id):
        abort(400, "session_id must be 1-100 letters, digits, '-' or '_'")
    pair_phone = body.get("pair_phone")
    if pair_phone is not None:
        digits = re.sub(r"[\s()+-]", "", pair_phone) if isinstance(pair_phone, str) else ""
        if not PHONE.fullmatch(digits):
            abort(400, "pair_phone must be a phone number with country code, 10-15 digits")
        pair_phone = digits
    rules = body.get("rules")
    if rules is not None and not isinstance(rules, str):
        abort(400, "rules must be a path under the rules directory")
    try:
        host().create_session(session_id, pair_phone=pair_phone, rules=rules)
    except (SessionExists, SessionLimit, StateConflictError) as exc:
        abort(409, first_line(exc))
    except (ValueError, ConfigError) as exc:  # the host's own checks (the rules file: where, and what it says)
        abort(400, first_line(exc))
    created = _entries(session_id)
    return ok(201, session=created[0] if created else {"session_id": session_id})


@bp.delete("/api/sessions/<session_id>")
@through_owner
def delete_session() -> tuple[Response, int]:
    """Gone for good: its client stopped (unlinked from the phone with ``logout=true``), its local
    store wiped, its stored rows removed; history kept unless ``purge=true``."""
    session_id = requested_session()
    logout = _flag("logout")
    purge = _flag("purge")
    try:
        deleted = host().delete_session(session_id, logout=logout, purge=purge)
    except StateConflictError as exc:
        abort(409, first_line(exc))
    if not deleted:
        abort(404, f"no session {session_id}")
    return ok(session_id=session_id, deleted=True, logged_out=logout, history_purged=purge)


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


@bp.get("/api/session/status")
@bp.get("/api/sessions/<session_id>")
def status() -> tuple[Response, int]:
    """Every session (or one: ``?session_id=``, or the path's)."""
    wanted = None
    if "path_session" in g or "session_id" in request.args:
        wanted = requested_session()  # (validates it)
    sessions = _entries(wanted)
    if wanted is not None:
        if not sessions and wanted == host().default_session_id and not db().is_tombstoned(wanted):
            # The API answers before the host has booted its sessions (the platform's health check
            # passes first): the daemon's own session is starting, not missing.
            sessions = [{"session_id": wanted, "state": "starting", "connected": False, "owns_session": False}]
        if not sessions:
            abort(404, f"no session {wanted}")
        return ok(session=sessions[0])
    return ok(sessions=sessions)


def _entries(wanted: str | None) -> list[dict[str, Any]]:
    """The status of each session (of ``wanted`` alone when given): a hosted session's runtime's,
    with what the database says beside it; any other's from the database."""
    runtimes: dict[str, Runtime] = {}
    for session_id in host().hosted() if wanted is None else [wanted]:
        parts = host().services(session_id)
        if parts is not None:
            runtimes[session_id] = parts.runtime
    stored = _stored_view(sorted(runtimes), wanted)
    lives = {session_id: live.status() for session_id, live in runtimes.items()}  # (after the reads: see below)
    ids = set(lives) if stored is None else set(lives) | set(stored.sessions) | set(stored.overview)
    if wanted is not None:
        ids &= {wanted}
    entries = []
    for session_id in sorted(ids):
        entry: dict[str, Any] = {"session_id": session_id}
        live = lives.get(session_id)
        if live is not None:
            # What this process knows answers also while the database is away, and says so
            # (its status read after the database's: it says what those reads just found).
            away = live.database_unreachable_since
            entry.update(jsonable(asdict(live)))
            entry["database"] = "reachable" if away is None else f"unreachable since {_iso(away)}"
            entry["history"] = None if stored is None else stored.history.get(session_id, [])
        lease = None if stored is None else stored.leases.get(session_id)
        held = lease is not None and lease.owner_id is not None and lease.expires_in_seconds > 0
        if live is None:
            # A session this daemon does not run (yet: a host hosts its sessions after the API is
            # up): what its owner published, if it holds the lease.
            entry["owns_session"] = False
            published = None if stored is None else stored.overview.get(session_id)
            if held and published is not None and published.state not in NOT_PUBLISHED:
                entry.update(
                    state=published.state,
                    connected=published.connected,
                    phone=published.phone,
                    push_name=published.push_name,
                    last_error=published.last_error,
                )
            else:
                entry.update(state="running_elsewhere" if held else "not_running", connected=None)
        entry["lease"] = None if lease is None else {**asdict(lease), "held": held}
        summary = None if stored is None else stored.sessions.get(session_id)
        entry["stored"] = None if summary is None else jsonable(asdict(summary))
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class StoredView:
    sessions: dict[str, SessionSummary]
    overview: dict[str, SessionOverview]  # every existing session, with what its owner published
    history: dict[str, list[dict[str, Any]]]  # of the sessions hosted here
    leases: dict[str, LeaseInfo | None]


def _stored_view(hosted: list[str], wanted: str | None) -> StoredView | None:
    """What the database says of the sessions (of ``wanted`` alone when given); None while it is
    unreachable (never waited for)."""
    if db().unreachable_since is not None:
        return None
    try:
        sessions = {s.session_id: s for s in db().list_sessions() if wanted in (None, s.session_id)}
        overview = {o.session_id: o for o in db().session_overview() if wanted in (None, o.session_id)}
        history = {sid: [jsonable(asdict(h)) for h in db().list_history(sid)] for sid in hosted}
        ids = sorted(set(sessions) | set(overview) | set(hosted))
        leases = {session_id: db().lease(session_id) for session_id in ids}
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        return None
    return StoredView(sessions, overview, history, leases)
