"""Soak: replicas sharing many sessions (issue 26) through random kill -9, SIGTERM and restarts.
Prints a table; run on demand.

    .venv/bin/python -m bench.soak_replicas [--minutes 30] [--instances 3] [--sessions 60]
        [--rate 5] [--every 40] [--seed 1]

Real daemon processes (``tests.fake_daemon``, SESSION_ID unset) on one PostgreSQL cluster, a fake
WhatsApp server on loopback that tells sessions apart (``tests.replicas``). The first instance
stores every session, the others join; then customers write to random sessions at --rate messages
a second while, every --every seconds (drawn in [half, whole]), a random instance is killed with
kill -9 or stopped with SIGTERM, and a new one (a fresh container: empty disk) starts a few seconds
later. Counted, from the server and the database:
- lost: messages the server handed over (the client acknowledged them: whatsmeow acknowledges
  before the handler runs) that are not in the message log; a kill -9 may lose at most what its
  client processes held unlogged (UNLOGGED_WINDOW + neonize's buffer each): printed beside it;
- answered twice: customers' messages with more than one reply (each reply names its message);
- unowned: each gap during which a session had no live lease (sampled every 0.5 s), p50/p99/max
  (a killed instance's leases still count as held until they run out); and each gap during which
  its owner had no connected client: the outage a customer sees (from a kill: TTL + a round +
  the restore);
- double hosting: samples where two instances had a live connection of one session, and streams
  one client replaced from another (both must be 0);
- renewal cost: one statement per instance per renewal, at 100 sessions x 3 instances, beside one
  statement per session (measured first, on the same cluster).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bot.connection.client_process import UNLOGGED_WINDOW
from database import Fence, PostgresDatabase
from tests.fake_network import NEONIZE_BUFFER
from tests.fake_whatsapp import wait_until
from tests.pg_cluster import PostgresCluster
from tests.replicas import DoubleHosting, Replicas, pid_of


class Gaps:
    """Per session, the spans during which a predicate did not hold (sampled)."""

    def __init__(self, sessions: list[str]) -> None:
        self._since: dict[str, float | None] = {s: None for s in sessions}
        self.spans: list[float] = []

    def sample(self, holding: set[str], now: float) -> None:
        for session, since in self._since.items():
            if session in holding:
                if since is not None:
                    self.spans.append(now - since)
                    self._since[session] = None
            elif since is None:
                self._since[session] = now

    def close(self, now: float) -> None:
        """Spans still open end with the soak."""
        for session, since in self._since.items():
            if since is not None:
                self.spans.append(now - since)
                self._since[session] = None


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, database_url: str) -> None:
        self.args = args
        self.sessions = [f"n{n:03d}" for n in range(1, args.sessions + 1)]
        # The shipped lease defaults (TTL 10 s, renewal 3 s): what a crash costs in production.
        lease = {"LEASE_TTL_SECONDS": str(args.lease_ttl), "LEASE_RENEW_SECONDS": str(args.lease_renew)}
        self.cluster = Replicas(database_url, workdir, self.sessions, env=lease)
        self.double = DoubleHosting(self.cluster.server)
        self.unowned = Gaps(self.sessions)
        self.unconnected = Gaps(self.sessions)
        self.events: collections.Counter[str] = collections.Counter()
        # Per disruption: (kind, when, the instance's pid); the sampler notes when every session is
        # connected again, none of them by that instance.
        self._open_disruptions: list[tuple[str, float, int]] = []
        self.recoveries: dict[str, list[float]] = collections.defaultdict(list)
        self.rng = random.Random(args.seed)
        self._done = threading.Event()

    def run(self) -> float:
        first = self.cluster.instance()
        self.cluster.seed(first)
        first.start()
        wait_until(
            lambda: self.cluster.settled([first], len(self.sessions), len(self.sessions)),
            timeout=600,
            message="the first instance stores and hosts every session",
        )
        others = [self.cluster.instance().start() for _ in range(self.args.instances - 1)]
        share = -(-len(self.sessions) // self.args.instances)
        wait_until(
            lambda: self.cluster.settled([first, *others], share - 2, share + 2),
            timeout=600,
            message="the instances share the sessions",
        )
        self.double.start()
        threading.Thread(target=self._sample, name="gaps", daemon=True).start()
        customers = threading.Thread(target=self._customers, name="customers", daemon=True)
        customers.start()
        started = time.monotonic()
        end = started + self.args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(self.rng.uniform(self.args.every / 2, self.args.every), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            self._disrupt()
        self._done.set()
        customers.join()
        running = self.cluster.running()
        wait_until(lambda: self.cluster.settled(running, 1, len(self.sessions)), timeout=120, message="all owned")
        wait_until(lambda: self.cluster.server.backlog() == 0, timeout=300, message="every message delivered")
        wait_until(self._answered, timeout=300, message="every logged message answered")
        return time.monotonic() - started

    def _disrupt(self) -> None:
        running = self.cluster.running()
        victim = self.rng.choice(running)
        how = self.rng.choice(["kill", "sigterm"])
        assert victim.process is not None
        self._open_disruptions.append((how, time.monotonic(), victim.process.pid))
        if how == "kill":
            self.cluster.kill(victim)
        else:
            code = self.cluster.terminate(victim)
            if code != 0:
                self.events["sigterm exit != 0"] += 1
        self.events[how] += 1
        time.sleep(self.rng.uniform(2, 8))  # the platform starts the replacement
        self.cluster.instance().start()
        self.events["restart"] += 1

    def _customers(self) -> None:
        interval = 1 / self.args.rate
        next_at = time.monotonic()
        while not self._done.is_set():
            self.cluster.message(self.rng.choice(self.sessions))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _sample(self) -> None:
        while not self._done.wait(0.5):
            now = time.monotonic()
            try:
                owners = self.cluster.owners()
            except Exception:
                continue
            self.unowned.sample(set(owners), now)
            hosting = self.cluster.server.hosting()
            connected = {s for s, daemons in hosting.items() if pid_of(owners.get(s, "x/x/0")) in daemons}
            self.unconnected.sample(connected, now)
            if len(connected) == len(self.sessions):
                hosts = {pid for daemons in hosting.values() for pid in daemons}
                for disruption in list(self._open_disruptions):
                    how, at, pid = disruption
                    if pid not in hosts:
                        self.recoveries[how].append(now - at)
                        self._open_disruptions.remove(disruption)
        now = time.monotonic()
        self.unowned.close(now)
        self.unconnected.close(now)

    def _answered(self) -> bool:
        answers = self.cluster.answers()
        logged = self.cluster.logged()
        return all(answers[f"m{int(mid[4:])}"] >= 1 for mid in logged if mid in self.cluster.sent)

    def report(self, seconds: float, renewal: list[tuple[str, str]]) -> bool:
        server = self.cluster.server
        logged = self.cluster.logged()
        acknowledged = set(server.acknowledged)
        lost = sorted(acknowledged - logged)
        never = sorted(set(self.cluster.sent) - acknowledged)
        answers = self.cluster.answers()
        twice = {tag: n for tag, n in answers.items() if n > 1}
        unanswered = sum(1 for mid in logged if mid in self.cluster.sent and answers[f"m{int(mid[4:])}"] == 0)
        bound = self.events["kill"] * (UNLOGGED_WINDOW + NEONIZE_BUFFER + 2)
        rows = [
            ("instances / sessions", f"{self.args.instances} / {len(self.sessions)}"),
            ("wall time of the soak, s", f"{seconds:.0f}"),
            (
                "kill -9 / SIGTERM / restarts",
                f"{self.events['kill']} / {self.events['sigterm']} / {self.events['restart']}",
            ),
            ("SIGTERM exits other than 0", self.events["sigterm exit != 0"]),
            ("messages sent by customers", len(self.cluster.sent)),
            ("acknowledged by the (fake) server", len(acknowledged)),
            ("never delivered (still waiting)", len(never)),
            ("lost (acknowledged, not logged)", f"{len(lost)} (bound for the kills: {bound})"),
            ("answered twice", sum(n - 1 for n in twice.values())),
            ("logged, never answered", unanswered),
            ("lease TTL / renewal, s", f"{self.args.lease_ttl} / {self.args.lease_renew}"),
            ("unowned (no live lease): spans, p50/p99/max s", _spans(self.unowned.spans)),
            ("not connected by its owner: spans, p50/p99/max s", _spans(self.unconnected.spans)),
            ("kill -9 -> every session connected again, s", _each(self.recoveries["kill"])),
            ("SIGTERM -> every session connected again, s", _each(self.recoveries["sigterm"])),
            ("double hosting (samples every 0.5 s)", f"{len(self.double.seen)} of {self.double.samples}"),
            ("streams replaced (two clients at once)", server.replaced),
            *renewal,
        ]
        width = max(len(label) for label, _ in rows)
        print(f"\n{'soak (replicas)':<{width}}  value")
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
        if lost:
            print("\nlost:", ", ".join(lost[:20]))
        return not twice and not self.double.seen and server.replaced == 0 and len(lost) <= bound and not never


def _each(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) or "-"


def _spans(spans: list[float]) -> str:
    if not spans:
        return "0"
    ordered = sorted(spans)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{len(ordered)}, {statistics.median(ordered):.1f} / {p99:.1f} / {ordered[-1]:.1f}"


def renewal_cost(database_url: str, sessions: int = 100, instances: int = 3, rounds: int = 50) -> list[tuple[str, str]]:
    """The renewal load of ``instances`` sharing ``sessions``: one statement per instance per round,
    against one statement per session (the per-session keepers before issue 26)."""
    db = PostgresDatabase(database_url)
    db.open()
    try:
        held: dict[str, list[Fence]] = collections.defaultdict(list)
        for n in range(sessions):
            owner = f"bench/{n % instances}"
            fence = db.acquire_lease(f"r{n:03d}", owner, 10)
            assert fence is not None
            held[owner].append(fence)
        started = time.perf_counter()
        for _ in range(rounds):
            for owner, fences in held.items():
                assert len(db.beat_and_renew(owner, fences, 10, 100)) == len(fences)
        batched = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for _ in range(rounds):
            for fences in held.values():
                for fence in fences:
                    assert db.renew_lease(fence, 10)
        single = (time.perf_counter() - started) / rounds
    finally:
        db.close()
    return [
        (f"renewal, {sessions} sessions x {instances} instances", "per round of every instance:"),
        ("  one statement per instance (now)", f"{instances} statements, {batched * 1000:.1f} ms"),
        ("  one statement per session (before)", f"{sessions} statements, {single * 1000:.1f} ms"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--rate", type=float, default=5.0, help="customers' messages a second, to random sessions")
    parser.add_argument(
        "--every", type=float, default=40.0, help="seconds between disruptions (drawn in [half, whole])"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease-ttl", type=int, default=10, help="LEASE_TTL_SECONDS")
    parser.add_argument("--lease-renew", type=int, default=3, help="LEASE_RENEW_SECONDS")
    args = parser.parse_args()
    cluster = PostgresCluster(durable=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="zapkeep-replicas-"))
    soak: Soak | None = None
    try:
        renewal = renewal_cost(cluster.create_database())
        soak = Soak(args, workdir, cluster.create_database())
        seconds = soak.run()
        ok = soak.report(seconds, renewal)
    finally:
        if soak is not None:
            soak.double.stop()
            soak._done.set()
            for daemon in soak.cluster.instances:
                daemon.stop_if_running()
            soak.cluster.server.close()
            soak.cluster.db.close()
        cluster.stop()
    print(f"\nlogs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
