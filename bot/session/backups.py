"""The session's backups beyond the mirror's change-by-change copy: whole-store reconciliations
and full snapshots into history (periodic, after pairing, at shutdown and on demand)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.process.errors import first_line
from bot.session.mirror import Mirror
from bot.session.persistence import snapshot_to_history
from bot.session.state import BACKUP_STATES, HISTORY_STATES, SessionStatus, State
from database import Database, Fence, FencedOut

log = logging.getLogger("bot.backups")  # pinned: the name operators see in log lines


@dataclass(frozen=True)
class BackupOutcome:
    """An on-demand backup: the whole store compared with the database, and a history snapshot."""

    written_rows: int
    version: int | None  # the newest full snapshot in history
    new_snapshot: bool
    checksum: str | None
    total_rows: int
    size_bytes: int
    duration_ms: float


@dataclass(frozen=True)
class SessionView:
    """What backups need to know of the runtime, and tell it."""

    fence: Callable[[], Fence | None]
    state: Callable[[], State]
    status: Callable[[], SessionStatus]
    update: Callable[..., None]  # fields of the status
    lose: Callable[[str, Fence], None]  # the database refused a write: the lease is gone


class Backups:
    def __init__(self, db: Database, session_id: str, mirror: Mirror, session: SessionView) -> None:
        self.db = db
        self.session_id = session_id
        self._mirror = mirror
        self._session = session
        # Held by whatever replaces the stored session wholesale (snapshots, restores, wipes).
        self.lock = threading.Lock()

    def backup_now(self, reason: str = "api") -> BackupOutcome | None:
        """Compare the whole store with the database (repairing any difference), then keep a full
        snapshot in history if it changed. None: this process holds no live session."""
        started = time.perf_counter()
        fence = self._session.fence()
        if fence is None or self._session.state() not in BACKUP_STATES or not self._mirror.running:
            return None
        try:
            result = self._mirror.reconcile(reason)
            if not result.paired:
                return None
            version = self.snapshot(reason)
        except FencedOut as exc:
            self._session.lose(str(exc), fence)
            return None
        except Exception as exc:
            log.error("session %s: %s backup failed: %s", self.session_id, reason, exc)
            self._session.update(last_backup_error=first_line(exc))
            return None
        status = self._session.status()
        return BackupOutcome(
            written_rows=result.written_rows,
            version=status.last_backup_version,
            new_snapshot=version is not None,
            checksum=result.checksum,
            total_rows=result.total_rows,
            size_bytes=status.last_backup_size or 0,
            duration_ms=(time.perf_counter() - started) * 1000,
        )

    def reconcile(self, reason: str) -> None:
        """A scheduled job: never raises."""
        if self._session.fence() is None or not self._mirror.running:
            return
        try:
            self._mirror.reconcile(reason)
        except Exception as exc:
            log.warning("session %s: %s reconciliation failed: %s", self.session_id, reason, first_line(exc))

    def history(self, reason: str) -> None:
        """A scheduled job: a snapshot into history while the session is this process's."""
        if self._session.fence() is not None and self._session.state() in HISTORY_STATES:
            if reason == "after-pair" and self._mirror.running:
                self.reconcile(reason)  # everything pairing wrote is stored before the snapshot
            self.snapshot(reason)

    def snapshot(self, reason: str, *, unless_newer_than: float | None = None) -> int | None:
        """A full snapshot of the stored session into history, unless the newest one is the same."""
        fence = self._session.fence()
        if fence is None:
            return None
        try:
            with self.lock:
                version = snapshot_to_history(
                    self.db, self.session_id, fence, reason, unless_newer_than=unless_newer_than
                )
        except FencedOut as exc:
            self._session.lose(str(exc), fence)
            return None
        except Exception as exc:
            log.error("session %s: %s snapshot failed: %s", self.session_id, reason, first_line(exc))
            self._session.update(last_backup_error=first_line(exc))
            return None
        if version is not None:
            record = self.db.load_session(self.session_id)
            if record is not None:
                self._session.update(
                    last_backup_version=record.version,
                    last_backup_size=record.size_bytes,
                    last_backup_checksum=record.checksum,
                    push_name=record.push_name or self._session.status().push_name,
                    last_backup_error=None,
                )
        return version
