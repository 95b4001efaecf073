"""Credentials encrypted at rest: AES-256-GCM under SESSION_ENCRYPTION_KEY.

Every stored credential payload (a mirrored row, a history snapshot, an export) is sealed on its
own: ``zk1:<key id>:<nonce>:<ciphertext>`` (base64 parts), stored as a JSON string. The associated
data names the key and where the payload belongs (session, row or snapshot), so a ciphertext
copied to another session, table, row or version fails to decrypt instead of being restored.
Metadata the status shows (device JID, push name, sizes, checksums) stays readable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bot.process.config import Config
from bot.process.errors import ConfigError, SessionDocumentError, UnreadableCredentials
from bot.session.document import load_json
from database import PayloadSealer

ENVELOPE = "zk1"
NONCE_BYTES = 12  # random per payload: 2^32 payloads a key stay far below GCM's collision bound
EXPORT_FORMAT = "zapkeep.sealed-session"
API_ANSWER_FIELD = "session_data"  # where GET /api/session/restore puts the export


def key_id_of(key: bytes) -> str:
    """A short public name of a key (a hash: it reveals nothing of the key)."""
    return "k" + hashlib.sha256(b"zapkeep session key id\x00" + key).hexdigest()[:11]


class Sealer:
    """Seals with the current key (None: stores in clear) and opens with any configured key."""

    def __init__(self, current: bytes | None, old: Sequence[bytes] = ()) -> None:
        self._keys = {key_id_of(key): AESGCM(key) for key in (*old, *([current] if current else []))}
        self.key_id = key_id_of(current) if current else None

    @classmethod
    def from_config(cls, config: Config) -> Sealer:
        return cls(config.session_encryption_key, config.session_encryption_keys_old)

    def knows(self, key_id: str) -> bool:
        return key_id in self._keys

    # --- stored payloads (database.PayloadSealer) ---

    def seal(self, text: str, context: tuple[str, ...]) -> str:
        if self.key_id is None:
            return text
        return json.dumps(self._seal(text, context))

    def open(self, stored: str, key_id: str | None, context: tuple[str, ...]) -> str:
        if key_id is None:
            return stored
        try:
            envelope = json.loads(stored)
        except ValueError:
            envelope = None
        return self._open(envelope, key_id, context)

    # --- exports ---

    def seal_export(self, document_text: str, session_id: str) -> str:
        """The export of a session under the current key (or the document itself, with no key)."""
        if self.key_id is None:
            return document_text
        sealed = self._seal(document_text, _export_context(session_id))
        body = {"format": EXPORT_FORMAT, "session_id": session_id, "key_id": self.key_id, "sealed": sealed}
        return json.dumps(body, indent=1)

    def open_export(self, text: str) -> str:
        """The session document in an export, in each form zapkeep writes, as it is: the document
        itself (a clear export, returned unparsed), a sealed export, or the answer of
        ``GET /api/session/restore`` (either of those under ``session_data``)."""
        if EXPORT_FORMAT not in text and f'"{API_ANSWER_FIELD}"' not in text:
            return text
        body = load_json(text, "the export")
        if isinstance(body, dict) and "format" not in body and isinstance(body.get(API_ANSWER_FIELD), dict | str):
            inner = body[API_ANSWER_FIELD]  # the API's answer, saved with curl as it came
            text = inner if isinstance(inner, str) else json.dumps(inner)
            body = load_json(inner, "the export") if isinstance(inner, str) and EXPORT_FORMAT in inner else inner
        if not isinstance(body, dict) or body.get("format") != EXPORT_FORMAT:
            return text
        session_id, key_id = body.get("session_id"), body.get("key_id")
        if not isinstance(session_id, str) or not isinstance(key_id, str):
            raise SessionDocumentError("the sealed export lacks its session_id or key_id")
        return self._open(body.get("sealed"), key_id, _export_context(session_id))

    # --- the envelope ---

    def _seal(self, text: str, context: tuple[str, ...]) -> str:
        assert self.key_id is not None
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._keys[self.key_id].encrypt(nonce, text.encode(), _associated(self.key_id, context))
        return f"{ENVELOPE}:{self.key_id}:{_b64(nonce)}:{_b64(ciphertext)}"

    def _open(self, envelope: Any, key_id: str, context: tuple[str, ...]) -> str:
        where = describe(context)
        aead = self._keys.get(key_id)
        if aead is None:
            raise UnreadableCredentials(
                f"{where} is encrypted with key {key_id}, which is neither SESSION_ENCRYPTION_KEY "
                "nor one of SESSION_ENCRYPTION_KEY_OLD"
            )
        parts = envelope.split(":") if isinstance(envelope, str) else []
        if len(parts) != 4 or parts[0] != ENVELOPE or parts[1] != key_id:
            raise UnreadableCredentials(f"{where} is not a sealed payload of key {key_id} (altered?)")
        try:
            nonce, ciphertext = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
            return aead.decrypt(nonce, ciphertext, _associated(key_id, context)).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise UnreadableCredentials(
                f"{where} does not decrypt: it was altered, or moved from another session, row or snapshot"
            ) from None


def describe(context: tuple[str, ...]) -> str:
    """Where a payload belongs, for an error message (names, never content)."""
    kind, session_id, *rest = context
    if kind == "row":
        return f"session {session_id}: table {rest[0]} row {rest[1]}"
    if kind == "history":
        return f"session {session_id}: history version {rest[0]}"
    return f"session {session_id}: the {kind}"


def require_known_keys(key_ids: set[str | None], sealer: PayloadSealer, session_id: str) -> None:
    """Stop the boot (one line, nothing changed) when stored credentials need a key we lack."""
    missing = sorted(key_id for key_id in key_ids if key_id is not None and not sealer.knows(key_id))
    if missing:
        raise ConfigError(
            f"the stored session {session_id} is encrypted with key {', '.join(missing)}, which neither "
            f"SESSION_ENCRYPTION_KEY ({sealer.key_id or 'unset'}) nor SESSION_ENCRYPTION_KEY_OLD is: "
            "set the key it was stored with (when rotating, the old key goes in SESSION_ENCRYPTION_KEY_OLD)"
        )


def _export_context(session_id: str) -> tuple[str, ...]:
    return ("export", session_id)


def _associated(key_id: str, context: tuple[str, ...]) -> bytes:
    return json.dumps([ENVELOPE, key_id, *context]).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
