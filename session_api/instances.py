"""``GET /api/instances``: the live instances sharing the sessions (issue 26), their heartbeats and
the sessions each owns, read from the database (any instance answers alike)."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response

from session_api.request_helpers import config, db, host, ok, require_token

bp = Blueprint("instances", __name__)
bp.before_request(require_token)


@bp.get("/api/instances")
def instances() -> tuple[Response, int]:
    """Instances whose heartbeat is younger than a lease's life; sessions by the leases they hold."""
    ttl = config().lease_ttl_seconds
    owned: dict[str, list[str]] = {}
    for lease in db().leases():
        if lease.owner_id is not None and lease.expires_in_seconds > 0:
            owned.setdefault(lease.owner_id, []).append(lease.session_id)
    here = host().instance_id
    listed = [
        {
            "instance_id": i.instance_id,
            "this_instance": i.instance_id == here,
            "started_at": datetime.fromtimestamp(i.started_at, UTC).isoformat(),
            "heartbeat_age_seconds": round(i.heartbeat_age_seconds, 3),
            "max_sessions": i.max_sessions,
            "sessions_owned": len(owned.get(i.instance_id, [])),
            "sessions": sorted(owned.get(i.instance_id, [])),
        }
        for i in db().live_instances(ttl)
    ]
    return ok(instance_id=here, lease_ttl_seconds=ttl, instances=listed)
