"""Railway-style redeploys with real daemons: the new one starts while the old one still runs.

Each daemon is a real `python -m bot` process with its own DATA_DIR (its own container), the
same PostgreSQL and the real neonize library offline (so it sits in `reconnecting` while it
owns the session).

The redeploys here run one number per service (``SESSION_ID`` set, ``ONE_NUMBER``): the new
deployment stands by until the old one lets the session go. Replicas sharing every session
(``SESSION_ID`` unset) host nothing they do not own: ``tests/replicas.py``.
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

import psycopg

from database import _LEASE_LOCK_SPACE, PostgresDatabase
from tests.fake_whatsapp import wait_until
from tests.pg_cluster import free_port
from tests.synthetic import DEVICE_JID, PUSH_NAME, create_paired_store, neonize, table_rows

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "redeploy-test-token-0123456789"
LEASE = {"LEASE_TTL_SECONDS": "6", "LEASE_RENEW_SECONDS": "2"}
ONE_NUMBER = {"SESSION_ID": "default"}  # one number per service: a second instance stands by


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


# The tests' own record of every version of the lease row, in the order they were written, with
# the database's times: what a hand-over and a take-over are judged by (not a host's clock, nor a
# status poll that sees the new owner some time after the fact).
RECORD_LEASE_VERSIONS = (
    """CREATE TABLE test_lease_versions (
        id BIGSERIAL PRIMARY KEY,
        owner_id TEXT,
        fencing_token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        acquired_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE FUNCTION test_record_lease_version() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO test_lease_versions (owner_id, fencing_token, expires_at, acquired_at)
        VALUES (NEW.owner_id, NEW.fencing_token, NEW.expires_at, NEW.acquired_at);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER test_record_lease_version AFTER INSERT OR UPDATE ON whatsapp_session_leases
        FOR EACH ROW EXECUTE FUNCTION test_record_lease_version()""",
)


@dataclass(frozen=True)
class LeaseVersion:
    id: int
    owner_id: str | None  # None: released
    fencing_token: int
    expires_at: float  # by the database's clock; a release sets it to the moment of the release
    acquired_at: float


@dataclass(frozen=True)
class TakeOver:
    """How a new owner got the lease, by the database's clock."""

    released: bool  # the new owner took the lease the old one had released (else it had run out)
    expires_at: float  # when the old owner's lease would have run out (its last renewal's expiry)
    taken_at: float  # the new owner's acquisition


def wait_for_take_over_attempts(database_url: str, application_name: str, count: int) -> None:
    """Until a daemon (its connections named ``application_name``) has made ``count`` attempts to take
    the lease, each begun after the previous one ended: the moments a standby could misbehave. Every
    attempt first takes the session's advisory lock; the test holds it, sees the attempt wait for it
    (a new statement each time), and lets it go."""
    seen = None
    waiting = (
        "SELECT query_start FROM pg_stat_activity WHERE application_name = %s"
        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )
    with psycopg.connect(database_url, autocommit=True) as watcher:
        for attempt in range(1, count + 1):
            with psycopg.connect(database_url) as holder:  # one transaction: the lock until it ends
                holder.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LEASE_LOCK_SPACE, "default"))

                def blocked(since: object = seen) -> object:
                    row = watcher.execute(waiting, (application_name,)).fetchone()
                    return row[0] if row is not None and (since is None or row[0] > since) else None

                wait_until(blocked, timeout=30, message=f"take-over attempt {attempt} of {application_name}")
                seen = blocked()


def record_lease_versions(database_url: str) -> PostgresDatabase:
    """The session's database, open and migrated, recording each lease version in
    ``test_lease_versions`` from now on (before any daemon takes the lease)."""
    db = PostgresDatabase(database_url)
    db.open()
    try:
        with db.transaction() as tx:
            for statement in RECORD_LEASE_VERSIONS:
                tx.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


def take_over_by(db: PostgresDatabase, old_owner: str, new_owner: str) -> TakeOver:
    """The first acquisition of ``new_owner``, and the lease of ``old_owner`` it replaced."""
    with db.transaction() as tx:
        versions = tx.all(LeaseVersion, "SELECT * FROM test_lease_versions ORDER BY id")
    taken = next((n for n, v in enumerate(versions) if v.owner_id == new_owner), None)
    assert taken is not None and taken >= 1, f"{new_owner} never took the lease: {versions}"
    before = versions[taken - 1]  # the version the new owner found
    released = before.owner_id is None
    assert not released or taken >= 2, versions[: taken + 1]
    held = versions[taken - 2] if released else before
    assert held.owner_id == old_owner and held.fencing_token == before.fencing_token, versions[: taken + 1]
    return TakeOver(released=released, expires_at=held.expires_at, taken_at=versions[taken].acquired_at)


