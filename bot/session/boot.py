"""The boot at every take-over, one part of the runtime: keys checked, credentials resealed, the
local store prepared from what is stored (or a migrated one stored at once).

``SessionBoot`` is a base class of ``bot.runtime.Runtime``: it uses the runtime's state as it did
inside the runtime."""

from __future__ import annotations

import logging
from datetime import UTC

from bot.process.errors import SessionDocumentError, StoredSessionUnreadable, first_line
from bot.session.persistence import BootOutcome, prepare_local_store, sync_session
from bot.session.sealing import require_known_keys
from bot.session.state import State, now, phone_of
from database import SESSION_CORRUPT, SessionRecord

log = logging.getLogger("bot.runtime")  # the runtime's log lines, unchanged by the move


class SessionBoot:
    """What a ``Runtime`` does once the lease is its own, before it connects."""

    def _boot(self) -> None:
        self._set(state=State.STARTING)
        # Checked at every take-over, not only at start: another instance (or a rekey) may have
        # moved the stored session to a key this one lacks. Then it must neither restore an older
        # snapshot it can read nor mirror under its own key: it gives the lease up (ConfigError).
        require_known_keys(self.db.key_ids(self.config.session_id), self.db.sealer, self.config.session_id)
        self._reseal()
        self._needs_restore = False
        try:
            result = prepare_local_store(self.db, self.config.session_id, self.config.store_path, self.fence)
        except StoredSessionUnreadable as exc:
            self._refuse_unreadable(exc)
            return
        except SessionDocumentError as exc:
            # Nothing stored can be restored; the local store was left as it was.
            log.error("session %s: %s", self.config.session_id, exc)
            self._set(last_error=first_line(exc), boot_error=first_line(exc))
            return
        log.info("session %s boot: %s", self.config.session_id, result.outcome.value)
        if result.outcome is not BootOutcome.PAIRING_NEEDED:
            self._set(jid=result.device_jid, phone=phone_of(result.device_jid))
        record = result.record  # loaded once, by the boot rule
        if result.outcome is BootOutcome.MIGRATED:
            record = self._store_migrated()
        if record is not None:
            self._set(
                last_backup_at=record.updated_at.replace(tzinfo=UTC),
                last_backup_size=record.size_bytes,
                last_backup_checksum=record.checksum,
                last_backup_version=record.version,
                push_name=record.push_name,
            )

    def _refuse_unreadable(self, exc: StoredSessionUnreadable) -> None:
        """Stored rows do not open: stay off WhatsApp and roll nothing back, loudly (the status,
        /readyz, a ``session.corrupt`` event), until an operator restores or imports on purpose."""
        session_id = self.config.session_id
        log.error("session %s: %s", session_id, exc)
        self._needs_restore = True
        record = self.db.load_session(session_id)  # (the head stays readable: the number is shown)
        jid = record.device_jid if record is not None else None
        self._set(
            jid=jid,
            phone=phone_of(jid),
            push_name=record.push_name if record is not None else None,
            last_error=first_line(exc),
            boot_error=first_line(exc),
            unreadable_rows=self._status.unreadable_rows + exc.rows,
            last_unreadable_at=now(),
        )
        action = "refused at boot: nothing rolled back; an operator restores a history version or imports"
        payload = {"unreadable_rows": exc.rows, "tables": exc.tables, "repaired": False, "action": action}
        try:
            self.db.record_event(session_id, SESSION_CORRUPT, None, payload)
        except Exception as event_error:  # (the status and /readyz still tell)
            log.error("session %s: session.corrupt event not recorded: %s", session_id, first_line(event_error))

    def _store_migrated(self) -> SessionRecord | None:
        """A paired local store met an empty database: stored whole and kept in history now, before
        connecting, so that the first snapshot does not wait for the shutdown or the periodic job."""
        try:
            sync_session(self.db, self.config.session_id, self.config.store_path, self.fence)
            self.backups.snapshot("migrated")
            return self.db.load_session(self.config.session_id)
        except Exception as exc:  # the mirror stores it once it runs; the snapshot follows then
            log.warning("session %s: storing the migrated store failed: %s", self.config.session_id, first_line(exc))
            self._schedule(self.backups.history, "after-pair", self._timing.after_pair_seconds)
            return None

    def _reseal(self) -> None:
        """Stored credentials not under the current key (in clear before a key was set, or under a
        rotated-out one) are re-encrypted by their owner, fenced, before anything reads them.
        Decrypting (no key, an old one given) is only ever done on purpose: ``python -m bot rekey``."""
        if self.db.sealer.key_id is None:
            return
        count = self.db.reseal(self.config.session_id, self.fence)
        if count.unreadable:
            log.error(
                "session %s: %d stored payloads do not decrypt (altered, or moved from another session or row); "
                "the restore refuses them",
                self.config.session_id,
                count.unreadable,
            )
        if count.rows or count.snapshots:
            log.info(
                "session %s: %d rows and %d history snapshots re-encrypted with %s",
                self.config.session_id,
                count.rows,
                count.snapshots,
                f"key {self.db.sealer.key_id}",
            )
