"""Issue 25 item 4: an operator deletes the stored session beside its live owner, which stores it
again in full and says so, never blaming change capture."""

from __future__ import annotations

import json
import logging

import pytest

from bot.session import cells
from bot.session.persistence import export_document
from bot.session.document import validate_document
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import mirrored, start_paired
from tests.synthetic import table_rows, take_snapshot

WRITTEN_AGAIN = "written again in full ("  # the line of the rewrite itself


def stored_table_rows(db: Database) -> dict[str, list[tuple]]:
    """What the database holds, in the shape of ``table_rows`` (every table of the head, sorted)."""
    record = db.load_session("default")
    assert record is not None
    rows: dict[str, list[tuple]] = {t["name"]: [] for t in json.loads(record.session_data)["tables"]}
    for row in db.load_rows("default"):
        rows[row.table].append(tuple(cells.decode_cell(v) for v in json.loads(row.row_text)))
    return {name: sorted(values, key=repr) for name, values in sorted(rows.items())}


@pytest.mark.parametrize("next_event", ["change", "reconciliation"])
def test_a_stored_copy_deleted_beside_its_live_owner_is_stored_again_in_full_and_nothing_is_called_missed(
    runtime_factory, network: FakeWhatsApp, db: Database, caplog: pytest.LogCaptureFixture, next_event: str
) -> None:
    caplog.set_level(logging.INFO, logger="bot.mirror")
    runtime = runtime_factory()
    client = start_paired(runtime, network, db)
    store = runtime.config.store_path
    fence = runtime.fence
    assert fence is not None
    # What the owner does for DELETE /api/session/delete: its own fenced delete, then tell its mirror.
    assert db.delete_session("default", keep_history=True, fence=fence)
    runtime._mirror.stored_deleted()
    assert db.load_session("default") is None  # nothing was written back behind the operator's back
    if next_event == "change":
        client.write_store(3)
    else:
        runtime._mirror.reconcile("timer")  # the periodic reconciliation, with nothing changed
    wait_until(lambda: mirrored(runtime, db), message="the session stored again")
    wait_until(lambda: WRITTEN_AGAIN in caplog.text, message="the rewrite logged")
    assert stored_table_rows(db) == table_rows(store)  # in full: every row, not only the changed ones
    _, text = export_document(db, "default")
    assert validate_document(json.loads(text)).checksum == take_snapshot(store)["checksum"]
    lines = [r for r in caplog.records if r.name == "bot.mirror"]
    rewrite = [r for r in lines if WRITTEN_AGAIN in r.getMessage()]
    assert len(rewrite) == 1 and rewrite[0].levelno == logging.INFO
    assert "deleted by an operator" in rewrite[0].getMessage()
    assert not [r for r in lines if "missed" in r.getMessage() or r.levelno >= logging.WARNING]
