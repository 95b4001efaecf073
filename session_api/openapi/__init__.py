"""OpenAPI 3 description of the admin API, served at /api/openapi.json (a test keeps it true).

Assembled from small pieces, one function an operation, in a module an area beside this one:
``session`` (the stored session and its connection), ``messages`` (conversations, the bot's
replies, messages out), ``monitoring`` (metrics, probes, this document, events, webhooks), with
the fragments they share in ``parts``. ``_paths`` is the table of contents: which piece answers
which path and method, in the order the document lists them; a new route adds its piece in its
area and one line here. The pieces live in this package rather than beside the views because the
views import it (to serve the document).
"""

from __future__ import annotations

from typing import Any

from session_api.openapi import instances, messages, monitoring, session, sessions
from session_api.openapi.parts import ERROR_SCHEMA, EVERY_PROTECTED_ROUTE, MESSAGE_SCHEMA, Schema


def _paths() -> dict[str, dict[str, Schema]]:
    seed = _session_routes()
    one = sessions.per_session(sessions.one(session.status()), forwarded=False)
    return {
        **{
            path: {m: sessions.forwarded(op) if (m, path) in FORWARDED else op for m, op in item.items()}
            for path, item in seed.items()
        },
        "/api/sessions": {"get": sessions.list_sessions(), "post": sessions.create()},
        "/api/sessions/{session_id}": {"get": one, "delete": sessions.delete()},
        **{
            f"/api/sessions/{{session_id}}{tail}": {
                m: sessions.per_session(op, forwarded=(m, path) in FORWARDED) for m, op in seed[path].items()
            }
            for path, tail in PER_SESSION.items()
        },
        "/api/commands/{command_id}": {"get": sessions.command()},
        "/api/instances": {"get": instances.list_instances()},
    }


# Each session route's form under /api/sessions/{session_id} (the same view, the session from the path).
PER_SESSION = {
    "/api/session/backup": "/backup",
    "/api/session/restore": "/restore",
    "/api/session/qr": "/qr",
    "/api/session/pairing-code": "/pairing-code",
    "/api/session/logout": "/logout",
    **{f"/api/session/{action}": f"/{action}" for action in session.CONNECTION_ACTIONS},
    "/api/messages/send": "/send",
    "/api/contacts/check": "/contacts/check",
    "/api/chats": "/chats",
    "/api/chats/{chat}/messages": "/chats/{chat}/messages",
    "/api/chats/{chat}/release": "/chats/{chat}/release",
    "/api/messages/{row_id}": "/messages/{row_id}",
    "/api/messages/{row_id}/media": "/messages/{row_id}/media",
    "/api/outbox": "/outbox",
    "/api/bot": "/bot",
    "/api/bot/pause": "/bot/pause",
    "/api/bot/resume": "/bot/resume",
    "/api/events": "/events",
    "/api/webhooks": "/webhooks",
}
# Writes (and the QR) for a session that another process owns go to that owner as a command.
FORWARDED = {
    ("post", "/api/session/backup"),
    ("post", "/api/session/restore"),
    ("delete", "/api/session/delete"),
    ("get", "/api/session/qr"),
    ("post", "/api/session/pairing-code"),
    ("post", "/api/session/logout"),
    *(("post", f"/api/session/{action}") for action in session.CONNECTION_ACTIONS),
    ("post", "/api/messages/send"),
    ("post", "/api/contacts/check"),
}


def _session_routes() -> dict[str, dict[str, Schema]]:
    """The seed's routes, each once."""
    return {
        "/metrics": {"get": monitoring.metrics()},
        "/healthz": {"get": monitoring.healthz()},
        "/readyz": {"get": monitoring.readyz()},
        "/api/openapi.json": {"get": monitoring.this_document()},
        "/api/session/backup": {"post": session.backup()},
        "/api/session/restore": {"get": session.export(), "post": session.restore()},
        "/api/session/status": {"get": session.status()},
        "/api/session/delete": {"delete": session.delete()},
        "/api/session/qr": {"get": session.qr()},
        "/api/session/logout": {"post": session.logout()},
        **{f"/api/session/{action}": {"post": session.connection(action)} for action in session.CONNECTION_ACTIONS},
        "/api/chats": {"get": messages.chats()},
        "/api/chats/{chat}/messages": {"get": messages.chat_messages()},
        "/api/chats/{chat}/release": {"post": messages.release()},
        "/api/messages/{row_id}/media": {"get": messages.media()},
        "/api/messages/{row_id}": {"get": messages.message()},
        "/api/bot": {"get": messages.replies("Whether the bot's automatic replies are paused", "Settings")},
        "/api/bot/pause": {
            "post": messages.replies("Pause every automatic reply (messages are still logged; people answer)", "Paused")
        },
        "/api/bot/resume": {"post": messages.replies("Resume automatic replies", "Resumed")},
        "/api/outbox": {"get": messages.outbox()},
        "/api/events": {"get": monitoring.events()},
        "/api/webhooks": {"get": monitoring.webhooks()},
        "/api/session/pairing-code": {"post": session.pairing_code()},
        "/api/contacts/check": {"post": messages.contacts_check()},
        "/api/messages/send": {"post": messages.send()},
    }


def _protected(operation: Schema) -> Schema:
    """A protected route (one that answers 401) also lists what every protected route can answer;
    the route's own description of a code comes first."""
    own = operation["responses"]
    if "401" not in own:
        return operation
    return {**operation, "responses": {**own, **{k: v for k, v in EVERY_PROTECTED_ROUTE.items() if k not in own}}}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "zapkeep admin API",
            "version": "1.0.0",
            "description": "Inspect and manage the WhatsApp session of a zapkeep daemon.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Message": MESSAGE_SCHEMA, "Error": ERROR_SCHEMA},
        },
        "security": [{"bearer": []}],
        "paths": {
            path: {method: _protected(operation) for method, operation in item.items()}
            for path, item in _paths().items()
        },
    }
