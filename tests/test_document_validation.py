"""Corrupt or foreign documents are refused, and nothing they would replace is touched."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.session import cells, document as session_document, store_schema
from bot.process.errors import SessionDocumentError
from bot.session.persistence import export_document, import_document, sync_session
from bot.session.store_worker import restore_store
from database import Database
from tests.synthetic import DEVICE_JID, PUSH_NAME, create_paired_store, table_rows, take_snapshot


def _truncate_base64(doc: dict[str, Any]) -> str:
    table = next(t for t in doc["tables"] if t["name"] == "whatsmeow_device")
    cell = next(c for c in table["rows"][0] if isinstance(c, dict))
    cell["b64"] = cell["b64"][:-3]
    return json.dumps(doc)


def _flip_a_key_byte(doc: dict[str, Any]) -> str:
    table = next(t for t in doc["tables"] if t["name"] == "whatsmeow_pre_keys")
    cell = table["rows"][0][2]
    cell["b64"] = ("B" if cell["b64"][0] == "A" else "A") + cell["b64"][1:]
    return json.dumps(doc)


def _wrong_checksum(doc: dict[str, Any]) -> str:
    doc["checksum"] = "sha256:" + "0" * 64
    return json.dumps(doc)


def _wrong_version(doc: dict[str, Any]) -> str:
    doc["format_version"] = 3
    return json.dumps(doc)


def _missing_table(doc: dict[str, Any]) -> str:
    doc["tables"] = [t for t in doc["tables"] if t["name"] != "whatsmeow_identity_keys"]
    return json.dumps(doc)


def _smuggled_trigger(doc: dict[str, Any]) -> str:
    table = doc["tables"][0]
    table["indexes"].append("CREATE TRIGGER x AFTER INSERT ON whatsmeow_device BEGIN DELETE FROM whatsmeow_device; END")
    return json.dumps(doc)


def _resealed(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], str]:
    """A change made by someone who then recomputed every checksum: only the content can tell."""

    def corrupt(doc: dict[str, Any]) -> str:
        change(doc)
        for table in doc["tables"]:
            digest = session_document.rows_digest(cells.row_hash(row) for row in table["rows"])
            table["row_count"] = len(table["rows"])
            table["checksum"] = session_document.table_checksum_v2(
                table["name"], table["sql"], table["indexes"], table["columns"], digest
            )
        doc["checksum"] = session_document.document_checksum([(t["name"], t["checksum"]) for t in doc["tables"]])
        return json.dumps(doc)

    return corrupt


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in doc["tables"] if t["name"] == name)


def _cell(doc: dict[str, Any], table: str, column: str, value: Any, row: int = 0) -> None:
    found = _table(doc, table)
    found["rows"][row][found["columns"].index(column)] = value


INJECTION = "b\") VALUES (?1, ?2), (sqlite_version(), 'injected') --"


def _injected_column(doc: dict[str, Any]) -> None:
    _table(doc, "whatsmeow_device")["columns"][1] = INJECTION


def _unknown_table(doc: dict[str, Any]) -> None:
    table = _table(doc, "whatsmeow_contacts")
    table["name"] = "whatsmeow_evil"
    table["sql"] = table["sql"].replace("whatsmeow_contacts", "whatsmeow_evil", 1)
    table["indexes"] = []


def _duplicate_key(doc: dict[str, Any]) -> None:
    rows = _table(doc, "whatsmeow_pre_keys")["rows"]
    rows.append(list(rows[0]))


def _missing_device(doc: dict[str, Any]) -> None:
    _cell(doc, "whatsmeow_pre_keys", "jid", "5511000000000:9@s.whatsapp.net")


def _duplicate_column(doc: dict[str, Any]) -> None:
    columns = _table(doc, "whatsmeow_device")["columns"]
    columns[1] = columns[0]


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "truncated base64": (_truncate_base64, "undecodable"),
    "altered key byte": (_flip_a_key_byte, "checksum mismatch"),
    "wrong checksum": (_wrong_checksum, "checksum does not match"),
    "wrong version": (_wrong_version, "format version 3 is not supported"),
    "missing table": (_missing_table, "lacks required tables: whatsmeow_identity_keys"),
    "smuggled trigger": (_smuggled_trigger, "index definition is invalid"),
    "not JSON": (lambda doc: json.dumps(doc)[:-40], "not valid JSON"),
    "empty": (lambda doc: "", "empty"),
    "JSON but not an object": (lambda doc: "[1, 2]", "must be a JSON object"),
    # The checksums recomputed: only what the rows say can give these away.
    "SQL in a column name": (_resealed(_injected_column), "is not whatsmeow's"),
    "a column twice": (_resealed(_duplicate_column), "listed twice"),
    "a table that is not whatsmeow's": (_resealed(_unknown_table), "not a table of whatsmeow's schema"),
    "a primary key twice": (_resealed(_duplicate_key), "UNIQUE constraint failed"),
    "a row of a missing device": (
        _resealed(_missing_device),
        "whatsmeow_pre_keys: row with rowid 1 refers to a missing",
    ),
    "an integer beyond 64 bits": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_pre_keys", "key_id", 2**63)),
        "row 0: column key_id: an integer outside 64 bits",
    ),
    "a value breaking a CHECK": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_pre_keys", "key_id", 2**30)),
        "CHECK constraint failed",
    ),
    "NaN in a NOT NULL column": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_device", "registration_id", {"real": "nan"})),
        "column registration_id: a float where whatsmeow keeps BIGINT",
    ),
    "NULL in a NOT NULL column": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_pre_keys", "key", None)),
        "column key: NULL in a NOT NULL column",
    ),
    "a device jid as a blob": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_device", "jid", {"b64": "AAAA"})),
        "the device jid is not text",
    ),
    "a device jid as a number": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_device", "jid", 5511)),
        "the device jid is not text",
    ),
    "another whatsmeow schema version": (
        _resealed(lambda doc: _cell(doc, "whatsmeow_version", "version", 99)),
        "follows whatsmeow schema version 99; this zapkeep restores version",
    ),
}


@pytest.fixture
def stored(db: Database, tmp_path: Path) -> tuple[Database, Path, dict[str, Any]]:
    store = tmp_path / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store)
    sync_session(db, "default", store)
    _, text = export_document(db, "default")
    return db, store, json.loads(text)


def _format_1(document: dict[str, Any]) -> dict[str, Any]:
    """The same session as a format 1 document (what zapkeep wrote before persistence v2)."""
    legacy = {k: v for k, v in document.items() if k not in ("lineage", "sequence")}
    legacy["format_version"] = 1
    legacy["tables"] = []
    for table in document["tables"]:
        rows = sorted(table["rows"], key=cells.canonical_json)
        checksum = session_document.table_checksum(
            table["name"], table["sql"], table["indexes"], table["columns"], rows
        )
        legacy["tables"].append({**table, "rows": rows, "checksum": checksum})
    legacy["checksum"] = session_document.document_checksum([(t["name"], t["checksum"]) for t in legacy["tables"]], 1)
    return legacy


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_document_is_refused_and_changes_nothing(name: str, stored: tuple[Database, Path, dict]) -> None:
    db, store, document = stored
    corrupt, expected_message = CORRUPTIONS[name]
    text = corrupt(document)
    row_before = db.load_session("default")
    rows_before = db.load_rows("default")
    history_before = db.list_history("default")
    store_before = store.read_bytes()
    siblings_before = sorted(p.name for p in store.parent.iterdir())

    with pytest.raises(SessionDocumentError, match=expected_message):
        import_document(db, "default", text)
    with pytest.raises(SessionDocumentError, match=expected_message):
        restore_store(text, store, lineage="0123456789abcdef", sequence=0)

    assert db.load_session("default") == row_before
    assert db.load_rows("default") == rows_before
    assert db.list_history("default") == history_before
    assert store.read_bytes() == store_before
    assert sorted(p.name for p in store.parent.iterdir()) == siblings_before


def test_sql_inside_a_document_never_runs(stored: tuple[Database, Path, dict], tmp_path: Path) -> None:
    """A document's CREATE statements are checksummed text, never executed: the store is built
    from whatsmeow's own schema (this one would have grown a 216 KB document into megabytes)."""
    db, store, document = stored
    device = _table(document, "whatsmeow_device")
    device["sql"] = device["sql"].replace("lid TEXT,", "lid TEXT, bloat BLOB DEFAULT (zeroblob(5000000)),", 1)
    text = _resealed(lambda doc: None)(document)
    import_document(db, "bloated", text)
    _, stored_text = export_document(db, "bloated")
    restored = tmp_path / "restored" / "whatsmeow.sqlite3"
    record = db.load_session("bloated")
    restore_store(stored_text, restored, lineage=record.lineage, sequence=record.mirror_sequence)
    assert restored.stat().st_size < 1_000_000
    assert table_rows(restored) == table_rows(store)
    assert "zeroblob" not in json.dumps(take_snapshot(restored)["tables"])


