"""Snapshot -> restore -> snapshot is the identity, for any contents whatsmeow's schema can hold;
format 2 checksums do not depend on the order of the rows (a document is assembled from rows
mirrored one by one)."""

from __future__ import annotations

import copy
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.session.document import restore_snapshot, validate_document
from tests.synthetic import take_snapshot
from tests.synthetic import create_paired_store, table_rows

# The test process never loads neonize, so it may open stores with sqlite3 directly.

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# What a text column of whatsmeow's may hold (bot/session/store_schema.py): text, bytes, integers, NULL.
text_cells = st.one_of(st.none(), int64, st.text(), st.binary(max_size=300))
# Key columns hold no NUL: a row's key is SQLite's quote() of its key columns, which stops at a NUL
# ('' and '\x00' would be one key). whatsmeow's keys are JIDs and ids; docs/design.md notes it.
key_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
contact_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40)
contacts = st.lists(
    st.tuples(contact_keys, st.text(), text_cells, text_cells),
    max_size=30,
    unique_by=lambda row: row[0],
)
chat_settings = st.lists(
    st.tuples(key_text, int64, st.sampled_from([0, 1]), st.sampled_from([0, 1])),
    max_size=30,
    unique_by=lambda row: row[0],
)
LINEAGE = "feedc0de12345678"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "whatsmeow.sqlite3"
    create_paired_store(path)
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contact_rows=contacts, settings_rows=chat_settings)
def test_snapshot_restore_snapshot_keeps_checksum_and_rows(template: Path, contact_rows, settings_rows) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source.sqlite3"
        shutil.copyfile(template, source)
        conn = sqlite3.connect(source)
        with conn:
            jid = conn.execute("SELECT jid FROM whatsmeow_device").fetchone()[0]
            conn.executemany(
                "INSERT INTO whatsmeow_contacts (our_jid, their_jid, first_name, full_name, push_name) VALUES (?,?,?,?,?)",
                [(jid, f"x{key}", first, full, push) for key, first, full, push in contact_rows],
            )
            conn.executemany(
                "INSERT INTO whatsmeow_chat_settings (our_jid, chat_jid, muted_until, pinned, archived)"
                " VALUES (?,?,?,?,?)",
                [(jid, chat, *values) for chat, *values in settings_rows],
            )
        conn.close()

        first = take_snapshot(source)
        restored = Path(scratch) / "restored" / "whatsmeow.sqlite3"
        restore_snapshot(first, restored, lineage=LINEAGE, sequence=42)
        second = take_snapshot(restored)

        assert second["checksum"] == first["checksum"]
        assert second["tables"] == first["tables"]
        assert table_rows(restored) == table_rows(source)
        assert _lineage_and_sequence(restored) == (LINEAGE, 42)

        shuffled = copy.deepcopy(first)
        for table in shuffled["tables"]:
            table["rows"].reverse()
        assert validate_document(shuffled).checksum == first["checksum"]


def _lineage_and_sequence(store: Path) -> tuple[str, int]:
    """What a restored store says of itself: the lineage it was given, the sequence its changes follow."""
    conn = sqlite3.connect(store)
    try:
        (lineage,) = conn.execute("SELECT lineage FROM zapkeep_state").fetchone()
        (sequence,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'zapkeep_changes'").fetchone()
        return lineage, sequence
    finally:
        conn.close()
