"""The daemon's side of the row mirror: store changes -> database, batch by batch, fenced.

The long-lived capture child (``bot.session.capture_host``: one for every session of the daemon)
reads the store's change log (this process never opens the store: neonize's SQLite lives here).
One thread asks it for the changes committed after the last sequence the database has, writes them
in one transaction, and asks again; the child trims what the database has. A whole-store comparison (reconciliation) runs when the mirror starts,
when triggers had to be reinstalled, on a timer and on demand.

While the database is away nothing is lost: the change log keeps every change after the last one
written, and the next batch carries them all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from bot.session.capture_host import MirrorProcess, MirrorProcessError
from bot.session.change_capture import Batch
from bot.process.errors import ZapkeepError, first_line
from bot.session.persistence import SyncResult, write_scan
from bot.session.stored import MirroredRows, StoredCheck, StoredHead, build_head, check_stored_rows, row_changes
from bot.process.retry import RetrySchedule
from bot.process.logs import session_thread
from database import SESSION_CORRUPT, Database, Fence, FencedOut, HeadWrite, MirrorBatch, SessionMissing

log = logging.getLogger("bot.mirror")  # pinned: the name operators see in log lines

RETRY = RetrySchedule((1.0, 2.0, 5.0, 10.0))  # then every 10 s


@dataclass(frozen=True)
class MirrorStatus:
    running: bool
    sequence: int  # the store's change sequence the database holds
    last_mirrored_at: datetime | None
    pending_changes: int  # read from the store, not yet in the database (the database is away)
    batches: int
    rows_written: int
    last_error: str | None
    last_reconcile_at: datetime | None
    last_reconcile_result: str | None
    unreadable_rows: int = 0  # stored rows found not to open (altered or corrupt) since the mirror began
    last_unreadable_at: datetime | None = None


@dataclass
class _ReconcileRequest:
    reason: str
    done: threading.Event
    waited_for: bool = False  # someone waits for the answer (else: the mirror's own need, kept on failure)
    result: SyncResult | None = None
    error: Exception | None = None


class Mirror:
    """Mirrors one session's local store into the database while this process owns the session."""

    def __init__(
        self,
        db: Database,
        session_id: str,
        store_path: Path,
        *,
        fence: Callable[[], Fence | None],
        on_fenced: Callable[[FencedOut, Fence], None],
        poll_wait_seconds: float = 5.0,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._on_batch = on_batch or (lambda rows, size, seconds: None)  # (rows, bytes, seconds) each batch
        self.db = db
        self.session_id = session_id
        self.store_path = store_path
        self._fence = fence
        self._on_fenced = on_fenced
        self._poll_wait = poll_wait_seconds
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._flush = True
        self._thread: threading.Thread | None = None
        self._process: MirrorProcess | None = None
        self._requests: list[_ReconcileRequest] = []
        self._verified: dict[tuple[str, str], int] = {}  # stored forms found to open (check_stored_rows)
        self._deleted = False  # the owner deleted the stored copy (stored_deleted): forget it at the next step
        self._rewriting: tuple[int, str] | None = None  # (log level, why) what was stored is gone, until stored again
        self._rows = MirroredRows()
        self._stored: StoredHead | None = None
        self._tables: list = []
        self._device = None
        self._after = 0
        self._status = MirrorStatus(False, 0, None, 0, 0, 0, None, None, None)

    # --- lifecycle ---

    def start(self) -> None:
        """Begin with a whole-store comparison against what is stored; idempotent."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._requests.append(_ReconcileRequest("start", threading.Event()))
            self._thread = session_thread(self.session_id, self._run, "mirror")
            self._set(running=True)
            self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        """Mirror what is pending (one last read of the store, unless ``flush`` is False), then stop
        the process; idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._flush = flush
        self._stopping.set()
        if thread is threading.current_thread():
            return  # stopped from its own callback: the loop ends by itself
        process = self._process
        if process is not None:
            process.nudge()
        thread.join(timeout=30)
        if thread.is_alive():  # stuck (a database call that does not return): never start a second one
            with self._lock:
                self._thread = thread
            raise ZapkeepError(f"session {self.session_id}: the mirror did not stop within 30 s")
        self._set(running=False)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def status(self) -> MirrorStatus:
        with self._lock:
            return self._status

    def reconcile(self, reason: str = "api", timeout: float = 60.0) -> SyncResult:
        """Compare the whole store with the database and repair any difference, now."""
        request = _ReconcileRequest(reason, threading.Event(), waited_for=True)
        with self._lock:
            if self._thread is None:
                raise ZapkeepError(f"session {self.session_id}: the mirror is not running")
            self._requests.append(request)
            process = self._process
        if process is not None:
            process.nudge()
        if not request.done.wait(timeout):
            raise ZapkeepError(f"session {self.session_id}: reconciliation did not finish within {timeout:.0f} s")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def stored_deleted(self) -> None:
        """The owner has just deleted the stored session itself (an operator's delete): forget what
        was stored. The session is stored again in full at the next change (or the next
        reconciliation), logged as what it is, never as rows change capture missed."""
        with self._lock:
            self._deleted = True
        log.info(
            "session %s: the stored copy was deleted by an operator; the session is written again in full at its "
            "next change or reconciliation",
            self.session_id,
        )

    def _report_installed(self, installed: list[str], known: set[str]) -> None:
        """Capture installed on tables this mirror never saw (a new store, a whatsmeow upgrade) is
        the normal course; on tables it watched, something removed it: worth a warning. (A store
        that lost it while no mirror watched shows in the reconciliation that follows.)"""
        lost = [name for name in installed if name in known]
        if lost:
            log.warning(
                "session %s: change capture was missing on %s; installed it, reconciling",
                self.session_id,
                ", ".join(lost),
            )
        new = [name for name in installed if name not in known]
        if new:
            log.info("session %s: change capture installed on %s", self.session_id, ", ".join(new))

    def _set(self, **changes: object) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    # --- the mirror thread ---

    def _run(self) -> None:
        failures = 0
        loaded = False
        try:
            while True:
                final = self._stopping.is_set()
                if final and not self._flush:
                    return
                try:
                    if not loaded:
                        self._load_stored()
                        loaded = True
                    self._step(final)
                    failures = 0
                except FencedOut as exc:
                    fence = self._fence()
                    self._fail_requests(exc)
                    if fence is not None:
                        self._on_fenced(exc, fence)
                    return
                except MirrorProcessError as exc:
                    log.error("session %s: %s; starting it again", self.session_id, exc)
                    self._set(last_error=first_line(exc))
                    self._close_process()
                    failures += 1
                except Exception as exc:  # the database is away (or refused the batch): keep the changes
                    expected = isinstance(exc, SessionMissing) and self._deleted  # (a batch just caught by the delete)
                    if failures == 0 and not expected:
                        log.warning("session %s: mirroring paused: %s", self.session_id, first_line(exc))
                    self._set(last_error=first_line(exc))
                    self._fail_requests(exc, keep_own=True)
                    failures += 1
                    loaded = False  # what is stored is read again once the database answers
                    if isinstance(exc, SessionMissing):
                        self._queue_reconcile("stored session missing")
                if final:
                    return
                if failures:
                    self._stopping.wait(RETRY.delay(failures))
        finally:
            self._close_process()
            self._fail_requests(ZapkeepError("the mirror stopped"))
            self._set(running=False, pending_changes=0)

    def _load_stored(self) -> None:
        record = self.db.load_session(self.session_id)
        self._stored = StoredHead.of(record)
        self._after = record.mirror_sequence if record is not None else 0
        self._rows = MirroredRows(self.db.row_hashes(self.session_id) if self._stored is not None else {})

    def _ensure_process(self) -> MirrorProcess:
        if self._process is None:
            self._process = MirrorProcess(self.store_path, self.session_id)
        return self._process

    def _close_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.close()

    def _forget_if_deleted(self) -> None:
        with self._lock:
            deleted, self._deleted = self._deleted, False
        if deleted:
            self._forget_stored(logging.INFO, "its stored copy was deleted by an operator")

    def _forget_stored(self, level: int, why: str) -> None:
        """Nothing is stored any more: the next change (or reconciliation) stores the whole session."""
        self._stored = None
        self._rows = MirroredRows()
        self._verified = {}
        self._rewriting = (level, why)

    def _step(self, final: bool) -> None:
        fence = self._fence()
        if fence is None:
            raise FencedOut(f"session {self.session_id}: no lease; not mirroring")
        self._forget_if_deleted()
        with self._lock:
            requests, self._requests = self._requests, []
        if requests:
            try:
                self._reconcile(fence, requests)
            except Exception:
                with self._lock:
                    self._requests = requests + self._requests
                raise
            return
        process = self._ensure_process()
        batch = process.request({"op": "poll", "after": self._after, "wait": 0 if final else self._poll_wait})
        known = {table.name for table in self._tables or []}
        if batch.tables is not None:
            self._tables = batch.tables
        if batch.device is not None:
            self._device = batch.device
        if batch.triggers_installed or batch.tables is not None:
            self._report_installed(batch.triggers_installed, known)
            self._queue_reconcile("triggers reinstalled" if batch.triggers_installed else "schema changed")
            return  # logged rowids may point into a rebuilt table: the whole-store comparison decides
        if not batch.changes:
            self._after = batch.sequence
            return
        self._forget_if_deleted()  # (a delete while the poll waited: this batch alone is not the session)
        if self._stored is None or self._device is None:
            self._queue_reconcile("first rows")  # nothing stored yet: store it whole (once paired)
            return
        self._write(batch, fence)

    def _write(self, batch: Batch, fence: Fence) -> None:
        changes = row_changes(batch)
        self._set(pending_changes=len(changes))
        assert self._stored is not None and self._device is not None
        head = None
        if batch.tables is not None or any(c.table == "whatsmeow_device" for c in changes):
            merged = self._rows.copy()
            merged.apply(changes)
            head_text, checksum, _ = build_head(self._tables, merged, self._device, batch.lineage, batch.sequence)
            head = HeadWrite(
                self.session_id,
                head_text,
                checksum,
                0,  # the document's size is set by the next snapshot
                self._device.jid,
                self._device.push_name,
                batch.lineage,
            )
        else:
            checksum = self._rows.checksum_after(self._tables, changes)
        started = time.perf_counter()
        self.db.write_batch(MirrorBatch(self.session_id, batch.sequence, changes, head, checksum), fence)
        self._on_batch(len(changes), sum(len(c.row_text or "") for c in changes), time.perf_counter() - started)
        self._rows.apply(changes)
        self._after = batch.sequence
        self._stored = replace(self._stored, checksum=checksum)
        status = self.status()
        self._set(
            sequence=batch.sequence,
            last_mirrored_at=datetime.now(UTC),
            pending_changes=0,
            batches=status.batches + 1,
            rows_written=status.rows_written + len(changes),
            last_error=None,
        )

    def _reconcile(self, fence: Fence, requests: list[_ReconcileRequest]) -> None:
        process = self._ensure_process()
        if self._stored is not None and self.db.load_session(self.session_id) is None:  # (not rows missed)
            self._forget_stored(
                logging.WARNING, "its stored copy was found gone (deleted without its owner being told)"
            )
        # What is stored is opened and hashed, not only listed: a row that does not open would be
        # found by the next restore (on another host, after this one is gone) instead of here.
        stored = self._stored is not None
        check = check_stored_rows(self.db, self.session_id, self._verified) if stored else StoredCheck({}, [])
        self._rows = MirroredRows(check.known())
        batch = process.request({"op": "scan", "after": self._after, "known": self._rows.hashes})
        self._tables, self._device = batch.tables or [], batch.device
        result = write_scan(self.db, self.session_id, batch, self._rows, fence, self._stored)
        self._after = batch.sequence
        if check.unreadable:
            found = len(check.unreadable)  # (rewritten as differing rows: not rows change capture missed)
            result = replace(result, missed=max(0, result.missed - found), unreadable=found if result.paired else 0)
            self._report_unreadable(check, repaired=result.paired)
        if result.paired:
            record = self.db.load_session(self.session_id)
            self._stored = StoredHead.of(record)
        reasons = ", ".join(sorted({r.reason for r in requests}))
        if self._rewriting is not None and result.paired:
            level, why = self._rewriting
            log.log(level, "session %s: written again in full (%d rows): %s", self.session_id, result.written_rows, why)
            self._rewriting = None
        elif result.missed and "triggers reinstalled" in reasons:
            log.warning(
                "session %s: stored %d rows written while change capture was not installed",
                self.session_id,
                result.missed,
            )
        elif result.missed:
            log.error(
                "session %s: reconciliation (%s) found %d rows that change capture missed; repaired",
                self.session_id,
                reasons,
                result.missed,
            )
        elif result.written_rows:
            log.info("session %s: reconciliation (%s) wrote %d rows", self.session_id, reasons, result.written_rows)
        if not result.paired:
            outcome = "not paired: nothing to store"
        elif result.unreadable:
            outcome = f"repaired {result.unreadable} stored rows that did not open (altered or corrupt)"
        elif result.missed:
            outcome = f"repaired {result.missed} missed rows"
        else:
            outcome = f"ok ({result.written_rows} rows written)"
        status = self.status()
        self._set(
            sequence=batch.sequence if result.paired else status.sequence,
            last_mirrored_at=datetime.now(UTC) if result.written_rows else status.last_mirrored_at,
            pending_changes=0,
            rows_written=status.rows_written + result.written_rows,
            last_error=None,
            last_reconcile_at=datetime.now(UTC),
            last_reconcile_result=outcome,
        )
        for request in requests:
            request.result = result
            request.done.set()

    def _report_unreadable(self, check: StoredCheck, *, repaired: bool) -> None:
        """Loudly: the log, the status (and its metric), and a ``session.corrupt`` event."""
        tables = check.tables()
        action = "rewritten from the local store" if repaired else "not repaired: the local store is not paired"
        log.error(
            "session %s: %d stored rows did not open (altered or corrupt: %s); %s",
            self.session_id,
            len(check.unreadable),
            ", ".join(f"{table} {count}" for table, count in sorted(tables.items())),
            action,
        )
        status = self.status()
        self._set(
            unreadable_rows=status.unreadable_rows + len(check.unreadable),
            last_unreadable_at=datetime.now(UTC),
        )
        payload = {"unreadable_rows": len(check.unreadable), "tables": tables, "repaired": repaired, "action": action}
        try:
            self.db.record_event(self.session_id, SESSION_CORRUPT, None, payload)
        except Exception as exc:  # (the repair is written; the log and the status still tell)
            log.error("session %s: session.corrupt event not recorded: %s", self.session_id, first_line(exc))

    def _queue_reconcile(self, reason: str) -> None:
        with self._lock:
            self._requests.append(_ReconcileRequest(reason, threading.Event()))

    def _fail_requests(self, error: Exception, *, keep_own: bool = False) -> None:
        """Answer every waiting caller with the error; the mirror's own reconciliations stay queued
        (once) when ``keep_own``."""
        with self._lock:
            requests, self._requests = self._requests, []
            own = [r for r in requests if not r.waited_for]
            if keep_own and own:
                self._requests = [own[0]]
        for request in requests:
            if request.waited_for:
                request.error = error
                request.done.set()