def test_a_format_1_corruption_is_refused_too(stored: tuple[Database, Path, dict]) -> None:
    db, _, document = stored
    legacy = _format_1(document)
    _flip_a_key_byte(legacy)
    with pytest.raises(SessionDocumentError, match="checksum mismatch"):
        import_document(db, "legacy", json.dumps(legacy))
    assert db.load_session("legacy") is None and db.load_rows("legacy") == []


def test_valid_import_is_stored_and_restorable(stored: tuple[Database, Path, dict], tmp_path: Path) -> None:
    db, store, document = stored
    version = import_document(db, "imported", json.dumps(document))
    record = db.load_session("imported")
    assert record.version == version and record.device_jid == DEVICE_JID and record.push_name == PUSH_NAME
    assert record.format_version == 2 and record.checksum == document["checksum"]
    assert record.lineage not in (None, document["lineage"])  # an imported session starts a lineage of its own
    _, text = export_document(db, "imported")
    restored = tmp_path / "elsewhere" / "whatsmeow.sqlite3"
    summary = restore_store(text, restored, lineage=record.lineage, sequence=record.mirror_sequence)
    assert summary.checksum == document["checksum"]
    assert table_rows(restored) == table_rows(store)
    _, snapshot = export_document(db, "imported", version)  # the history entry is the whole document
    assert (
        session_document.validate_document(session_document.parse_document(snapshot)).checksum == document["checksum"]
    )


