"""The fragments the OpenAPI pieces share, defined once: parameters, bodies, answers, schemas."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def parameter(name: str, where: str, schema: Schema, description: str | None = None) -> Schema:
    """A path parameter is required, a query parameter never is."""
    described: Schema = {"name": name, "in": where, "required": where == "path"}
    if description is not None:
        described["description"] = description
    described["schema"] = schema
    return described


def content(description: str, media_type: str, schema: Schema) -> Schema:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def error(description: str) -> Schema:
    return content(description, "application/json", {"$ref": "#/components/schemas/Error"})


def ok(description: str, properties: Schema | None = None) -> Schema:
    schema: Schema = {
        "type": "object",
        "required": ["success"],
        "properties": {"success": {"type": "boolean", "enum": [True]}, **(properties or {})},
    }
    return content(description, "application/json", schema)


def body(properties: Schema, required: list[str] | None = None) -> Schema:
    """A JSON request body; optional unless some of its fields are required."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


SESSION_ID = parameter(
    "session_id",
    "query",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"},
    "Session id (1-100 of letters, digits, '-', '_'); defaults to the daemon's SESSION_ID.",
)
LIMIT = parameter("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50})
CHAT = parameter(
    "chat",
    "path",
    {"type": "string"},
    "The chat's JID, e.g. 5511999999999@s.whatsapp.net, or 123456789012345@lid for a chat WhatsApp addresses by LID",
)
ROW_ID = parameter("row_id", "path", {"type": "integer"})
VERSION = {"type": "integer", "minimum": 1}
SESSION_BODY = body({"session_id": {"type": "string"}})  # a session's route that takes nothing else
MESSAGES = {"type": "array", "items": {"$ref": "#/components/schemas/Message"}}
UNAUTHORIZED = error("Missing or wrong bearer token")
BAD_REQUEST = error("Malformed JSON or fields")
# What any protected route can answer besides its own responses.
EVERY_PROTECTED_ROUTE = {
    "405": error("Method not allowed here (the Allow header lists the methods that are)"),
    "413": error("Body larger than 64 MiB"),
    "429": error("Too many wrong tokens from this address (see Retry-After); a right token always passes"),
    "503": error("The database is unreachable (see Retry-After)"),
}
MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "chat": {"type": "string"},
        "sender": {"type": "string", "nullable": True},
        "message_id": {"type": "string", "nullable": True, "description": "WhatsApp's id"},
        "direction": {"type": "string", "enum": ["in", "out"]},
        "type": {"type": "string", "description": "text, audio, image, ..., reaction, edit"},
        "text": {"type": "string"},
        "status": {"type": "string"},
        "reason": {"type": "string", "nullable": True},
        "created_at": {"type": "string", "format": "date-time"},
        "sent_at": {"type": "string", "format": "date-time", "nullable": True},
        "attempts": {"type": "integer"},
        "last_error": {"type": "string", "nullable": True},
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["success", "message"],
    "properties": {"success": {"type": "boolean", "enum": [False]}, "message": {"type": "string"}},
}
