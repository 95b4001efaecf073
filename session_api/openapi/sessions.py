"""OpenAPI pieces of the daemon's sessions (``sessions.py``): listing, creating and deleting them,
and the commands a write for a session owned by another process becomes (``commands.py``); and
how every session route is served again under ``/api/sessions/{session_id}/...``."""

from __future__ import annotations

from session_api.openapi.parts import BAD_REQUEST, UNAUTHORIZED, Schema, body, error, ok, parameter

PATH_SESSION = parameter(
    "session_id", "path", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"}, "The session's id"
)
NO_SUCH_SESSION = error("No such session (never created, or deleted)")
QUEUED = ok(
    "The session's owner (another process) has not answered within a few seconds: the request waits for it "
    "as a command (GET /api/commands/{command_id})",
    {"command_id": {"type": "integer"}, "state": {"type": "string", "enum": ["queued", "running"]}},
)
OVERVIEW = {
    "type": "object",
    "properties": {
        "session_id": {"type": "string"},
        "state": {"type": "string", "description": "the owner's state; not_running when no process holds its lease"},
        "connected": {"type": "boolean"},
        "phone": {"type": "string", "nullable": True},
        "push_name": {"type": "string", "nullable": True},
        "owner": {"type": "string", "nullable": True, "description": "the process holding its lease"},
        "hosted_here": {"type": "boolean"},
        "last_mirrored_at": {"type": "string", "format": "date-time", "nullable": True},
        "last_error": {"type": "string", "nullable": True},
    },
}


def list_sessions() -> Schema:
    return {
        "summary": "Every session in the database, with its owner's state (from any process)",
        "responses": {"200": ok("Sessions", {"sessions": {"type": "array", "items": OVERVIEW}}), "401": UNAUTHORIZED},
    }


def create() -> Schema:
    fields = {
        "session_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"},
        "pair_phone": {"type": "string", "description": "Link by pairing code for this phone instead of a QR"},
        "rules": {"type": "string", "description": "Its own chatbot rules: a path under the rules directory"},
    }
    return {
        "summary": "Create a session and start it here: it goes to qr (or a pairing code with pair_phone)",
        "requestBody": body(fields, ["session_id"]),
        "responses": {
            "201": ok("Created; its status", {"session": {"type": "object"}}),
            "400": error("Malformed session id, phone or rules path"),
            "401": UNAUTHORIZED,
            "409": error("The session exists, or MAX_SESSIONS are hosted already"),
        },
    }


def one(status: Schema) -> Schema:
    """GET /api/sessions/{session_id}: the status route's answer for one session."""
    return {**status, "summary": "One session's status (as /api/session/status?session_id= gives it)"}


def delete() -> Schema:
    flag = {"type": "boolean"}
    return {
        "summary": "Delete the session for good: its client stopped (unlinked from the phone with logout=true), "
        "its local store wiped, its stored rows removed; its history kept unless purge=true",
        "parameters": [
            PATH_SESSION,
            parameter("logout", "query", flag, "Unlink the device from the phone first"),
            parameter("purge", "query", flag, "Also remove its history snapshots"),
        ],
        "responses": {
            "200": ok("Deleted"),
            "202": QUEUED,
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": NO_SUCH_SESSION,
            "409": error("This daemon cannot delete it now"),
        },
    }


def command() -> Schema:
    answer = {
        "command_id": {"type": "integer"},
        "session_id": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "finished"]},
        "owner": {"type": "string", "nullable": True},
        "status_code": {"type": "integer", "nullable": True, "description": "the owner's HTTP status"},
        "answer": {"type": "object", "nullable": True, "description": "the owner's JSON answer"},
    }
    return {
        "summary": "A write sent to the session's owner as a command: waiting, taken, or finished with its answer",
        "parameters": [parameter("command_id", "path", {"type": "integer"})],
        "responses": {"200": ok("The command", answer), "401": UNAUTHORIZED, "404": error("No such command")},
    }


def per_session(operation: Schema, forwarded: bool) -> Schema:
    """A session route under /api/sessions/{session_id}/...: the session from the path instead of
    ?session_id= (or the body's), and 404 for a session that does not exist."""
    parameters = [p for p in operation.get("parameters", []) if p["name"] != "session_id"]
    described = {**operation, "parameters": [PATH_SESSION, *parameters]}
    if "requestBody" in operation:
        described["requestBody"] = _without_session_id(operation["requestBody"])
    responses = {**operation["responses"]}
    responses.setdefault("400", BAD_REQUEST)
    responses.setdefault("404", NO_SUCH_SESSION)
    described["responses"] = with_command(responses) if forwarded else responses
    return described


def forwarded(operation: Schema) -> Schema:
    """A write that goes to the session's owner when another process owns it."""
    return {**operation, "responses": with_command(operation["responses"])}


def with_command(responses: Schema) -> Schema:
    if "202" in responses:  # (it answers 202 itself: the owner's, or the command's)
        own = responses["202"]
        return {**responses, "202": {**own, "description": own["description"] + "; or: " + QUEUED["description"]}}
    return {**responses, "202": QUEUED}


def _without_session_id(request_body: Schema) -> Schema:
    kinds = {}
    for media_type, item in request_body["content"].items():
        schema = {**item["schema"]}
        schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k != "session_id"}
        kinds[media_type] = {**item, "schema": schema}
    return {**request_body, "content": kinds}
