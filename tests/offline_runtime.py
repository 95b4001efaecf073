"""Run the runtime with the REAL neonize client, offline, on simulated time; print what happened.

    python tests/offline_runtime.py DATA_DIR DATABASE_URL SIMULATED_SECONDS

Each backoff wait returns at once and advances a simulated clock instead of sleeping, so
minutes of reconnecting take a few seconds. HTTPS_PROXY must point at a closed loopback
port in this process's environment from its start (Go reads it once).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

from bot.process.config import Config
from bot.process.retry import RetrySchedule
from bot.runtime import Runtime
from bot.wiring import build_runtime
from bot.session.state import State

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def main(data_dir: str, database_url: str, simulated_seconds: float) -> None:
    from bot.connection.client_process import process_client_factory
    from database import open_database

    assert os.environ.get("HTTPS_PROXY", "").startswith("http://127.0.0.1:"), "refusing to dial out"
    config = Config.from_env({"DATA_DIR": data_dir, "DATABASE_URL": database_url})
    db = open_database(config.database_url, config.embedded_database_path)
    elapsed = 0.0
    done = threading.Event()
    delays: list[float] = []
    states: list[str] = []
    runtime: Runtime

    def simulated_wait(seconds: float) -> None:
        nonlocal elapsed
        delays.append(round(seconds, 3))
        states.append(runtime.state.value)
        elapsed += seconds
        if elapsed >= simulated_seconds:
            done.set()
            done.wait()  # park the supervisor: the run is over

    runtime = build_runtime(
        config,
        db,
        process_client_factory(logging.WARNING),
        backoff=RetrySchedule.exponential(first=1, cap=60),
        wait=simulated_wait,
    )
    runtime.start()
    finished = done.wait(120)
    status = runtime.status()
    print(
        json.dumps(
            {
                "finished": finished,
                "simulated_seconds": elapsed,
                "delays": delays,
                "states": sorted(set(states)),
                "qr_seen": status.qr_available or any(s == State.QR.value for s in states),
                "state": status.state,
                "last_error": status.last_error,
                "reconnect_count": status.reconnect_count,
                "jid": status.jid,
                "supervisor_alive": any(t.name == "supervisor" for t in threading.enumerate()),
            }
        )
    )
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
