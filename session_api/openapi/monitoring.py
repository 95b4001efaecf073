"""OpenAPI pieces of what watches the daemon: metrics, the probes, this document, the event stream
and the webhooks' deliveries (``session_api/__init__.py``, ``live.py``, ``conversations.py``)."""

from __future__ import annotations

from session_api.openapi.parts import BAD_REQUEST, SESSION_ID, UNAUTHORIZED, Schema, content, error, ok, parameter


def metrics() -> Schema:
    return {
        "summary": "Prometheus metrics (the API token, or METRICS_TOKEN when set)",
        "responses": {
            "200": content("Prometheus text exposition format", "text/plain", {"type": "string"}),
            "401": UNAUTHORIZED,
        },
    }


def healthz() -> Schema:
    return {
        "summary": "Liveness (no authentication)",
        "security": [],
        "responses": {
            "200": ok(
                "The process is serving",
                {
                    "status": {"type": "string"},
                    "state": {"type": "string", "nullable": True, "description": "the default session's, when hosted"},
                },
            )
        },
    }


def readyz() -> Schema:
    not_ready = {
        "type": "object",
        "properties": {
            "success": {"type": "boolean", "enum": [False]},
            "ready": {"type": "boolean"},
            "state": {"type": "string"},
            "reason": {"type": "string"},
        },
    }
    return {
        "summary": "Readiness (no authentication): 200 only while the default session is connected to WhatsApp",
        "security": [],
        "responses": {
            "200": ok("Connected: serving customers", {"state": {"type": "string"}}),
            "503": content("Not serving customers; reason says why and what to do", "application/json", not_ready),
        },
    }


def this_document() -> Schema:
    return {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3 document"}, "401": UNAUTHORIZED},
    }


def events() -> Schema:
    return {
        "summary": "Server-sent events: the logged events (message.received, message.sent, "
        "message.status, chat.handoff, chat.released, session.state, backup.failed, session.corrupt), each with "
        "its id and resumable from Last-Event-ID (or ?after=); and the status each time it changes (event: status, no "
        "id). A stream ends after 2 minutes; EventSource reconnects and resumes",
        "parameters": [SESSION_ID, parameter("after", "query", {"type": "integer", "minimum": 0})],
        "responses": {
            "200": content("text/event-stream", "text/event-stream", {"type": "string"}),
            "400": BAD_REQUEST,
            "401": UNAUTHORIZED,
            "503": error("Too many streams open at once (or the database is unreachable)"),
        },
    }


def webhooks() -> Schema:
    return {
        "summary": "Each WEBHOOK_URL's deliveries: settled through which event, pending, delivered, "
        "failed attempts, given up, retrying (events waiting for a retry), the last error and since when it fails",
        "parameters": [SESSION_ID],
        "responses": {"200": ok("Endpoints", {"endpoints": {"type": "array"}}), "401": UNAUTHORIZED},
    }
