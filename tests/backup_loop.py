"""Change a store and mirror it into the database in a loop until killed: the victim of the kill -9 tests.

    python tests/backup_loop.py STORE DATABASE_URL

Each round N rewrites the device's push name and a slice of the Signal sessions with sqlite3 (as
whatsmeow would), then ``sync_session`` writes the changed rows and the new head in one
transaction. It prints ``write N`` just before that transaction starts, ``wrote N SECONDS`` once
it has committed, and ``done N ROWS`` at the end of the round, so the killer can aim inside a write.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
from pathlib import Path

from bot.session.persistence import sync_session
from database import Fence, MirrorBatch, PostgresDatabase

SESSIONS_PER_ROUND = 200  # ~300-500 KB of rows per transaction


def push_name(round_number: int) -> str:
    return f"Loja {round_number}"


def main(store: Path, database_url: str) -> None:
    db = PostgresDatabase(database_url)
    db.open()
    rng = random.Random(os.getpid())
    n = 0
    write_batch = db.write_batch

    def announced_write(batch: MirrorBatch, fence: Fence | None = None) -> None:
        print("write", n, flush=True)
        started = time.perf_counter()
        write_batch(batch, fence)
        print("wrote", n, f"{time.perf_counter() - started:.4f}", flush=True)

    db.write_batch = announced_write  # type: ignore[method-assign]
    while True:
        conn = sqlite3.connect(store, timeout=10)  # this process never loads neonize
        with conn:
            conn.execute("UPDATE whatsmeow_device SET push_name = ?", (push_name(n),))
            row_ids = [r[0] for r in conn.execute("SELECT rowid FROM whatsmeow_sessions")]
            chosen = rng.sample(row_ids, min(SESSIONS_PER_ROUND, len(row_ids)))
            conn.executemany(
                "UPDATE whatsmeow_sessions SET session = ? WHERE rowid = ?",
                [(rng.randbytes(rng.randrange(900, 2200)), row_id) for row_id in chosen],
            )
        conn.close()
        result = sync_session(db, "default", store)
        assert result.paired and result.written_rows > 0, result
        print("done", n, result.written_rows, flush=True)
        n += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
