"""One thread that runs every session's quick periodic checks (the lease watchdog, due one-shot
jobs), and a few workers for the jobs those checks find due.

Four scheduler jobs a second per session were fine for one session; for a hundred they are 800
job runs a second through APScheduler. The checks take microseconds, so one thread runs them all in
turn; whatever takes longer (a reconciliation, a snapshot) goes to the workers, never the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bot.process.errors import first_line

log = logging.getLogger(__name__)

Check = Callable[[], None]


class Ticker:
    def __init__(self, interval_seconds: float = 0.25, workers: int = 4) -> None:
        self._interval = interval_seconds
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jobs")

    def add(self, name: str, check: Check) -> None:
        """Runs ``check`` every interval from now on (a name added again replaces its check)."""
        with self._lock:
            self._checks[name] = check
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
            with self._lock:
                checks = list(self._checks.values())
            for check in checks:
                self._guarded(check)

    @staticmethod
    def _guarded(job: Callable[..., None], *args: object) -> None:
        try:
            job(*args)
        except Exception as exc:  # one session's failure must not stop the others' checks
            log.error("periodic job %s failed: %s", getattr(job, "__qualname__", job), first_line(exc))
