"""OpenAPI 3 description of the admin API, served at /api/openapi.json (a test keeps it true)."""

from __future__ import annotations

from typing import Any

SESSION_ID = {
    "name": "session_id",
    "in": "query",
    "required": False,
    "description": "Session id (1-100 of letters, digits, '-', '_'); defaults to the daemon's SESSION_ID.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["success"],
        "properties": {"success": {"type": "boolean", "enum": [True]}, **(properties or {})},
    }
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
}
CHAT = {
    "name": "chat",
    "in": "path",
    "required": True,
    "description": "The chat's JID, e.g. 5511999999999@s.whatsapp.net, or 123456789012345@lid for a chat"
    " WhatsApp addresses by LID",
    "schema": {"type": "string"},
}
UNAUTHORIZED = _error("Missing or wrong bearer token")
BAD_REQUEST = _error("Malformed JSON or fields")
# What any protected route can answer besides its own responses.
EVERY_PROTECTED_ROUTE = {
    "405": _error("Method not allowed here (the Allow header lists the methods that are)"),
    "413": _error("Body larger than 64 MiB"),
    "429": _error("Too many wrong tokens from this address (see Retry-After); a right token always passes"),
    "503": _error("The database is unreachable (see Retry-After)"),
}


def openapi_document() -> dict[str, Any]:
    document = _document()
    for operations in document["paths"].values():
        for operation in operations.values():
            if "401" in operation["responses"]:  # a route's own description of a code comes first
                own = operation["responses"]
                operation["responses"] = {**own, **{k: v for k, v in EVERY_PROTECTED_ROUTE.items() if k not in own}}
    return document


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "zapkeep admin API",
            "version": "1.0.0",
            "description": "Inspect and manage the WhatsApp session of a zapkeep daemon.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Message": {
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
                },
                "Error": {
                    "type": "object",
                    "required": ["success", "message"],
                    "properties": {"success": {"type": "boolean", "enum": [False]}, "message": {"type": "string"}},
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (the API token, or METRICS_TOKEN when set)",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness (no authentication)",
                    "security": [],
                    "responses": {
                        "200": _ok(
                            "The process is serving", {"status": {"type": "string"}, "state": {"type": "string"}}
                        )
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (no authentication): 200 only while connected to WhatsApp",
                    "security": [],
                    "responses": {
                        "200": _ok("Connected: serving customers", {"state": {"type": "string"}}),
                        "503": {
                            "description": "Not serving customers; reason says why and what to do",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "success": {"type": "boolean", "enum": [False]},
                                            "ready": {"type": "boolean"},
                                            "state": {"type": "string"},
                                            "reason": {"type": "string"},
                                        },
                                    }
                                }
                            },
                        },
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3 document"}, "401": UNAUTHORIZED},
                }
            },
            "/api/session/backup": {
                "post": {
                    "summary": "Back up the live session now, or import a posted session document",
                    "requestBody": {
                        **_body(
                            {
                                "session_id": {"type": "string"},
                                "session_data": {
                                    "description": "A zapkeep session document, or a sealed export (object or JSON text)"
                                },
                            }
                        ),
                        "required": False,
                    },
                    "responses": {
                        "200": _ok("Backed up (written false: unchanged, nothing written)"),
                        "201": _ok("Imported", {"version": {"type": "integer"}}),
                        "400": _error("Malformed body, or a corrupt or foreign session document"),
                        "401": UNAUTHORIZED,
                        "409": _error("No paired live session, or another session"),
                        "413": _error("Body too large"),
                        "507": _error("DATA_DIR's disk has no room for the imported local store; nothing changed"),
                    },
                }
            },
            "/api/session/restore": {
                "get": {
                    "summary": "Export the stored session document (or a historical version)",
                    "parameters": [
                        SESSION_ID,
                        {
                            "name": "version",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1},
                        },
                        {
                            "name": "clear",
                            "in": "query",
                            "required": False,
                            "description": "With SESSION_ENCRYPTION_KEY set: the document unencrypted (it holds the keys)",
                            "schema": {"type": "boolean"},
                        },
                    ],
                    "responses": {
                        "200": _ok(
                            "The document; with SESSION_ENCRYPTION_KEY set (and no clear=true) sealed: "
                            '{"format": "zapkeep.sealed-session", "session_id", "key_id", "sealed"}',
                            {"session_data": {"type": "object"}},
                        ),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "404": _error("No such session or version"),
                        "409": _error("A stored payload does not decrypt with the configured keys"),
                    },
                },
                "post": {
                    "summary": "Apply the stored (or a historical) snapshot: stop, rewrite the local store, reconnect",
                    "requestBody": {
                        **_body({"session_id": {"type": "string"}, "version": {"type": "integer", "minimum": 1}}),
                        "required": False,
                    },
                    "responses": {
                        "200": _ok("Restored"),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "404": _error("No such session or version"),
                        "409": _error("Not this daemon's session, a state that forbids it, or a corrupt snapshot"),
                        "507": _error("DATA_DIR's disk has no room for the restored local store; nothing changed"),
                    },
                },
            },
            "/api/session/status": {
                "get": {
                    "summary": "Every session's state, or one with ?session_id=",
                    "parameters": [SESSION_ID],
                    "responses": {
                        "200": _ok("Status"),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "404": _error("No such session"),
                    },
                }
            },
            "/api/session/delete": {
                "delete": {
                    "summary": "Delete the stored session (history kept unless purge=true)",
                    "parameters": [
                        SESSION_ID,
                        {"name": "purge", "in": "query", "required": False, "schema": {"type": "boolean"}},
                    ],
                    "responses": {
                        "200": _ok("Deleted"),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "404": _error("No stored session"),
                    },
                }
            },
            "/api/session/qr": {
                "get": {
                    "summary": "The pending QR code: JSON with the text and a PNG data URI, or the PNG with Accept: image/png",
                    "parameters": [SESSION_ID],
                    "responses": {
                        "200": {
                            "description": "The QR code",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        "401": UNAUTHORIZED,
                        "404": _error("No QR pending (connected, or none yet)"),
                        "409": _error("Another session"),
                    },
                }
            },
            "/api/session/logout": {
                "post": {
                    "summary": "Unlink the device, wipe the session, start pairing again",
                    "requestBody": {**_body({"session_id": {"type": "string"}}), "required": False},
                    "responses": {
                        "200": _ok("Logged out"),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "409": _error("Another session, or a state that forbids it"),
                    },
                }
            },
            **{
                f"/api/session/{action}": {
                    "post": {
                        "summary": summary,
                        "requestBody": {**_body({"session_id": {"type": "string"}}), "required": False},
                        "responses": {
                            **(
                                {
                                    "200": _ok(
                                        "Already connected: the connection was left alone",
                                        {
                                            "state": {"type": "string"},
                                            "connected": {"type": "boolean"},
                                            "phone": {"type": "string", "nullable": True},
                                        },
                                    )
                                }
                                if action == "start"
                                else {}
                            ),
                            "202": _ok(
                                "Accepted; follow the state in /api/session/status", {"state": {"type": "string"}}
                            ),
                            "400": BAD_REQUEST,
                            "401": UNAUTHORIZED,
                            "409": _error("Another session, or a state that forbids it (standby)"),
                            "503": _error("Starting, or the database is unreachable"),
                        },
                    }
                }
                for action, summary in (
                    ("reconnect", "Start a fresh connection round (also takes the stream back after 'replaced')"),
                    ("stop", "Disconnect and stay disconnected, still linked, until start"),
                    ("start", "Connect again after stop"),
                )
            },
            "/api/chats": {
                "get": {
                    "summary": "Chats, latest message first: last message, unanswered count, paused or not, and"
                    " the customer's phone number (null for groups and for a LID chat whose number is not known)",
                    "parameters": [SESSION_ID, LIMIT],
                    "responses": {
                        "200": _ok("Chats", {"chats": {"type": "array", "items": {"type": "object"}}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/chats/{chat}/messages": {
                "get": {
                    "summary": "A chat's messages, newest first; pass next_before as before for the next page",
                    "parameters": [
                        CHAT,
                        SESSION_ID,
                        LIMIT,
                        {
                            "name": "before",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1},
                        },
                    ],
                    "responses": {
                        "200": _ok(
                            "A page of messages",
                            {
                                "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                                "next_before": {"type": "integer", "nullable": True},
                            },
                        ),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/chats/{chat}/release": {
                "post": {
                    "summary": "Give a chat paused by a hand-off (or an operator's answer) back to the bot",
                    "parameters": [CHAT, SESSION_ID],
                    "responses": {
                        "200": _ok("released: false when it was not paused", {"released": {"type": "boolean"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/messages/{row_id}/media": {
                "get": {
                    "summary": "A received file (photo, voice note, video, document, sticker), downloaded through "
                    "whatsmeow now; nothing of it is kept",
                    "parameters": [
                        SESSION_ID,
                        {"name": "row_id", "in": "path", "required": True, "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The file, with its mimetype",
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "401": UNAUTHORIZED,
                        "404": _error("No such message, or it has no file"),
                        "409": _error(
                            "Not this daemon's session, not connected, or sealed with a key this daemon lacks"
                        ),
                        "502": _error("WhatsApp gave no file (expired on its servers, refused)"),
                    },
                }
            },
            "/api/messages/{row_id}": {
                "get": {
                    "summary": "One logged message (its id in the log, as the lists give it)",
                    "parameters": [
                        {"name": "row_id", "in": "path", "required": True, "schema": {"type": "integer"}},
                        SESSION_ID,
                    ],
                    "responses": {
                        "200": _ok("The message", {"message": {"$ref": "#/components/schemas/Message"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "404": _error("No such message in this session"),
                    },
                }
            },
            "/api/bot": {
                "get": {
                    "summary": "Whether the bot's automatic replies are paused",
                    "parameters": [SESSION_ID],
                    "responses": {
                        "200": _ok("Settings", {"replies_paused": {"type": "boolean"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/bot/pause": {
                "post": {
                    "summary": "Pause every automatic reply (messages are still logged; people answer)",
                    "parameters": [SESSION_ID],
                    "responses": {
                        "200": _ok("Paused", {"replies_paused": {"type": "boolean"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/bot/resume": {
                "post": {
                    "summary": "Resume automatic replies",
                    "parameters": [SESSION_ID],
                    "responses": {
                        "200": _ok("Resumed", {"replies_paused": {"type": "boolean"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/outbox": {
                "get": {
                    "summary": "Outgoing messages not sent (yet): queued, sending, failed with their error",
                    "parameters": [
                        SESSION_ID,
                        LIMIT,
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["queued", "sending", "failed"]},
                        },
                    ],
                    "responses": {
                        "200": _ok(
                            "Messages, newest first",
                            {"messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}}},
                        ),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/api/events": {
                "get": {
                    "summary": "Server-sent events: the logged events (message.received, message.sent, "
                    "message.status, chat.handoff, chat.released, session.state, backup.failed, session.corrupt), "
                    "each with its id and resumable from Last-Event-ID (or ?after=); and the status each time it changes (event: status, no "
                    "id). A stream ends after 2 minutes; EventSource reconnects and resumes",
                    "parameters": [
                        {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
                    ],
                    "responses": {
                        "200": {
                            "description": "text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "503": _error("Too many streams open at once (or the database is unreachable)"),
                    },
                }
            },
            "/api/webhooks": {
                "get": {
                    "summary": "Each WEBHOOK_URL's deliveries: settled through which event, pending, delivered, "
                    "failed attempts, given up, retrying (events waiting for a retry), the last error and since when it fails",
                    "responses": {"200": _ok("Endpoints", {"endpoints": {"type": "array"}}), "401": UNAUTHORIZED},
                }
            },
            "/api/session/pairing-code": {
                "post": {
                    "summary": "Link by phone number instead of the QR: the 8-character code (a QR must be pending)",
                    "requestBody": _body(
                        {"session_id": {"type": "string"}, "phone": {"type": "string", "pattern": "^[0-9 ()+-]+$"}},
                        ["phone"],
                    ),
                    "responses": {
                        "200": _ok("The code to type in WhatsApp", {"pairing_code": {"type": "string"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "409": _error("Not this daemon's session, or no QR pending (paired, connecting...)"),
                        "502": _error("WhatsApp gave no code"),
                    },
                }
            },
            "/api/contacts/check": {
                "post": {
                    "summary": "Which phone numbers are on WhatsApp (asked of WhatsApp's servers; connected only)",
                    "requestBody": _body(
                        {"numbers": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 50}},
                        ["numbers"],
                    ),
                    "responses": {
                        "200": _ok(
                            "One answer a number, in the order asked",
                            {
                                "contacts": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "number": {"type": "string"},
                                            "on_whatsapp": {"type": "boolean"},
                                            "jid": {"type": "string", "nullable": True},
                                        },
                                    },
                                }
                            },
                        ),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "409": _error("Not connected to WhatsApp"),
                        "429": _error(
                            "2 number checks are running already (see Retry-After), or too many wrong tokens"
                        ),
                        "502": _error("WhatsApp's client refused the check (the message says why)"),
                        "504": _error("WhatsApp's servers did not answer in time; try again later"),
                    },
                }
            },
            "/api/messages/send": {
                "post": {
                    "summary": "Send a text message (JSON), or a file (multipart/form-data: to, file, caption, "
                    "type: image, document, audio or video, else from the file's type)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            **_body(
                                {
                                    "to": {
                                        "type": "string",
                                        "description": "Phone with country code, a JID, or NUMBER@c.us",
                                    },
                                    "message": {"type": "string", "maxLength": 4096},
                                },
                                ["to", "message"],
                            )["content"],
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["to", "file"],
                                    "properties": {
                                        "to": {"type": "string"},
                                        "file": {"type": "string", "format": "binary", "maxLength": 33554432},
                                        "caption": {"type": "string", "maxLength": 4096},
                                        "type": {"type": "string", "enum": ["image", "document", "audio", "video"]},
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": _ok("Sent at once (daemon without an outbox)", {"message_id": {"type": "string"}}),
                        "202": _ok("Queued in the outbox; sent now or on reconnect", {"id": {"type": "integer"}}),
                        "400": BAD_REQUEST,
                        "401": UNAUTHORIZED,
                        "409": _error("Not paired (or not connected)"),
                    },
                }
            },
        },
    }
