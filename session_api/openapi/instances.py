"""OpenAPI piece of the instances sharing the sessions (``instances.py``)."""

from __future__ import annotations

from session_api.openapi.parts import UNAUTHORIZED, Schema, ok

INSTANCE = {
    "type": "object",
    "properties": {
        "instance_id": {"type": "string", "description": "host/deployment/pid; the owner id of its leases"},
        "this_instance": {"type": "boolean", "description": "the instance that answered"},
        "started_at": {"type": "string", "format": "date-time"},
        "heartbeat_age_seconds": {"type": "number", "description": "by the database's clock"},
        "max_sessions": {"type": "integer"},
        "sessions_owned": {"type": "integer"},
        "sessions": {"type": "array", "items": {"type": "string"}, "description": "the sessions whose lease it holds"},
    },
}


def list_instances() -> Schema:
    return {
        "summary": "The live instances sharing the sessions (heartbeat younger than the lease TTL), from any instance",
        "responses": {
            "200": ok(
                "Instances",
                {
                    "instance_id": {"type": "string", "description": "the instance that answered"},
                    "lease_ttl_seconds": {"type": "integer"},
                    "instances": {"type": "array", "items": INSTANCE},
                },
            ),
            "401": UNAUTHORIZED,
        },
    }
