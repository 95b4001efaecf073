"""Soak: the real daemon around the clock, against a fake WhatsApp server, with everything that
goes wrong in production happening on a schedule. Prints a table; run on demand.

    .venv/bin/python -m bench.soak_24x7 [--messages 10000] [--rate 30] [--speed 30]
        [--restores 20] [--sigterms 3] [--kills 2] [--no-hand-back]

Real `python -m bot` processes (``tests.fake_daemon``: only their client process differs, see
``tests.fake_network``), a real PostgreSQL cluster on loopback, real signals. Time runs --speed times
faster than a shop's: customers send --messages messages at --rate a second (5% voice notes,
photos, stickers, reactions and documents; 1% text holding NUL or a lone surrogate, which
PostgreSQL cannot store as it is), the connection drops every 30 simulated seconds (whatsmeow
reconnects), an admin restores the stored session --restores times, and the owner is stopped
with SIGTERM --sigterms times and killed with kill -9 --kills times, in the middle of traffic
(each kill as the messages held during a 20 s outage arrive, faster than they are logged);
each time the standby takes over and a fresh standby (a new container) starts beside it.

Counted at the end, from the server and the database:
- lost: messages the server handed over and forgot (whatsmeow acknowledged them) that are not
  in the message log. whatsmeow acknowledges before the handler runs, so a kill -9 can lose what
  was acknowledged and not yet logged: the client process lets at most UNLOGGED_WINDOW messages
  be with the daemon unlogged, which bounds that by the window and neonize's buffer a kill
  (checked: the soak fails above it);
- duplicate replies: customers' messages answered more than once (every reply names the message
  it answers);
- descriptors and RSS of each daemon process over its life.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bot.connection.client_process import UNLOGGED_WINDOW
from tests.fake_network import NEONIZE_BUFFER, FakeServer
from tests.fake_whatsapp import wait_until
from tests.replicas import REPLIES as REPLICAS_REPLIES
from tests.pg_cluster import PostgresCluster
from tests.redeploy import TOKEN, Daemon
from tests.synthetic import create_paired_store

# Every reply names the message it answers ("[m123]"): duplicates are counted at the server. The
# replicas' rules, and one keyword rule more.
REPLIES = REPLICAS_REPLIES.replace('business = "Replicas"', 'business = "Soak"') + (
    '[[rules]]\nname = "preco"\nkeywords = ["preço"]\nreply = "Preço [{name}]"\n'
)
TEXTS = ["oi", "bom dia", "qual o preço do pão?", "1", "vocês entregam?", "obrigado", "tem bolo hoje?"]
NON_TEXT = ["audio", "image", "sticker", "reaction", "document"]
UNSTORABLE = ["pão\x00francês", "a\ud800b", "\x00"]
KILL_OUTAGE_SECONDS = 20.0  # each kill -9 comes as the messages of an outage this long arrive
WARM_UP = 10.0  # seconds of a daemon's life before its descriptors and RSS are sampled
TAG = re.compile(r"\[(m\d+)\]")
ENV = {
    "LEASE_TTL_SECONDS": "6",
    "LEASE_RENEW_SECONDS": "2",
    "BACKUP_INTERVAL_SECONDS": "30",
    "LOG_LEVEL": "INFO",
    "SESSION_ID": "default",  # one number per service: the second daemon stands by (replicas: soak_replicas)
}


def customer_message(seq: int, rng: random.Random) -> dict[str, object]:
    chat = f"5511{rng.randrange(300):08d}@s.whatsapp.net"
    roll = rng.random()
    kind, text = "text", rng.choice(TEXTS)
    if roll < 0.05:
        kind, text = rng.choice(NON_TEXT), ""
    elif roll < 0.06:
        text = rng.choice(UNSTORABLE)
    return {
        "message_id": f"SOAK{seq:08d}",
        "chat": chat,
        "sender": chat,
        "push_name": f"m{seq}",
        "text": text,
        "from_me": False,
        "is_group": False,
        "timestamp": int(time.time()),
        "kind": kind,
    }


@dataclass
class Life:
    """One daemon process's descriptors and RSS, sampled while it runs."""

    name: str
    started: float = field(default_factory=time.monotonic)
    ending: bool = False  # signalled: its last moments are not its steady state
    samples: list[tuple[int, float]] = field(default_factory=list)  # after its first WARM_UP seconds


def sample(pid: int) -> tuple[int, float] | None:
    try:
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as status:
            rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return descriptors, rss_kb / 1024


