from __future__ import annotations

import pytest

from database import SCHEMA_VERSION, Database, HeadWrite, RowChange, SchemaTooNewError, SessionWrite, StoredRow

JID = "5511:1@s.whatsapp.net"


def _write(session_id: str, n: int) -> SessionWrite:
    return SessionWrite(session_id, f'{{"n": {n}}}', f"sha256:{n:064d}", JID, "Loja")


def _head(session_id: str, n: int) -> HeadWrite:
    return HeadWrite(session_id, f'{{"head": {n}}}', f"sha256:{n:064d}", 100 + n, JID, "Loja", f"lineage-{n}")


def _rows(n: int) -> list[RowChange]:
    return [
        RowChange("whatsmeow_device", f"'{JID}'", f'["{JID}", {n}]', f"{n:064x}"),
        RowChange("whatsmeow_pre_keys", f"'{JID}',{n}", f'["{JID}", {n}, {{"b64": "AAAA"}}]', f"{n + 1:064x}"),
    ]


def _store(db: Database, session_id: str, n: int) -> None:
    """Make a session stored: its head and rows, as an import does."""
    db.replace_session(_head(session_id, n), _rows(n), sequence=n)


def _json(text: str) -> str:
    return text.replace(" ", "")


def test_schema_creation_is_idempotent_and_keeps_data(db: Database) -> None:
    _store(db, "default", 1)
    db.save_history(_write("default", 1))
    db.migrate()
    db.migrate()
    assert db.schema_version() == SCHEMA_VERSION == 10
    record = db.load_session("default")
    assert _json(record.session_data) == '{"head":1}'
    assert (record.format_version, record.lineage, record.mirror_sequence) == (2, "lineage-1", 1)
    assert db.load_rows("default") == [StoredRow(r.table, r.row_text, r.row_hash) for r in _rows(1)]
    assert _json(db.load_history_version("default", 1).session_data) == '{"n":1}'


