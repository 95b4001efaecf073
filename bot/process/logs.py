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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record came from a call's ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _Context(logging.Filter):
    """Adds the session id and its current state to every record: the session the thread works
    for (a daemon hosting many), else the one the daemon bound (a daemon hosting one)."""

    def __init__(self) -> None:
        super().__init__()
        self.session_id: str | None = None
        self.state: Callable[[], str] | None = None
        self.states: dict[str, Callable[[], str]] = {}  # every hosted session's, by id
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        session_id = getattr(self.local, "session_id", None) or self.session_id
        state = self.states.get(session_id) if session_id is not None else None
        record.session_id = session_id
        try:
            record.state = None if state is None else state()
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


def bind(session_id: str) -> None:
    """From now on every line names the session (a daemon hosting one)."""
    _context.session_id = session_id


def track(session_id: str, state: Callable[[], str] | None) -> None:
    """Lines about ``session_id`` carry its state, read when a line is written (None: forget it)."""
    if state is None:
        _context.states.pop(session_id, None)
    else:
        _context.states[session_id] = state


@contextmanager
def working_for(session_id: str) -> Iterator[None]:
    """Lines written by this thread meanwhile name ``session_id`` (a shared worker running one
    session's job)."""
    previous = getattr(_context.local, "session_id", None)
    _context.local.session_id = session_id
    try:
        yield
    finally:
        _context.local.session_id = previous


def session_thread(session_id: str, target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread of one session's: every line it writes names the session."""

    def run() -> None:
        _context.local.session_id = session_id
        target()

    return threading.Thread(target=run, name=name, daemon=True)
