"""One-shot jobs run a while from now (a reconciliation after connecting, a snapshot after pairing).

Not APScheduler "date" jobs: the scheduler removes a fired one-shot job after running it, and when
that overlaps its shutdown it raises JobLookupError in its own thread. A periodic job of the
scheduler, or the ticker (``take_due``), runs them instead."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

Job = Callable[[str], None]


class DeferredJobs:
    """``lock``: the owner's lock (the table is changed under it, as it always was); the jobs run
    outside it, and none once ``stopping`` is set."""

    def __init__(self, lock: AbstractContextManager[object], stopping: threading.Event) -> None:
        self._lock = lock
        self._stopping = stopping
        self._jobs: dict[str, tuple[float, Job]] = {}

    def schedule(self, job: Job, kind: str, delay: float) -> None:
        """Runs job(kind) once, delay seconds from now; scheduling a kind again moves it."""
        with self._lock:
            self._jobs[kind] = (time.monotonic() + delay, job)

    def take_due(self) -> list[tuple[Job, str]]:
        """The jobs due now, each with its kind, taken off the table (none once stopping)."""
        now = time.monotonic()
        with self._lock:
            due = [(kind, job) for kind, (at, job) in self._jobs.items() if at <= now]
            for kind, _ in due:
                del self._jobs[kind]
        return [] if self._stopping.is_set() else [(job, kind) for kind, job in due]
