"""OpenAPI pieces of the session's routes (``routes.py``): its stored document (backup, export,
restore, delete) and its connection (status, linking by QR or code, logout, reconnect/stop/start)."""

from __future__ import annotations

from session_api.openapi.parts import (
    BAD_REQUEST,
    SESSION_BODY,
    SESSION_ID,
    UNAUTHORIZED,
    VERSION,
    Schema,
    body,
    error,
    ok,
    parameter,
)


def backup() -> Schema:
    document = {"description": "A zapkeep session document, or a sealed export (object or JSON text)"}
    return {
        "summary": "Back up the live session now, or import a posted session document",
        "requestBody": body({"session_id": {"type": "string"}, "session_data": document}),
        "responses": {
            "200": ok("Backed up (written false: unchanged, nothing written)"),
            "201": ok("Imported", {"version": {"type": "integer"}}),
            "400": error("Malformed body, or a corrupt or foreign session document"),
            "401": UNAUTHORIZED,
            "409": error("No paired live session, or another session"),
            "413": error("Body too large"),
            "507": error("DATA_DIR's disk has no room for the imported local store; nothing changed"),
        },
    }


def export() -> Schema:
    clear = "With SESSION_ENCRYPTION_KEY set: the document unencrypted (it holds the keys)"
    return {
        "summary": "Export the stored session document (or a historical version)",
        "parameters": [
            SESSION_ID,
            parameter("version", "query", VERSION),
            parameter("clear", "query", {"type": "boolean"}, clear),
        ],
        "responses": {
            "200": ok(
                "The document; with SESSION_ENCRYPTION_KEY set (and no clear=true) sealed: "
                '{"format": "zapkeep.sealed-session", "session_id", "key_id", "sealed"}',
                {"session_data": {"type": "object"}},
            ),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No such session or version"),
            "409": error("A stored payload does not decrypt with the configured keys"),
        },
    }


def restore() -> Schema:
    return {
        "summary": "Apply the stored (or a historical) snapshot: stop, rewrite the local store, reconnect",
        "requestBody": body({"session_id": {"type": "string"}, "version": VERSION}),
        "responses": {
            "200": ok("Restored"),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No such session or version"),
            "409": error("Not this daemon's session, a state that forbids it, or a corrupt snapshot"),
            "507": error("DATA_DIR's disk has no room for the restored local store; nothing changed"),
        },
    }


def delete() -> Schema:
    return {
        "summary": "Delete the stored session (history kept unless purge=true)",
        "parameters": [SESSION_ID, parameter("purge", "query", {"type": "boolean"})],
        "responses": {
            "200": ok("Deleted"),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No stored session"),
        },
    }


def status() -> Schema:
    return {
        "summary": "Every session's state, or one with ?session_id=",
        "parameters": [SESSION_ID],
        "responses": {
            "200": ok("Status"),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No such session"),
        },
    }


def qr() -> Schema:
    return {
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
            "404": error("No QR pending (connected, or none yet)"),
            "409": error("Another session"),
        },
    }


def pairing_code() -> Schema:
    phone = {"type": "string", "pattern": "^[0-9 ()+-]+$"}
    return {
        "summary": "Link by phone number instead of the QR: the 8-character code (a QR must be pending)",
        "requestBody": body({"session_id": {"type": "string"}, "phone": phone}, ["phone"]),
        "responses": {
            "200": ok("The code to type in WhatsApp", {"pairing_code": {"type": "string"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "409": error("Not this daemon's session, or no QR pending (paired, connecting...)"),
            "502": error("WhatsApp gave no code"),
        },
    }


def logout() -> Schema:
    return {
        "summary": "Unlink the device, wipe the session, start pairing again",
        "requestBody": SESSION_BODY,
        "responses": {
            "200": ok("Logged out"),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "409": error("Another session, or a state that forbids it"),
        },
    }


CONNECTION_ACTIONS = {
    "reconnect": "Start a fresh connection round (also takes the stream back after 'replaced')",
    "stop": "Disconnect and stay disconnected, still linked, until start",
    "start": "Connect again after stop",
}


ALREADY_CONNECTED = {
    "200": ok(
        "Already connected: the connection was left alone",
        {"state": {"type": "string"}, "connected": {"type": "boolean"}, "phone": {"type": "string", "nullable": True}},
    )
}


def connection(action: str) -> Schema:
    """reconnect, stop and start answer alike: accepted now, the state changes later."""
    return {
        "summary": CONNECTION_ACTIONS[action],
        "requestBody": SESSION_BODY,
        "responses": {
            **(ALREADY_CONNECTED if action == "start" else {}),
            "202": ok("Accepted; follow the state in /api/session/status", {"state": {"type": "string"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "409": error("Another session, or a state that forbids it (standby)"),
            "503": error("Starting, or the database is unreachable"),
        },
    }
