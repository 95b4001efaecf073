"""Railway-style redeploys with real daemons: the new one starts while the old one still runs.

Each daemon is a real `python -m bot` process with its own DATA_DIR (its own container), the
same PostgreSQL and the real neonize library offline (so it sits in `reconnecting` while it
owns the session).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fake_whatsapp import wait_until
from tests.pg_cluster import free_port
from tests.synthetic import DEVICE_JID, PUSH_NAME, create_paired_store, neonize, table_rows

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "redeploy-test-token-0123456789"
LEASE = {"LEASE_TTL_SECONDS": "6", "LEASE_RENEW_SECONDS": "2"}


@dataclass
class Daemon:
    data_dir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "bot"])
    env: dict[str, str] = field(default_factory=dict)  # beside (and over) the test's own

    @property
    def store(self) -> Path:
        return self.data_dir / "sessions" / "default" / "whatsmeow.sqlite3"

    def start(self) -> Daemon:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        env = {
            **os.environ,
            **LEASE,
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "DATA_DIR": str(self.data_dir),
            "DATABASE_URL": self.database_url,
            "PORT": str(self.port),
            "API_TOKEN": TOKEN,
            **self.env,
        }
        log = open(self.log_path, "w")  # noqa: SIM115 - the child writes it until it exits
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=env, text=True, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_until(self.healthy, timeout=30, message=f"daemon on port {self.port} healthy")
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def status(self) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/session/status?session_id=default",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["session"]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def stop_if_running(self) -> None:
        """Clean-up after a test, passed or failed: no daemon outlives it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


@dataclass
class HandoverReport:
    iterations: int
    handover_seconds: list[float]
    takeover_after_crash_seconds: float | None = None


def overlapping_redeploys(database_url: str, workdir: Path, iterations: int) -> HandoverReport:
    """Start A (owner), then B beside it; B must stand by; SIGTERM A; B must take over. Repeat."""
    first = Daemon(workdir / "deploy-0", database_url)
    create_paired_store(first.store)
    original = table_rows(first.store)
    started = [first]
    owner = first.start()
    handovers = []
    try:
        wait_until(lambda: owner.status()["owns_session"], timeout=20, message="the first owner")
        token = owner.status()["fencing_token"]
        for n in range(1, iterations + 1):
            new = Daemon(workdir / f"deploy-{n}", database_url)
            started.append(new)
            new.start()
            wait_until(lambda: new.status()["state"] != "starting", timeout=10, message="the new daemon booted")
            time.sleep(0.5)  # time enough to misbehave, if it would
            status = new.status()
            assert status["state"] == "standby" and not status["owns_session"], status
            assert not new.store.exists(), "a standby daemon touched the store"
            assert "connecting" not in new.log(), "a standby daemon built a client"

            stopped_at = time.monotonic()
            code = owner.terminate()
            assert code == 0, owner.log()[-3000:]
            assert "lease released" in owner.log()
            wait_until(
                lambda: new.status()["state"] in ("connecting", "reconnecting"), timeout=15, message=f"take-over #{n}"
            )
            handovers.append(time.monotonic() - stopped_at)
            status = new.status()
            # Each take-over a larger token (more than one larger if a renewal came too late on a
            # loaded machine and the new owner took its lease again: still the only owner).
            assert status["owns_session"] and status["fencing_token"] > token, status
            token = status["fencing_token"]
            assert table_rows(new.store) == original
            owner = new
        assert neonize("devices", owner.store) == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    finally:
        for daemon in started:
            daemon.stop_if_running()
    return HandoverReport(iterations, handovers)


def crash_takeover(database_url: str, workdir: Path) -> float:
    """kill -9 the owner: a standby takes over once the lease expires, from the last complete snapshot."""
    owner = Daemon(workdir / "crash-a", database_url)
    standby = Daemon(workdir / "crash-b", database_url)
    create_paired_store(owner.store)
    original = table_rows(owner.store)
    try:
        owner.start()
        wait_until(lambda: owner.status()["owns_session"], timeout=20, message="owner")
        standby.start()
        wait_until(lambda: standby.status()["state"] == "standby", timeout=10, message="standby")
        owner.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: standby.status()["state"] in ("connecting", "reconnecting"),
            timeout=30,
            message="take-over after the crash",
        )
        waited = time.monotonic() - killed_at
        assert table_rows(standby.store) == original
        assert standby.status()["handover_seconds"] is not None
    finally:
        owner.stop_if_running()
        standby.stop_if_running()
    return waited
