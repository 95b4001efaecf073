from __future__ import annotations

import pytest

from database import SCHEMA_VERSION, Database, SchemaTooNewError, SessionWrite


def _write(session_id: str, n: int) -> SessionWrite:
    return SessionWrite(session_id, f'{{"n": {n}}}', f"sha256:{n:064d}", "5511:1@s.whatsapp.net", "Loja")


def test_schema_creation_is_idempotent_and_keeps_data(db: Database) -> None:
    db.save_session(_write("default", 1))
    db.migrate()
    db.migrate()
    assert db.schema_version() == SCHEMA_VERSION
    assert db.load_session("default").session_data.replace(" ", "") == '{"n":1}'


def test_a_database_newer_than_the_code_is_refused(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute("UPDATE zapkeep_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNewError, match="newer than this zapkeep"):
        db.migrate()


def test_history_keeps_the_last_five_and_versions_keep_growing(db: Database) -> None:
    for n in range(1, 9):
        db.save_session(_write("default", n))
    assert [h.version for h in db.list_history("default")] == [8, 7, 6, 5, 4]
    assert db.load_history_version("default", 6).session_data.replace(" ", "") == '{"n":6}'
    assert db.load_history_version("default", 2) is None

    assert db.delete_session("default") is True
    assert db.load_session("default") is None
    assert db.save_session(_write("default", 9)).version == 9  # history kept: no version reused
    assert [s.session_id for s in db.list_sessions()] == ["default"]


def test_sessions_are_independent(db: Database) -> None:
    db.save_session(_write("a", 1))
    db.save_session(_write("b", 2))
    db.delete_session("a", keep_history=False)
    assert [s.session_id for s in db.list_sessions()] == ["b"]
    assert db.list_history("a") == []
    assert len(db.list_history("b")) == 1


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
        assert old.session_id == "old" and old.checksum == ""  # kept, with the new columns' defaults
        assert db.save_session(_write("default", 1)).written
    finally:
        db.close()