def test_a_format_1_document_is_accepted_and_stored_as_format_2(
    stored: tuple[Database, Path, dict], tmp_path: Path
) -> None:
    db, store, document = stored
    legacy = _format_1(document)
    assert session_document.validate_document(legacy).checksum == legacy["checksum"] != document["checksum"]

    version = import_document(db, "legacy", json.dumps(legacy))

    record = db.load_session("legacy")
    assert record.version == version and record.device_jid == DEVICE_JID and record.push_name == PUSH_NAME
    assert record.format_version == 2
    assert record.checksum == document["checksum"]  # the same rows: the same format 2 checksum
    assert len(db.load_rows("legacy")) == sum(t["row_count"] for t in document["tables"])
    _, text = export_document(db, "legacy")
    exported = session_document.parse_document(text)
    assert exported["format_version"] == 2
    assert session_document.validate_document(exported).checksum == document["checksum"]
    restored = tmp_path / "legacy" / "whatsmeow.sqlite3"
    restore_store(text, restored, lineage=record.lineage, sequence=record.mirror_sequence)
    assert table_rows(restored) == table_rows(store)


def test_the_shipped_whatsmeow_schema_is_the_one_neonize_creates(whatsmeow_template: Path) -> None:
    conn = sqlite3.connect(whatsmeow_template)
    try:
        created = [sql for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")]
        version = list(conn.execute("SELECT version, compat FROM whatsmeow_version").fetchone())
    finally:
        conn.close()
    shipped = store_schema.whatsmeow_schema()
    assert list(shipped.statements[: len(created)]) == created
    assert shipped.statements[len(created) :] == (
        f"INSERT INTO whatsmeow_version (version, compat) VALUES ({version[0]}, {version[1]})",
    )
    assert [shipped.version, shipped.compat] == version