def post(daemon: Daemon, path: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}{path}", method="POST", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=150) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def state(daemon: Daemon) -> str:
    try:
        return str(daemon.status()["state"])
    except (OSError, ValueError, KeyError):
        return "unreachable"


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, database_url: str) -> None:
        self.args = args
        self.workdir = workdir
        self.database_url = database_url
        self.server = FakeServer()
        self.replies = workdir / "replies.toml"
        self.replies.write_text(REPLIES, encoding="utf-8")
        self.daemons: list[Daemon] = []
        self.lives: dict[int, Life] = {}
        self.events: list[str] = []
        self.sent_by_customers = 0
        self._done = threading.Event()

    def daemon(self) -> Daemon:
        daemon = Daemon(
            self.workdir / f"daemon-{len(self.daemons)}",
            self.database_url,
            command=[sys.executable, "-m", "tests.fake_daemon", self.server.address],
            env={
                **ENV,
                "BOT_REPLIES": str(self.replies),
                "ZAPKEEP_SOAK_NO_HAND_BACK": str(int(self.args.no_hand_back)),
            },
        )
        self.daemons.append(daemon)
        return daemon

    def owner(self) -> Daemon:
        """The daemon that owns the session and talks to WhatsApp (a drop may be under way)."""
        found: list[Daemon] = []

        def look() -> bool:
            for daemon in self.daemons:
                if daemon.process is not None and daemon.process.poll() is None:
                    try:
                        status = daemon.status()
                    except (OSError, ValueError):
                        continue
                    if status["owns_session"] and status["state"] in ("connected", "reconnecting"):
                        found.append(daemon)
                        return True
            return False

        wait_until(look, timeout=60, message="an owner")
        return found[-1]

    def run(self) -> None:
        first = self.daemon()
        create_paired_store(first.store)
        first.start()
        wait_until(lambda: state(first) == "connected", timeout=60, message="the first owner connected")
        standby = self.daemon().start()
        wait_until(lambda: state(standby) == "standby", timeout=60, message="the standby")
        threading.Thread(target=self._sampler, daemon=True).start()
        threading.Thread(target=self._customers, daemon=True).start()
        threading.Thread(target=self._drops, daemon=True).start()
        n = self.args.messages
        disruptions = ["sigterm"] * self.args.sigterms + ["kill"] * self.args.kills
        random.Random(7).shuffle(disruptions)
        schedule = [(int(n * (i + 1) / (len(disruptions) + 1)), what) for i, what in enumerate(disruptions)]
        schedule += [(int(n * (i + 0.5) / self.args.restores), "restore") for i in range(self.args.restores)]
        for point, what in sorted(schedule):  # each once the customers have sent that many messages
            wait_until(lambda: self.sent_by_customers >= point, timeout=n / self.args.rate + 600, message="traffic")
            if what == "restore":
                self._restore()
            else:
                self._disrupt(what)
        wait_until(lambda: self.sent_by_customers >= n, timeout=n / self.args.rate + 600, message="all traffic")
        wait_until(lambda: self.server.backlog() == 0, timeout=600, message="every message delivered")
        self._settle()
        owner = self.owner()
        assert owner.process is not None
        self.lives.setdefault(owner.process.pid, Life(owner.data_dir.name)).ending = True
        assert owner.terminate() == 0
        self._done.set()

    def _customers(self) -> None:
        rng = random.Random(1)
        interval = 1 / self.args.rate
        next_at = time.monotonic()
        for seq in range(self.args.messages):
            self.server.customer_sends(customer_message(seq, rng))
            self.sent_by_customers = seq + 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _drops(self) -> None:
        every = 30 / self.args.speed
        while not self._done.wait(every):
            if self.server.drop(seconds=3 / self.args.speed):
                self.events.append("drop")

    def _sampler(self) -> None:
        while not self._done.wait(2):
            for daemon in self.daemons:
                if daemon.process is not None and daemon.process.poll() is None:
                    life = self.lives.setdefault(daemon.process.pid, Life(daemon.data_dir.name))
                    measured = sample(daemon.process.pid)
                    if measured is not None and not life.ending and time.monotonic() - life.started > WARM_UP:
                        life.samples.append(measured)

    def _restore(self) -> None:
        for _ in range(100):
            code = post(self.owner(), "/api/session/restore?session_id=default")
            if code == 200:
                self.events.append("restore")
                return
            time.sleep(0.2)  # between rounds, or a drop: the next try
        raise AssertionError("no restore succeeded for 20 s")

    def _disrupt(self, what: str) -> None:
        owner = self.owner()
        standby = next(d for d in self.daemons if d is not owner and d.process and d.process.poll() is None)
        assert owner.process is not None
        if what == "kill":
            # The worst moment: whatsmeow reconnects after an outage and WhatsApp pushes everything
            # it held meanwhile, faster than the daemon logs it.
            self.server.drop(seconds=KILL_OUTAGE_SECONDS)
            acknowledged = len(self.server.acknowledged)
            backlog = KILL_OUTAGE_SECONDS * self.args.rate / 2
            wait_until(lambda: self.server.backlog() >= backlog, timeout=60, message="a backlog")
            wait_until(
                lambda: len(self.server.acknowledged) >= acknowledged + backlog / 2, timeout=60, message="the burst"
            )
        self.lives.setdefault(owner.process.pid, Life(owner.data_dir.name)).ending = True
        if what == "kill":
            owner.process.send_signal(signal.SIGKILL)
            owner.process.wait(10)
        else:
            owner.process.send_signal(signal.SIGTERM)
            code = owner.process.wait(60)
            assert code == 0, f"SIGTERM exit {code}: {owner.log()[-2000:]}"
        self.events.append(what)
        wait_until(lambda: state(standby) == "connected", timeout=60, message=f"the standby took over ({what})")
        fresh = self.daemon().start()
        wait_until(lambda: state(fresh) == "standby", timeout=60, message="the fresh standby")

    def _settle(self) -> None:
        """Until the log and the outbox stop moving: every delivered message handled, every reply out."""
        last = None
        while True:
            now = self._counts()
            if now == last and now[1] == 0:
                return
            last = now
            time.sleep(3)

    def _counts(self) -> tuple[int, int]:
        with psycopg.connect(self.database_url) as conn:
            logged = conn.execute("SELECT COUNT(*) FROM whatsapp_messages WHERE direction = 'in'").fetchone()
            queued = conn.execute(
                "SELECT COUNT(*) FROM whatsapp_messages WHERE direction = 'out' AND status IN ('queued', 'sending')"
            ).fetchone()
        return int(logged[0]), int(queued[0])

    def report(self, seconds: float) -> bool:
        with psycopg.connect(self.database_url) as conn:
            logged = {
                message_id: kind
                for message_id, kind in conn.execute(
                    "SELECT message_id, message_type FROM whatsapp_messages WHERE direction = 'in'"
                )
            }
            replies = dict(
                conn.execute(
                    "SELECT status, COUNT(*) FROM whatsapp_messages WHERE direction = 'out' GROUP BY status"
                ).fetchall()
            )
        acknowledged = self.server.acknowledged
        lost = sorted(set(acknowledged) - set(logged))
        answered = collections.Counter(tag for sent in self.server.sent for tag in TAG.findall(sent.text))
        duplicates = {tag: count for tag, count in answered.items() if count > 1}
        non_text = sum(1 for kind in logged.values() if kind != "text")
        unstorable = sum(1 for m in acknowledged.values() if any(c in str(m["text"]) for c in "\x00\ud800"))
        counts = collections.Counter(self.events)
        rows = [
            ("messages sent by customers", self.sent_by_customers),
            ("acknowledged by the (fake) server", len(acknowledged)),
            ("in the message log", len(logged)),
            ("  of them not text", non_text),
            ("  of them with NUL or a lone surrogate (stored as U+FFFD)", unstorable),
            ("lost (acknowledged, not logged)", len(lost)),
            ("replies sent (at the server)", len(self.server.sent)),
            ("duplicate replies", sum(count - 1 for count in duplicates.values())),
            ("reply rows by status", ", ".join(f"{k} {v}" for k, v in sorted(replies.items()))),
            ("connections / replaced (two clients at once)", f"{self.server.connections} / {self.server.replaced}"),
            (
                "drops / restores / SIGTERM / kill -9",
                " / ".join(str(counts[k]) for k in ("drop", "restore", "sigterm", "kill")),
            ),
            ("wall time, s (simulated hours)", f"{seconds:.0f} ({seconds * self.args.speed / 3600:.1f})"),
        ]
        width = max(len(label) for label, _ in rows)
        print(f"\n{'soak (24x7)':<{width}}  value")
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
        print(f"\n{'daemon process':<16} {'samples':>7} {'fds first-last (max)':>22} {'RSS MB first-last':>19}")
        for life in self.lives.values():
            if len(life.samples) < 2:
                continue
            steady = life.samples
            fds = [s[0] for s in steady]
            print(
                f"{life.name:<16} {len(life.samples):>7} {f'{fds[0]}-{fds[-1]} ({max(fds)})':>22}"
                f" {f'{steady[0][1]:.1f}-{steady[-1][1]:.1f}':>19}"
            )
        if lost:
            print("\nlost:", ", ".join(lost[:20]), "..." if len(lost) > 20 else "")
            for message_id in lost[:5]:
                print(" ", json.dumps(acknowledged[message_id], ensure_ascii=True)[:160])
        bound = self.args.kills * (UNLOGGED_WINDOW + NEONIZE_BUFFER + 2)
        print(f"\nloss bound (kills x (window + neonize's buffer + 2)): {bound}")
        return not duplicates and self.server.replaced == 0 and (self.args.no_hand_back or len(lost) <= bound)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=30.0, help="customers' messages a second")
    parser.add_argument("--speed", type=float, default=30.0, help="simulated seconds a real second")
    parser.add_argument("--restores", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=3)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument(
        "--no-hand-back", action="store_true", help="compare: client processes that do not wait for the log"
    )
    args = parser.parse_args()
    cluster = PostgresCluster(durable=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="zapkeep-soak-"))
    soak = Soak(args, workdir, cluster.create_database())
    started = time.monotonic()
    try:
        soak.run()
        ok = soak.report(time.monotonic() - started)
    finally:
        for daemon in soak.daemons:
            daemon.stop_if_running()
        soak.server.close()
        cluster.stop()
    print(f"\nlogs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
