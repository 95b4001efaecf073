"""Several replicas of the real daemon sharing many sessions on one PostgreSQL (issue 26), for
``tests/test_replicas.py`` and ``bench/soak_replicas.py``.

Each instance is a real ``python -m tests.fake_daemon`` process (the daemon unchanged but for its
client processes, which talk to ``tests.fake_network``'s server) with its own DATA_DIR, SESSION_ID
unset. The fake server tells sessions apart and knows which daemon process holds a live connection
of each: the ground truth of "hosted" (a client connected), sampled by ``DoubleHosting``.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from database import LeaseInfo, PostgresDatabase
from tests.fake_network import FakeServer
from tests.fake_whatsapp import wait_until
from tests.redeploy import TOKEN, Daemon
from tests.synthetic import create_paired_store

# Every reply names the message it answers ("[m12]"): duplicates are counted at the server.
REPLIES = """
business = "Replicas"
[greeting]
after_silence_hours = 12
text = "Olá [{name}]"
[hours]
timezone = "UTC"
monday = "00:00-23:59"
tuesday = "00:00-23:59"
wednesday = "00:00-23:59"
thursday = "00:00-23:59"
friday = "00:00-23:59"
saturday = "00:00-23:59"
sunday = "00:00-23:59"
after_hours = "Fechado [{name}]"
[menu]
header = "Menu"
keywords = ["menu"]
[[menu.items]]
title = "Horário"
reply = "Horário [{name}]"
[handoff]
keywords = ["xyzzy-nunca"]
reply = "Atendente [{name}]"
pause_minutes = 1
operator_pause_minutes = 1
[fallback]
text = "Não entendi [{name}]"
[media]
other = "Recebi [{name}]"
handoff = []
ignore = ["sticker"]
[repeat]
window_minutes = 30
after_hours = "Fechado [{name}]"
fallback = "Não entendi [{name}]"
[behaviour]
mark_read = false
typing_seconds = 0
reply_expiry_minutes = 60
"""
TAG = re.compile(r"\[(m\d+)\]")
ENV = {"LEASE_TTL_SECONDS": "6", "LEASE_RENEW_SECONDS": "2", "BACKUP_INTERVAL_SECONDS": "60", "LOG_LEVEL": "INFO"}


def pid_of(owner_id: str) -> int:
    """An instance id is host/deployment/pid."""
    return int(owner_id.rsplit("/", 1)[1])


@dataclass
class DoubleHosting:
    """Samples the fake server every ``every`` seconds: a session with live connections from two
    daemon processes at once is hosted twice."""

    server: FakeServer
    every: float = 0.5
    samples: int = 0
    seen: list[tuple[float, str, frozenset[int]]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DoubleHosting:
        self._thread = threading.Thread(target=self._run, name="double-hosting", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            for session, daemons in self.server.hosting().items():
                if len(daemons) > 1:
                    self.seen.append((time.monotonic(), session, frozenset(daemons)))
            self.samples += 1


class Replicas:
    """Instances of the daemon sharing ``sessions`` over one database and one fake WhatsApp."""

    def __init__(
        self, database_url: str, workdir: Path, sessions: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.sessions = sessions
        self.server = FakeServer()
        self.replies = workdir / "replies.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.replies.write_text(REPLIES, encoding="utf-8")
        self.env = {**ENV, **(env or {})}
        self.instances: list[Daemon] = []
        self.db = PostgresDatabase(database_url)
        self.db.open()
        self._seq = 0
        self.sent: dict[str, str] = {}  # message id -> session, every message customers sent

    # --- instances ---------------------------------------------------------------------------------

    def instance(self) -> Daemon:
        daemon = Daemon(
            self.workdir / f"instance-{len(self.instances)}",
            self.database_url,
            command=[sys.executable, "-m", "tests.fake_daemon", self.server.address],
            env={**self.env, "BOT_REPLIES": str(self.replies)},
        )
        self.instances.append(daemon)
        return daemon

    def seed(self, first: Daemon) -> None:
        """Every session registered, each with a paired store on the first instance's disk (it
        stores them in the database when it takes them)."""
        template = self.workdir / "template.sqlite3"
        create_paired_store(template)
        for session_id in self.sessions:
            self.db.register_session(session_id)
            store = first.data_dir / "sessions" / session_id / "whatsmeow.sqlite3"
            store.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, store)

    def running(self) -> list[Daemon]:
        return [d for d in self.instances if d.process is not None and d.process.poll() is None]

    def kill(self, daemon: Daemon) -> None:
        """kill -9 of the daemon process; its client processes end when their pipe closes."""
        assert daemon.process is not None
        pid = daemon.process.pid
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
        wait_until(
            lambda: all(pid not in d for d in self.server.hosting().values()),
            timeout=30,
            message="the killed instance's clients gone",
        )

    def terminate(self, daemon: Daemon) -> int:
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        return daemon.process.wait(timeout=90)

    def stop_all(self) -> None:
        for daemon in self.instances:
            daemon.stop_if_running()
        self.server.close()
        self.db.close()

    # --- what the database and the server say -------------------------------------------------------

    def owners(self) -> dict[str, str]:
        """Session -> the instance whose lease on it is live now."""
        return {lease.session_id: lease.owner_id for lease in self.db.leases() if _held(lease)}

    def owned_by(self) -> collections.Counter[int]:
        """Daemon pid -> how many sessions it owns."""
        return collections.Counter(pid_of(owner) for owner in self.owners().values())

    def settled(self, daemons: list[Daemon], low: int, high: int) -> bool:
        """Every session owned by one of ``daemons`` (each owning low..high), and connected there only."""
        pids = {d.process.pid for d in daemons if d.process is not None}
        owners = self.owners()
        if set(owners) != set(self.sessions) or {pid_of(o) for o in owners.values()} - pids:
            return False
        counts = self.owned_by()
        if any(not low <= counts[pid] <= high for pid in pids):
            return False
        hosting = self.server.hosting()
        return all(hosting.get(sid) == {pid_of(owner)} for sid, owner in owners.items())

    def get(self, daemon: Daemon, path: str) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{daemon.port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()

    def last_connected_by(self, session_id: str) -> str | None:
        """The instance its newest ``session.state`` event of a connection names."""
        events = self.db.events_after(session_id, 0, limit=100_000)
        states = [json.loads(e.payload) for e in events if e.event_type == "session.state"]
        connected = [p for p in states if p.get("state") == "connected"]
        return connected[-1].get("owner_id") if connected else None

    # --- customers ---------------------------------------------------------------------------------

    def message(self, session: str) -> str:
        """A customer writes to ``session``'s number; returns the message's tag."""
        self._seq += 1
        tag = f"m{self._seq}"
        chat = f"5511{self._seq % 997:08d}@s.whatsapp.net"
        message_id = f"REPL{self._seq:08d}"
        self.sent[message_id] = session
        self.server.customer_sends(
            {
                "message_id": message_id,
                "chat": chat,
                "sender": chat,
                "push_name": tag,
                "text": "oi",
                "from_me": False,
                "is_group": False,
                "timestamp": int(time.time()),
                "kind": "text",
            },
            session=session,
        )
        return tag

    def answers(self) -> collections.Counter[str]:
        """Message tag -> replies the server got naming it."""
        return collections.Counter(tag for sent in list(self.server.sent) for tag in TAG.findall(sent.text))

    def everyone_writes(self, timeout: float = 60) -> None:
        """One message to every session, each answered."""
        tags = [self.message(session) for session in self.sessions]
        wait_until(lambda: all(self.answers()[t] >= 1 for t in tags), timeout=timeout, message="every session answered")

    def logged(self) -> set[str]:
        with self.db.transaction() as tx:
            rows = tx.execute("SELECT message_id FROM whatsapp_messages WHERE direction = 'in'").fetchall()
        return {row["message_id"] for row in rows}


def _held(lease: LeaseInfo) -> bool:
    return lease.owner_id is not None and lease.expires_in_seconds > 0
