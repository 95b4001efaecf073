from __future__ import annotations

from pathlib import Path

from tests.kill9 import kill_during_backups
from tests.synthetic import REALISTIC, create_paired_store


def test_kill_minus_9_during_backups_always_leaves_a_complete_snapshot(database_url: str, tmp_path: Path) -> None:
    store = tmp_path / "whatsmeow.sqlite3"
    create_paired_store(store, REALISTIC)  # ~900 KB documents: the kill lands inside writes

    report = kill_during_backups(store, database_url, tmp_path, iterations=4)

    # (Each victim is killed only after it reported a committed backup: kill_during_backups waits for
    # one, so counting them here asserted nothing.)
    assert report.restored_rows > 2000
