"""Back up a changing store in a loop until killed: the victim of the kill -9 tests.

python tests/backup_loop.py STORE DATABASE_URL
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from bot.persistence import backup_session
from database import PostgresDatabase


def main(store: Path, database_url: str) -> None:
    db = PostgresDatabase(database_url)
    db.open()
    n = 0
    while True:
        conn = sqlite3.connect(store)  # this process never loads neonize
        with conn:
            conn.execute("UPDATE whatsmeow_device SET push_name = ?", (f"Loja {n}",))
        conn.close()
        result = backup_session(db, "default", store)
        print(result.version, flush=True)
        n += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
