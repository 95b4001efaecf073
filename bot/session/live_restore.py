"""A live restore, import or logout, one part of the runtime: checked first, then handed to the
connection supervisor, which applies it while no client has the store open.

``LiveRestore`` is a base class of ``bot.runtime.Runtime``: it uses the runtime's state and lock as
it did inside the runtime."""

from __future__ import annotations

import logging

from bot.session import document as session_document
from bot.connection.supervisor import Pending
from bot.process.errors import SessionDocumentError, StateConflictError
from bot.session.persistence import export_document
from bot.session.restores import RestoreOutcome, RestoreRequest
from bot.session.state import State
from bot.session.store_worker import document_rows

log = logging.getLogger("bot.runtime")  # the runtime's log lines, unchanged by the move


class LiveRestore:
    """The admin API's restore, import and logout of a ``Runtime``."""

    def restore(self, version: int | None = None, *, timeout: float = 120.0) -> RestoreOutcome:
        """Stop the client, rewrite the local store from the stored (or a historical) snapshot, reconnect."""
        _, text = export_document(self.db, self.config.session_id, version)  # NotFoundError when there is none
        kind = "current" if version is None else "history"
        return self._apply_live(RestoreRequest(kind, text, version), timeout)

    def import_document(self, document_text: str, *, timeout: float = 120.0) -> RestoreOutcome:
        """An admin's document becomes this live session: applied as a restore is (stop, rewrite,
        reconnect), so the running client never overwrites it with the state it replaced."""
        return self._apply_live(RestoreRequest("import", document_text), timeout)

    def _apply_live(self, request: RestoreRequest, timeout: float) -> RestoreOutcome:
        session_id = self.config.session_id
        if self.state in (State.REPLACED, State.STOPPED, State.STANDBY, State.STARTING):
            raise StateConflictError(f"session {session_id} is {self.state.value}; it cannot be restored here")
        # Check the whole document before stopping a live client for it: decoded, then built aside.
        document = session_document.validate_document(session_document.parse_document(request.document_text))
        if document.device_field("jid") is None:
            raise SessionDocumentError("the session document holds no paired device")
        if request.kind == "import":  # (the stored session and history were checked when they were stored)
            document_rows(request.document_text)
        with self._lock:
            self._restore_request = request
        self._stop_client(Pending.RESTORE)
        if not request.done.wait(timeout):
            raise StateConflictError(f"session {session_id}: the restore did not finish within {timeout:.0f} s")
        if request.error is not None:
            raise request.error
        assert request.outcome is not None
        return request.outcome

    def logout(self) -> bool:
        """Unlink the device (when the servers can be reached), wipe, pair again. True: unlinked remotely."""
        if self.state in (State.REPLACED, State.STOPPED, State.STANDBY, State.STARTING):
            raise StateConflictError(f"session {self.config.session_id} is {self.state.value}; cannot log out")
        client = self._live_client()
        unlinked = False
        if client is not None:
            try:
                client.logout()
                unlinked = True
            except Exception as exc:
                log.warning("session %s: logout request failed (%s); wiping locally", self.config.session_id, exc)
        with self._lock:
            self._held = False  # unlinked: pairing again is the way back, whatever stop said before
            self._set(state=State.LOGGED_OUT, connected_since=None, last_error="logged out by an admin")
        self._stop_client(Pending.LOGGED_OUT)
        return unlinked
