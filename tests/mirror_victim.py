"""A process that only mirrors a store into PostgreSQL until killed: the victim of the kill -9 tests.

python tests/mirror_victim.py STORE DATABASE_URL
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from bot.session.mirror import Mirror
from database import PostgresDatabase


def main(store: Path, database_url: str) -> None:
    db = PostgresDatabase(database_url)
    db.open()
    fence = db.acquire_lease("default", "victim", ttl_seconds=300)
    assert fence is not None, "the lease is held"
    mirror = Mirror(db, "default", store, fence=lambda: fence, on_fenced=lambda exc, _: print(exc, file=sys.stderr))
    mirror.start()
    mirror.reconcile("start")  # caught up with what was written while no victim ran
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
