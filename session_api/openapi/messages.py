"""OpenAPI pieces of the message routes: conversations (chats, a chat's messages, one message, its
file), the bot's automatic replies (``conversations.py``), and messages out: the outbox, number
checks, sending (``routes.py``)."""

from __future__ import annotations

from session_api.openapi.parts import (
    BAD_REQUEST,
    CHAT,
    LIMIT,
    MESSAGES,
    ROW_ID,
    SESSION_ID,
    UNAUTHORIZED,
    Schema,
    body,
    content,
    error,
    ok,
    parameter,
)


def chats() -> Schema:
    return {
        "summary": "Chats, latest message first: last message, unanswered count, paused or not, and"
        " the customer's phone number (null for groups and for a LID chat whose number is not known)",
        "parameters": [SESSION_ID, LIMIT],
        "responses": {
            "200": ok("Chats", {"chats": {"type": "array", "items": {"type": "object"}}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
        },
    }


def chat_messages() -> Schema:
    return {
        "summary": "A chat's messages, newest first; pass next_before as before for the next page",
        "parameters": [CHAT, SESSION_ID, LIMIT, parameter("before", "query", {"type": "integer", "minimum": 1})],
        "responses": {
            "200": ok(
                "A page of messages", {"messages": MESSAGES, "next_before": {"type": "integer", "nullable": True}}
            ),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
        },
    }


def release() -> Schema:
    return {
        "summary": "Give a chat paused by a hand-off (or an operator's answer) back to the bot",
        "parameters": [CHAT, SESSION_ID],
        "responses": {
            "200": ok("released: false when it was not paused", {"released": {"type": "boolean"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
        },
    }


def media() -> Schema:
    return {
        "summary": "A received file (photo, voice note, video, document, sticker), downloaded through "
        "whatsmeow now; nothing of it is kept",
        "parameters": [SESSION_ID, ROW_ID],
        "responses": {
            "200": content("The file, with its mimetype", "*/*", {"type": "string", "format": "binary"}),
            "401": UNAUTHORIZED,
            "404": error("No such message, or it has no file"),
            "409": error("Not this daemon's session, not connected, or sealed with a key this daemon lacks"),
            "502": error("WhatsApp gave no file (expired on its servers, refused)"),
        },
    }


def message() -> Schema:
    return {
        "summary": "One logged message (its id in the log, as the lists give it)",
        "parameters": [ROW_ID, SESSION_ID],
        "responses": {
            "200": ok("The message", {"message": {"$ref": "#/components/schemas/Message"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No such message in this session"),
        },
    }


def replies(summary: str, description: str) -> Schema:
    """GET /api/bot and its two switches answer alike: whether replies are paused now."""
    return {
        "summary": summary,
        "parameters": [SESSION_ID],
        "responses": {
            "200": ok(description, {"replies_paused": {"type": "boolean"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
        },
    }


def outbox() -> Schema:
    status = {"type": "string", "enum": ["queued", "sending", "failed"]}
    return {
        "summary": "Outgoing messages not sent (yet): queued, sending, failed with their error",
        "parameters": [SESSION_ID, LIMIT, parameter("status", "query", status)],
        "responses": {
            "200": ok("Messages, newest first", {"messages": MESSAGES}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
        },
    }


def contacts_check() -> Schema:
    numbers = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 50}
    answer = {
        "type": "object",
        "properties": {
            "number": {"type": "string"},
            "on_whatsapp": {"type": "boolean"},
            "jid": {"type": "string", "nullable": True},
        },
    }
    return {
        "summary": "Which phone numbers are on WhatsApp (asked of WhatsApp's servers; connected only)",
        "requestBody": body({"numbers": numbers}, ["numbers"]),
        "responses": {
            "200": ok("One answer a number, in the order asked", {"contacts": {"type": "array", "items": answer}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "409": error("Not connected to WhatsApp"),
            "429": error("2 number checks are running already (see Retry-After), or too many wrong tokens"),
            "502": error("WhatsApp's client refused the check (the message says why)"),
            "504": error("WhatsApp's servers did not answer in time; try again later"),
        },
    }


def _send_body() -> Schema:
    """A text as JSON, or a file as a form."""
    to = {"type": "string", "description": "Phone with country code, a JID, or NUMBER@c.us"}
    session = {"type": "string", "description": "The session to send from (default: the daemon's default session)"}
    text = body({"session_id": session, "to": to, "message": {"type": "string", "maxLength": 4096}}, ["to", "message"])
    form = {
        "type": "object",
        "required": ["to", "file"],
        "properties": {
            "session_id": session,
            "to": {"type": "string"},
            "file": {"type": "string", "format": "binary", "maxLength": 33554432},
            "caption": {"type": "string", "maxLength": 4096},
            "type": {"type": "string", "enum": ["image", "document", "audio", "video"]},
        },
    }
    return {"required": True, "content": {**text["content"], "multipart/form-data": {"schema": form}}}


def send() -> Schema:
    return {
        "summary": "Send a text message (JSON), or a file (multipart/form-data: to, file, caption, "
        "type: image, document, audio or video, else from the file's type)",
        "requestBody": _send_body(),
        "responses": {
            "200": ok("Sent at once (daemon without an outbox)", {"message_id": {"type": "string"}}),
            "202": ok("Queued in the outbox; sent now or on reconnect", {"id": {"type": "integer"}}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "404": error("No such session"),
            "409": error("Not paired (or not connected), or the session is not running"),
        },
    }
