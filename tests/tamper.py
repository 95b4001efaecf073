"""Altering what the database stores, as a failing disk or someone with write access would: the
tests and bench/bench_tampered_row.py share these."""

from __future__ import annotations

import base64
import json

from database import Database


def flip_a_ciphertext_byte(db: Database, table: str = "whatsmeow_pre_keys", session_id: str = "default") -> str:
    """One byte of one stored row's ciphertext flipped; returns the row's key. The row keeps its
    hash and its envelope: only opening it tells."""
    with db.transaction() as tx:
        row = tx.execute(
            "SELECT row_key, CAST(row_data AS TEXT) AS row_text FROM whatsapp_session_rows"
            " WHERE session_id = %s AND table_name = %s ORDER BY row_key LIMIT 1",
            (session_id, table),
        ).fetchone()
        prefix, nonce, ciphertext = json.loads(row["row_text"]).rsplit(":", 2)
        raw = bytearray(base64.b64decode(ciphertext))
        raw[len(raw) // 2] ^= 0x01
        tampered = f"{prefix}:{nonce}:{base64.b64encode(bytes(raw)).decode()}"
        tx.execute(
            "UPDATE whatsapp_session_rows SET row_data = %s WHERE session_id = %s AND table_name = %s AND row_key = %s",
            (db.json_param(json.dumps(tampered)), session_id, table, row["row_key"]),
        )
    return str(row["row_key"])


def contacts_stored(db: Database, prefix: str, session_id: str = "default") -> int:
    """The stored contacts whose JID starts with ``prefix``."""
    with db.transaction() as tx:
        found = tx.execute(
            "SELECT row_key FROM whatsapp_session_rows WHERE session_id = %s AND table_name = %s",
            (session_id, "whatsmeow_contacts"),
        ).fetchall()
    return sum(1 for row in found if f"'{prefix}" in row["row_key"])


def corrupt_events(db: Database, session_id: str = "default") -> list[dict]:
    return [json.loads(e.payload) for e in db.events_after(session_id, 0) if e.event_type == "session.corrupt"]
