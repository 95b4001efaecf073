"""Keeps a PostgreSQL database busy with writes until its parent process goes away.

Started by the test suite's cluster fixture when ZAPKEEP_TEST_PG_LOAD=1 (scripts/stress-tests.sh
--pg-load), so that the suite also runs against a server under write load.

    python -m tests.pg_load DATABASE_URL
"""

from __future__ import annotations

import os
import sys
import time

import psycopg

ROWS = 500
PAYLOAD = "x" * 400


def main(url: str) -> None:
    parent = os.getppid()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS load (id int PRIMARY KEY, payload text, n bigint)")
        turn = 0
        while os.getppid() == parent:
            with conn.transaction():
                for i in range(ROWS):
                    conn.execute(
                        "INSERT INTO load VALUES (%s, %s, 0) ON CONFLICT (id) DO UPDATE SET n = load.n + 1",
                        (i, PAYLOAD),
                    )
            if turn % 10 == 0:
                conn.execute("DELETE FROM load WHERE id %% 3 = 0")
            turn += 1
            time.sleep(0.01)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except (psycopg.OperationalError, KeyboardInterrupt):
        pass  # the cluster went away at the end of the run
