"""Replacing the session wholesale: a restore (the stored session, a version from history, an
admin's document) and the wipe after an unlink. The supervisor runs them between client rounds,
while nothing has the local store open."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot.session.change_capture import new_lineage
from bot.process.errors import DiskFullError, UnreadableCredentials, ZapkeepError, first_line
from bot.session.mirror import Mirror
from bot.session.persistence import export_document, make_current, snapshot_to_history
from bot.session.document import STORE_SIBLING_SUFFIXES, discard_built, install_store
from bot.session.store_worker import BuiltStore, build_store
from database import Database, Fence, FencedOut, SessionRecord

log = logging.getLogger("bot.restores")  # pinned: the name operators see in log lines


@dataclass(frozen=True)
class RestoreOutcome:
    session_id: str
    version: int
    checksum: str
    size_bytes: int


@dataclass
class RestoreRequest:
    """Handed from an API thread to the supervisor, which sets ``done`` with an outcome or an error."""

    kind: str  # "current": the stored session; "history": a version of it; "import": an admin's document
    document_text: str
    version: int | None = None  # of the historical snapshot
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None
    outcome: RestoreOutcome | None = None


class Restores:
    def __init__(
        self,
        db: Database,
        session_id: str,
        store_path: Path,
        mirror: Mirror,
        lock: threading.Lock,
        fence: Callable[[], Fence | None],
        lose: Callable[[str, Fence], None],
    ) -> None:
        self.db = db
        self.session_id = session_id
        self.store_path = store_path
        self._mirror = mirror
        self._lock = lock  # the backups' lock: no snapshot runs while the session is replaced
        self._fence = fence
        self._lose = lose

    def apply(self, request: RestoreRequest) -> tuple[RestoreOutcome, SessionRecord]:
        """The request's document becomes the stored session, then the local store. Raises, with
        the local store and the stored session unchanged, when it cannot (DiskFullError: no room
        on DATA_DIR's disk)."""
        session_id, fence = self.session_id, self._fence()
        with self._lock:
            self._mirror.stop()  # what the client wrote last is in the database first
            text, version, lineage, sequence = request.document_text, request.version, new_lineage(), 0
            if request.kind == "current":  # the flush moved the stored session on: what is stored now
                record, text = export_document(self.db, session_id)
                sequence, version = record.mirror_sequence, record.version
            # The new local store is built aside first, the step that needs the disk: a full disk
            # refuses it here, before anything changed (else the mirror would push the old store
            # back over the new stored session and call the difference missed changes).
            built = self._build(text, lineage, sequence)
            try:
                try:
                    snapshot_to_history(self.db, session_id, fence, f"before-{request.kind}")  # the old one kept
                except UnreadableCredentials as exc:  # an operator replaces a stored session that does not open
                    log.warning("session %s: no snapshot kept of the replaced session: %s", session_id, first_line(exc))
                # The database takes the new version before the local store does: a crash in
                # between boots into it, never back into the replaced one.
                if request.kind == "current":
                    self.db.set_lineage(session_id, lineage, sequence, fence)
                else:
                    make_current(self.db, session_id, text, fence, lineage=lineage)
                install_store(built.path, self.store_path)
            finally:
                discard_built(built.path)  # (gone once installed)
            log.info(
                "restored session %s version %d: %d tables, %d rows, %d bytes in %.0f ms",
                session_id,
                version or 0,
                built.summary.tables,
                built.summary.rows,
                len(text),
                built.summary.duration_ms,
            )
            if request.kind == "import":
                snapshot_to_history(self.db, session_id, fence, "import")
        stored = self.db.load_session(session_id)
        assert stored is not None  # just written, under this process's fence
        if request.kind == "import" or version is None:
            version = stored.version
        return RestoreOutcome(session_id, version, stored.checksum, stored.size_bytes), stored

    def _build(self, text: str, lineage: str, sequence: int) -> BuiltStore:
        try:
            return build_store(text, self.store_path, lineage=lineage, sequence=sequence)
        except DiskFullError as exc:
            data_dir = self.store_path.parent.parent.parent  # DATA_DIR/sessions/<id>/whatsmeow.sqlite3
            free = shutil.disk_usage(self.store_path.parent).free
            raise DiskFullError(
                f"DATA_DIR's disk is full ({data_dir}: {free // 1024} KiB free): no room to build the restored "
                "local store; the local store and the stored session were left as they were. Free space on "
                "that disk and try again."
            ) from exc

    def wipe(self) -> None:
        """After an unlink: forget the credentials locally and in the database (history stays)."""
        with self._lock:
            try:
                self._mirror.stop(flush=False)
            except ZapkeepError as exc:  # its writes are fenced and the session is deleted below anyway
                log.error("session %s: %s", self.session_id, exc)
            for path in (self.store_path, *(Path(f"{self.store_path}{s}") for s in STORE_SIBLING_SUFFIXES)):
                path.unlink(missing_ok=True)
            fence = self._fence()
            try:
                if fence is not None:  # never an unfenced delete from a process that lost the session
                    self.db.delete_session(self.session_id, keep_history=True, fence=fence)
            except FencedOut as exc:
                self._lose(str(exc), fence)
            except Exception as exc:
                log.error("session %s: could not delete the stored session: %s", self.session_id, exc)
        log.warning("session %s: device unlinked; local store and stored session wiped, pairing again", self.session_id)