@dataclass
class HandoverReport:
    iterations: int
    handover_seconds: list[float]  # SIGTERM of the old owner -> the new one's status says it owns (bench/)
    handovers: list[TakeOver] = field(default_factory=list)


@dataclass(frozen=True)
class CrashReport:
    waited_seconds: float  # kill -9 of the owner -> the standby's status says it took over (bench/)
    take_over: TakeOver


def overlapping_redeploys(database_url: str, workdir: Path, iterations: int) -> HandoverReport:
    """Start A (owner), then B beside it; B must stand by; SIGTERM A; B must take over. Repeat."""
    first = Daemon(workdir / "deploy-0", database_url, env=ONE_NUMBER)
    create_paired_store(first.store)
    original = table_rows(first.store)
    started = [first]
    db = record_lease_versions(database_url)
    handover_seconds = []
    take_overs = []
    try:
        owner = first.start()
        wait_until(lambda: owner.status()["owns_session"], timeout=20, message="the first owner")
        token = owner.status()["fencing_token"]
        for n in range(1, iterations + 1):
            new = Daemon(
                workdir / f"deploy-{n}", database_url, env={**ONE_NUMBER, "PGAPPNAME": f"redeploy-{os.getpid()}-{n}"}
            )
            started.append(new)
            new.start()
            wait_until(lambda: new.status()["state"] != "starting", timeout=10, message="the new daemon booted")
            # Two of its take-over attempts, refused (the owner is live): where it could misbehave.
            wait_for_take_over_attempts(database_url, new.env["PGAPPNAME"], 2)
            status = new.status()
            assert status["state"] == "standby" and not status["owns_session"], status
            assert not new.store.exists(), "a standby daemon touched the store"
            assert "connecting" not in new.log(), "a standby daemon built a client"

            old_owner = owner.status()["owner_id"]
            stopped_at = time.monotonic()
            code = owner.terminate()
            assert code == 0, owner.log()[-3000:]
            assert "lease released" in owner.log()
            wait_until(
                lambda: new.status()["state"] in ("connecting", "reconnecting"), timeout=15, message=f"take-over #{n}"
            )
            handover_seconds.append(time.monotonic() - stopped_at)
            status = new.status()
            # Each take-over a larger token (more than one larger if a renewal came too late on a
            # loaded machine and the new owner took its lease again: still the only owner).
            assert status["owns_session"] and status["fencing_token"] > token, status
            token = status["fencing_token"]
            take_overs.append(take_over_by(db, old_owner, status["owner_id"]))
            assert table_rows(new.store) == original
            owner = new
        assert neonize("devices", owner.store) == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    finally:
        for daemon in started:
            daemon.stop_if_running()
        db.close()
    return HandoverReport(iterations, handover_seconds, handovers=take_overs)


def crash_takeover(database_url: str, workdir: Path) -> float:
    """kill -9 the owner: a standby takes over once the lease expires, from the last complete snapshot.
    Returns the seconds from the kill to the take-over (``crash_takeover_report``: by the database)."""
    return crash_takeover_report(database_url, workdir).waited_seconds


def crash_takeover_report(database_url: str, workdir: Path) -> CrashReport:
    owner = Daemon(workdir / "crash-a", database_url, env=ONE_NUMBER)
    standby = Daemon(workdir / "crash-b", database_url, env=ONE_NUMBER)
    create_paired_store(owner.store)
    original = table_rows(owner.store)
    db = record_lease_versions(database_url)
    try:
        owner.start()
        wait_until(lambda: owner.status()["owns_session"], timeout=20, message="owner")
        standby.start()
        wait_until(lambda: standby.status()["state"] == "standby", timeout=10, message="standby")
        old_owner = owner.status()["owner_id"]
        owner.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: standby.status()["state"] in ("connecting", "reconnecting"),
            timeout=30,
            message="take-over after the crash",
        )
        waited = time.monotonic() - killed_at
        assert table_rows(standby.store) == original
        status = standby.status()
        assert status["handover_seconds"] is not None
        take_over = take_over_by(db, old_owner, status["owner_id"])
    finally:
        owner.stop_if_running()
        standby.stop_if_running()
        db.close()
    return CrashReport(waited, take_over)
