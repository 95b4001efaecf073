"""The cell encoding a store's rows share wherever they travel: one SQLite value as one JSON value
(``encode_cell``/``decode_cell``), a row's canonical JSON and its hash. The change capture encodes
rows with it and the document codec (``bot.session.document``) reads and checks them with it; its own
module so that neither of the two has to import the other for it."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from bot.process.errors import SnapshotError

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # built once: per row it shows


def canonical_json(value: Any) -> bytes:
    return _CANONICAL.encode(value).encode()


def encode_cell(value: Any) -> Any:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float):
        return {"real": repr(value)}
    if isinstance(value, str):
        if "\x00" in value:
            return {"t64": base64.b64encode(value.encode()).decode("ascii")}
        return value
    raise SnapshotError(f"unsupported SQLite value of type {type(value).__name__}")


def decode_cell(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((tag, payload),) = value.items()
        if isinstance(payload, str):
            if tag == "b64":
                return base64.b64decode(payload, validate=True)
            if tag == "t64":
                return base64.b64decode(payload, validate=True).decode()
            if tag == "real":
                return float(payload)
    raise ValueError("not a cell value")


def row_hash(encoded_row: list[Any]) -> str:
    return hashlib.sha256(canonical_json(encoded_row)).hexdigest()