def test_a_database_newer_than_the_code_is_refused(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute("UPDATE zapkeep_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNewError, match="newer than this zapkeep"):
        db.migrate()


def test_history_keeps_the_last_five_and_versions_keep_growing(db: Database) -> None:
    _store(db, "default", 1)
    assert [db.save_history(_write("default", n)) for n in range(1, 9)] == list(range(1, 9))
    assert [h.version for h in db.list_history("default")] == [8, 7, 6, 5, 4]
    assert db.load_history_version("default", 6).session_data.replace(" ", "") == '{"n":6}'
    assert db.load_history_version("default", 2) is None
    assert db.load_session("default").version == 8  # the stored session names its newest snapshot

    assert db.delete_session("default") is True
    assert db.load_session("default") is None
    assert db.load_rows("default") == [] and db.row_hashes("default") == {}
    _store(db, "default", 9)
    assert db.save_history(_write("default", 9)) == 9  # history kept: no version reused
    assert [(s.session_id, s.version) for s in db.list_sessions()] == [("default", 9)]


def test_sessions_are_independent(db: Database) -> None:
    _store(db, "a", 1)
    db.save_history(_write("a", 1))
    _store(db, "b", 2)
    db.save_history(_write("b", 2))
    db.delete_session("a", keep_history=False)
    assert [s.session_id for s in db.list_sessions()] == ["b"]
    assert db.list_history("a") == []
    assert db.load_rows("a") == []
    assert len(db.list_history("b")) == 1
    assert db.load_rows("b") == [StoredRow(r.table, r.row_text, r.row_hash) for r in _rows(2)]


def test_the_seeds_existing_table_is_adopted_without_losing_rows(database_url: str) -> None:
    import psycopg

    from database import PostgresDatabase

    with psycopg.connect(database_url, autocommit=True) as conn:  # the seed's schema, before zapkeep
        conn.execute("""CREATE TABLE whatsapp_sessions (
            id SERIAL PRIMARY KEY, session_id VARCHAR(100) DEFAULT 'default' UNIQUE,
            session_data JSONB NOT NULL, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)""")
        conn.execute("""INSERT INTO whatsapp_sessions (session_id, session_data) VALUES ('old', '{"creds": 1}')""")
    db = PostgresDatabase(database_url)
    db.open()
    try:
        assert db.schema_version() == SCHEMA_VERSION
        (old,) = db.list_sessions()
        # Kept, with the new columns' defaults: a whole (format 1) document, never mirrored.
        assert old.session_id == "old" and old.checksum == ""
        assert (old.format_version, old.mirror_sequence) == (1, 0)
        assert _json(db.load_session("old").session_data) == '{"creds":1}'
        _store(db, "default", 1)
        assert db.save_history(_write("default", 1)) == 1
        assert [(s.session_id, s.format_version, s.version) for s in db.list_sessions()] == [
            ("default", 2, 1),
            ("old", 1, 0),
        ]
    finally:
        db.close()


def test_a_version_2_database_gains_message_kinds_and_keeps_its_log(db: Database) -> None:
    from datetime import UTC, datetime

    queued = db.enqueue_outgoing("default", JID, "Olá", reason="api", expires_at=None, now=datetime.now(UTC))
    with db.transaction() as tx:  # back to what a version 2 database looks like
        tx.execute("ALTER TABLE whatsapp_messages DROP COLUMN message_type")
        tx.execute("ALTER TABLE whatsapp_chats DROP COLUMN last_reply_reason")
        tx.execute("ALTER TABLE whatsapp_chats DROP COLUMN last_reply_at")
        tx.execute("DROP TABLE whatsapp_bot_settings")
        tx.execute("DROP INDEX whatsapp_messages_by_whatsapp_id")
        tx.execute("ALTER TABLE whatsapp_session_rows DROP COLUMN key_id")
        tx.execute("ALTER TABLE whatsapp_session_history DROP COLUMN key_id")
        for table in ("whatsapp_events", "whatsapp_webhook_deliveries", "whatsapp_webhook_endpoints"):
            tx.execute(f"DROP TABLE {table}")
        for column in ("mimetype", "media_size", "file_name", "media_ref", "media_key_id"):
            tx.execute(f"ALTER TABLE whatsapp_messages DROP COLUMN {column}")
        tx.execute("DROP TABLE whatsapp_outgoing_files")
        tx.execute("ALTER TABLE whatsapp_chats DROP COLUMN phone_jid")
        for table in ("whatsapp_session_registry", "whatsapp_session_live", "whatsapp_session_commands"):
            tx.execute(f"DROP TABLE {table}")
        tx.execute("DROP TABLE whatsapp_instances")
        tx.execute("DROP INDEX whatsapp_session_leases_by_owner")
        tx.execute("UPDATE zapkeep_schema SET version = %s", (2,))
    db.migrate()
    assert db.schema_version() == SCHEMA_VERSION
    assert db.key_ids("default") == set()  # (version 5's key columns are there too)
    assert db.last_event_id("default") == 0  # (and version 6's events)
    assert db.replies_paused("default") is False  # (version 4's settings table is there too)
    (message,) = db.list_messages("default")
    assert (message.id, message.text, message.message_type) == (queued, "Olá", "text")
    assert message.mimetype is None and db.outgoing_file(queued) is None  # (and version 7's files)
    assert [c.phone_jid for c in db.list_chats("default")] == [None]  # (and version 8's LID chats' phones)
    assert db.session_ids() == [] and db.live_states() == {}  # (and version 9's registry and live states)


# --- upgrades: a database left at any earlier version is brought to the current schema in place ---

OLD_ROWS_SESSION = "old"
OLD_CHAT = "5511988887777@s.whatsapp.net"
OLD_ROW = StoredRow("whatsmeow_device", f'["{JID}", 7]', f"{7:064x}")


def _database_at(version: int, backend: str, tmp_path, pg_cluster) -> Database:
    """A database as a zapkeep of schema ``version`` left it: steps 1..version only."""
    from database import STEPS, PostgresDatabase, SqliteDatabase

    if backend == "postgresql":
        old: Database = PostgresDatabase(pg_cluster.create_database())
    else:
        old = SqliteDatabase(tmp_path / "old.sqlite3")
    old._open()  # (connected, not migrated: open() would bring it to the current version)
    with old.transaction() as tx:
        tx.execute("CREATE TABLE zapkeep_schema (version INTEGER NOT NULL)")
        tx.execute("INSERT INTO zapkeep_schema (version) VALUES (%s)", (version,))
        for step in STEPS[:version]:
            for statement in step.statements(old.dialect):
                tx.execute(statement)
    return old


def _put_old_rows(db: Database, version: int) -> None:
    """Rows in the tables (and columns) every version since 1 has: a session, its history, its lease,
    a logged message and a paused chat; from version 2 on, a mirrored row."""
    from datetime import datetime

    at = datetime(2026, 1, 2, 3, 4, 5)
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO whatsapp_sessions (session_id, session_data, version, checksum, size_bytes, device_jid,"
            " push_name) VALUES (%s, %s, 3, 'sha256:old', 12, %s, 'Loja')",
            (OLD_ROWS_SESSION, db.json_param('{"creds": 1}'), JID),
        )
        tx.execute(
            "INSERT INTO whatsapp_session_history (session_id, version, session_data, checksum, size_bytes,"
            " device_jid, taken_at) VALUES (%s, 3, %s, 'sha256:h3', 12, %s, %s)",
            (OLD_ROWS_SESSION, db.json_param('{"creds": 3}'), JID, at),
        )
        tx.execute(
            "INSERT INTO whatsapp_session_leases (session_id, owner_id, fencing_token, expires_at, acquired_at,"
            " renewed_at) VALUES (%s, NULL, 4, 0, 0, 0)",
            (OLD_ROWS_SESSION,),
        )
        tx.execute(
            "INSERT INTO whatsapp_messages (session_id, chat_jid, sender, message_id, dedupe_key, direction, text,"
            " status, created_at) VALUES (%s, %s, %s, 'WAID1', 'in:WAID1', 'in', 'Olá', 'replied', %s)",
            (OLD_ROWS_SESSION, OLD_CHAT, OLD_CHAT, at),
        )
        tx.execute(
            "INSERT INTO whatsapp_chats (session_id, chat_jid, last_incoming_at, paused_until, pause_reason)"
            " VALUES (%s, %s, %s, %s, 'handoff')",
            (OLD_ROWS_SESSION, OLD_CHAT, at, datetime(2099, 1, 1)),
        )
        if version >= 2:
            tx.execute(
                "INSERT INTO whatsapp_session_rows (session_id, table_name, row_key, row_data, row_hash)"
                " VALUES (%s, %s, %s, %s, %s)",
                (OLD_ROWS_SESSION, OLD_ROW.table, f"'{JID}'", db.json_param(OLD_ROW.row_text), OLD_ROW.row_hash),
            )


def _schema(db: Database) -> dict[str, list]:
    """Tables, columns (types, nullability, defaults, order), indexes and constraints, as the
    back-end's own catalog tells them."""
    with db.transaction() as tx:
        if db.backend == "postgresql":
            return {
                "columns": tx.execute(
                    "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,"
                    " column_default, ordinal_position FROM information_schema.columns"
                    " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
                ).fetchall(),
                "indexes": tx.execute(
                    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                    " ORDER BY tablename, indexname"
                ).fetchall(),
                "constraints": tx.execute(
                    "SELECT conrelid::regclass::text AS table_name, conname, pg_get_constraintdef(oid) AS definition"
                    " FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
                ).fetchall(),
            }
        objects = tx.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        columns = [
            {"table": o["name"], **column}
            for o in objects
            if o["type"] == "table"
            for column in tx.execute(f"PRAGMA table_info('{o['name']}')").fetchall()  # (names from the catalog)
        ]
        return {"objects": objects, "columns": columns}


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_database_at_every_earlier_version_upgrades_to_the_fresh_schema_and_keeps_its_rows(
    db: Database, version: int, tmp_path, request: pytest.FixtureRequest
) -> None:
    fresh = _schema(db)
    pg_cluster = request.getfixturevalue("pg_cluster") if db.backend == "postgresql" else None
    old = _database_at(version, db.backend, tmp_path, pg_cluster)
    try:
        assert old.schema_version() == version
        _put_old_rows(old, version)
        old.migrate()  # (what the next boot does)

        assert old.schema_version() == SCHEMA_VERSION
        assert _schema(old) == fresh
        (session,) = old.list_sessions()
        assert (session.session_id, session.version, session.checksum, session.format_version) == (
            "old",
            3,
            "sha256:old",
            1,
        )
        assert _json(old.load_session("old").session_data) == '{"creds":1}'
        assert _json(old.load_history_version("old", 3).session_data) == '{"creds":3}'
        assert old.lease("old").fencing_token == 4
        (message,) = old.list_messages("old")
        assert (message.text, message.direction, message.message_type, message.mimetype) == ("Olá", "in", "text", None)
        (chat,) = old.list_chats("old")
        assert (chat.chat_jid, chat.pause_reason, chat.phone_jid) == (OLD_CHAT, "handoff", None)
        assert old.load_rows("old") == ([OLD_ROW] if version >= 2 else [])
        # A session stored before the registry exists after it (version 9): listed, not created twice.
        assert old.session_ids() == ["old"] and [o.session_id for o in old.session_overview()] == ["old"]
        assert old.register_session("old") is False and old.registered_session("old").deleted_at is None
        # ...and what later versions brought works on it: a history snapshot numbered after the old one.
        assert old.save_history(_write("old", 4)) == 4
        assert old.release_chat("old", OLD_CHAT) is True and old.last_event_id("old") > 0
    finally:
        old.close()
