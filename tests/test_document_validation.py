"""Corrupt or foreign documents are refused, and nothing they would replace is touched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.errors import SessionDocumentError
from bot.persistence import backup_session, import_document
from bot.store_worker import restore_store
from database import Database
from tests.synthetic import create_paired_store


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
    doc["format_version"] = 2
    return json.dumps(doc)


def _missing_table(doc: dict[str, Any]) -> str:
    doc["tables"] = [t for t in doc["tables"] if t["name"] != "whatsmeow_identity_keys"]
    return json.dumps(doc)


def _smuggled_trigger(doc: dict[str, Any]) -> str:
    table = doc["tables"][0]
    table["indexes"].append("CREATE TRIGGER x AFTER INSERT ON whatsmeow_device BEGIN DELETE FROM whatsmeow_device; END")
    return json.dumps(doc)


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "truncated base64": (_truncate_base64, "undecodable"),
    "altered key byte": (_flip_a_key_byte, "checksum mismatch"),
    "wrong checksum": (_wrong_checksum, "checksum does not match"),
    "wrong version": (_wrong_version, "format version 2 is not supported"),
    "missing table": (_missing_table, "lacks required tables: whatsmeow_identity_keys"),
    "smuggled trigger": (_smuggled_trigger, "index definition is invalid"),
    "not JSON": (lambda doc: json.dumps(doc)[:-40], "not valid JSON"),
    "empty": (lambda doc: "", "empty"),
    "JSON but not an object": (lambda doc: "[1, 2]", "must be a JSON object"),
}


@pytest.fixture
def stored(db: Database, tmp_path: Path) -> tuple[Database, Path, dict[str, Any]]:
    store = tmp_path / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store)
    backup_session(db, "default", store)
    return db, store, json.loads(db.load_session("default").session_data)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_document_is_refused_and_changes_nothing(name: str, stored: tuple[Database, Path, dict]) -> None:
    db, store, document = stored
    corrupt, expected_message = CORRUPTIONS[name]
    text = corrupt(document)
    row_before = db.load_session("default")
    store_before = store.read_bytes()
    siblings_before = sorted(p.name for p in store.parent.iterdir())

    with pytest.raises(SessionDocumentError, match=expected_message):
        import_document(db, "default", text)
    with pytest.raises(SessionDocumentError, match=expected_message):
        restore_store(text, store)

    assert db.load_session("default") == row_before
    assert store.read_bytes() == store_before
    assert sorted(p.name for p in store.parent.iterdir()) == siblings_before


def test_valid_import_is_stored_and_restorable(stored: tuple[Database, Path, dict], tmp_path: Path) -> None:
    db, _, document = stored
    version = import_document(db, "imported", json.dumps(document))
    record = db.load_session("imported")
    assert record.version == version and record.device_jid is not None
    summary = restore_store(record.session_data, tmp_path / "elsewhere" / "whatsmeow.sqlite3")
    assert summary.checksum == document["checksum"]
