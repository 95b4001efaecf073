"""Soak: thousands of connection rounds of the real neonize client in one daemon; the open
descriptors, threads and RSS of the daemon and its client processes together must stay flat.

    HTTPS_PROXY=http://127.0.0.1:9 .venv/bin/python -m bench.soak_rounds [--rounds 2000] [--every 200]
        [--restore-every 50] [--warm-up 100]

One Runtime over the embedded SQLite database resumes a paired synthetic store; every round runs
neonize in the client process (``bot.connection.client_process``) and fails its dial at a closed
loopback port, and every --restore-every rounds a live restore (``runtime.restore()``) stops the
client, rewrites the store and reconnects. Neonize leaks a store connection pool per connect, so
before rounds ran in a child, 400 rounds took a daemon from 13 to 811 descriptors (RSS 71 -> 146
MB); the client process is replaced every ``ROUNDS_PER_CHILD`` (200) rounds, so a row spans that
many rounds by default (a row of a part of that cycle would see the leak of that part).
--rounds 400 --every 40 (with ``rounds_per_child`` 40 in the code) is a quick check. Run on demand.

Each row holds the medians of the rounds since the row before; the change is measured from the
first row whose rounds all come after the warm-up (and a live restore) to the last.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from bot.connection.client_process import ROUNDS_PER_CHILD, ClientProcesses, process_client_factory
from bot.connection.events import EventSink, WhatsAppClient
from bot.process.retry import RetrySchedule
from bot.runtime import Runtime, Timing
from bot.wiring import build_runtime
from bot.session.state import State
from database import open_database
from tests.fake_whatsapp import wait_until
from tests.runtime_helpers import make_config
from tests.synthetic import create_paired_store

os.environ["HTTPS_PROXY"] = "http://127.0.0.1:9"  # every neonize child dials a closed loopback port
RESTORABLE = (State.CONNECTING, State.RECONNECTING)
GOAL_PERCENT = 5.0
# The daemon's periodic reconciliation and history snapshot (every 120 s and 900 s by default) run
# every 5 s: they are soaked too, and the scheduler's pool has started the workers its five jobs
# need (up to 11 threads) within the warm-up; by default the 1st snapshot, 15 minutes in, adds one.
JOBS_SECONDS = 5


@dataclass(frozen=True)
class Sample:
    round: int
    descriptors: int
    threads: int
    rss_mb: float


def sample(round_number: int, children: list[int]) -> Sample:
    """This process and its client processes, summed."""
    descriptors = threads = rss_kb = 0
    for pid in ["self", *children]:
        try:
            with open(f"/proc/{pid}/status") as status:
                rss_kb += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            descriptors += len(os.listdir(f"/proc/{pid}/fd"))
            threads += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:  # a drained client process leaving as it is measured
            continue
    return Sample(round_number, descriptors, threads, rss_kb / 1024)


def median(samples: list[Sample]) -> Sample:
    """The middle value of each measure, at the last round: a leak moves it, a moment does not."""
    return Sample(
        samples[-1].round,
        *(statistics.median_low(getattr(s, name) for s in samples) for name in ("descriptors", "threads", "rss_mb")),
    )


class CountedRounds:
    """The client factory, counted. Each round is measured as it starts (the previous round has
    ended, this one is not open yet); a row holds the medians since the row before, as
    the mirror's child, a store worker or a database connection may be open at any one moment."""

    def __init__(self, factory: ClientProcesses, every: int) -> None:
        self._factory = factory
        self._every = every
        self._changed = threading.Condition()
        self.count = 0
        self.samples: list[Sample] = []
        self._since_row: list[Sample] = []

    def __call__(self, store_path: Path, sink: EventSink) -> WhatsAppClient:
        with self._changed:
            self.count += 1
            self._since_row.append(sample(self.count, self._factory.pids()))
            if self.count == 1 or self.count % self._every == 0:
                self.samples.append(median(self._since_row))
                self._since_row = []
            self._changed.notify_all()
        return self._factory(store_path, sink)

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, timeout):
                raise TimeoutError(f"round {count} did not start within {timeout:.0f} s (at {self.count})")


def live_restore(runtime: Runtime) -> None:
    """runtime.restore() of the stored session, once the runtime is in a state that allows it."""
    wait_until(lambda: runtime.state in RESTORABLE, timeout=60, message="a state that allows a restore")
    runtime.restore()


def row(s: Sample, note: str = "") -> str:
    return f"{s.round:>6} {s.descriptors:>12} {s.threads:>8} {s.rss_mb:>8.1f}  {note}"


def counted(s: Sample, every: int, warm_up: int) -> bool:
    """All of the row's rounds come after the warm-up."""
    return s.round > 1 and s.round - every >= warm_up


def change(first: float, last: float) -> float:
    return (last - first) / first * 100


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_rounds")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--every", type=int, default=ROUNDS_PER_CHILD, help="a row every this many rounds")
    parser.add_argument("--restore-every", type=int, default=50, help="a live restore every this many rounds")
    parser.add_argument("--warm-up", type=int, default=100, help="rounds not counted (at least one restore)")
    args = parser.parse_args()
    warm_up = max(args.warm_up, args.restore_every)
    if args.every < 1 or args.restore_every < 1 or args.rounds < warm_up + 2 * args.every:
        parser.error("--every, --restore-every must be positive; --rounds >= warm-up (or restore-every) + 2 x every")
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # not a warning line per failed dial

    with tempfile.TemporaryDirectory(prefix="soak-rounds-") as scratch:
        config = make_config(Path(scratch), BACKUP_INTERVAL_SECONDS=str(JOBS_SECONDS))
        create_paired_store(config.store_path)  # boot backs it up; every round resumes its session
        db = open_database(None, config.embedded_database_path)
        rounds = CountedRounds(process_client_factory(logging.ERROR), args.every)
        timing = Timing(history_interval_seconds=JOBS_SECONDS)
        runtime = build_runtime(
            config, db, rounds, backoff=RetrySchedule.exponential(first=0.01, cap=0.05), timing=timing
        )
        restores = 0
        print(
            "this process and its client processes at the start of a round; each row: the medians since the row before"
        )
        print(f"{'round':>6} {'descriptors':>12} {'threads':>8} {'RSS MB':>8}")
        try:
            runtime.start()
            wait_until(lambda: db.load_session(config.session_id) is not None, timeout=60, message="the backup")
            printed = 0
            for n in range(1, args.rounds + 1):
                rounds.wait_for(n)
                if n % args.restore_every == 0:
                    live_restore(runtime)
                    restores += 1
                for s in rounds.samples[printed:]:
                    print(row(s, "" if counted(s, args.every, warm_up) else "(warm-up)"), flush=True)
                printed = len(rounds.samples)
        finally:
            runtime.stop()
            db.close()
    assert "neonize" not in sys.modules, "the soak process imported neonize"

    first = next(s for s in rounds.samples if counted(s, args.every, warm_up))
    last = rounds.samples[-1]
    changes = {
        "descriptors": change(first.descriptors, last.descriptors),
        "threads": change(first.threads, last.threads),
        "RSS": change(first.rss_mb, last.rss_mb),
    }
    print(f"\n{rounds.count} rounds, {restores} live restores, {runtime.status().reconnect_count} failed dials")
    print(f"change round {first.round} -> {last.round}: " + ", ".join(f"{k} {v:+.1f}%" for k, v in changes.items()))
    flat = all(abs(v) <= GOAL_PERCENT for v in changes.values())
    print(f"goal: flat within {GOAL_PERCENT:.0f}%: {'PASS' if flat else 'FAIL'}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
