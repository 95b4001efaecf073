"""One thread that runs every session's quick periodic checks (the lease watchdog, due one-shot
jobs), and a few workers for the jobs those checks find due.

Four scheduler jobs a second per session were fine for one session; for a hundred they are 800
job runs a second through APScheduler. The checks take microseconds, so one thread runs them all in
turn; whatever takes longer (a reconciliation, a snapshot) goes to the workers, never the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bot.process.errors import first_line

log = logging.getLogger(__name__)

Check = Callable[[], None]


@dataclass
class _Entry:
    check: Check
    every: float
    due_at: float  # monotonic


class Ticker:
    def __init__(self, interval_seconds: float = 0.25, workers: int = 4) -> None:
        self._interval = interval_seconds
        self._checks: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jobs")

    def add(self, name: str, check: Check, every: float | None = None) -> None:
        """Runs ``check`` every interval from now on, or every ``every`` seconds (rounded up to
        intervals); a name added again replaces its check."""
        with self._lock:
            self._checks[name] = _Entry(check, every or self._interval, time.monotonic() + (every or 0.0))
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)
                self._thread.start()

    def remove(self, name: str) -> None:
        with self._lock:
            self._checks.pop(name, None)

    def submit(self, job: Callable[..., None], *args: object) -> None:
        """Runs a longer job on a worker (errors are logged, as the scheduler logs its jobs')."""
        if self._stopping.is_set():
            return
        self._workers.submit(self._guarded, job, *args)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._workers.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                due = [entry for entry in self._checks.values() if entry.due_at <= now]
                for entry in due:
                    entry.due_at = now + entry.every
            for entry in due:
                self._guarded(entry.check)

    @staticmethod
    def _guarded(job: Callable[..., None], *args: object) -> None:
        try:
            job(*args)
        except Exception as exc:  # one session's failure must not stop the others' checks
            log.error("periodic job %s failed: %s", getattr(job, "__qualname__", job), first_line(exc))
