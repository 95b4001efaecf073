"""Log output, set up the same way in the daemon and in its WhatsApp client process.

``LOG_FORMAT=text`` (the default): ``2026-12-02T00:53:54.893+00:00 INFO bot.runtime: message``.
``LOG_FORMAT=json``: one object a line with ``time`` (ISO 8601 with its offset), ``level``,
``logger``, ``message``, ``session_id`` and ``state`` (once the daemon knows them), and any
fields the call passed in ``extra`` (the access log's method, route, status...).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record came from a call's ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _Context(logging.Filter):
    """Adds the session id and its current state to every record (the daemon binds them)."""

    def __init__(self) -> None:
        super().__init__()
        self.session_id: str | None = None
        self.state: Callable[[], str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = self.session_id
        try:
            record.state = None if self.state is None else self.state()
        except Exception:  # a log line must never fail because the state cannot be read
            record.state = None
        return True


_context = _Context()


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", None),
            "state": getattr(record, "state", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: int, log_format: str = "text") -> None:
    """Before neonize is imported: its import calls basicConfig, a no-op once this has run."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_context)
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def bind(session_id: str, state: Callable[[], str] | None = None) -> None:
    """From now on every line names the session (and its state, read when the line is written)."""
    _context.session_id = session_id
    _context.state = state
