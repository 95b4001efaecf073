"""Change capture for many sessions: a capture process per store (the layout before issue 25)
against one capture process shared by every store (now), for 1, 10 and 50 stores.

    .venv/bin/python -m bench.bench_capture [--counts 1,10,50] [--size small|realistic|medium]

Each store is a paired synthetic store in WAL mode with zapkeep's triggers, as the daemon prepares
it. Each store's channel does what a mirror does: one scan of the whole store (the mirror's start),
then a poll after another, each waiting up to 5 s (the daemon's idle state). Both layouts run the
same code: "per store" gives each store a capture host (so a child) of its own, as each mirror had
its own process before. Printed: PSS summed over the capture processes (``/proc/<pid>/smaps_rollup``),
threads, descriptors (all, and those on store files), CPU while idle, and how long a commit to one
store takes to be answered while every other store's poll waits (thread per store in the child).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bot.session.capture_host import CaptureHost, MirrorProcess
from bot.session.document import prepare_store_file
from tests.synthetic import DEVICE_JID, MEDIUM, REALISTIC, SMALL, fill_store, neonize

SIZES = {"small": SMALL, "realistic": REALISTIC, "medium": MEDIUM}
IDLE_SECONDS = 10.0
POLL_WAIT = 5.0


@dataclass(frozen=True)
class Row:
    layout: str
    stores: int
    processes: int
    pss_mib: float
    threads: int
    fds: int
    store_fds: int
    idle_cpu_pct: float
    wake_ms: float


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descriptors(pid: int, under: Path) -> tuple[int, int]:
    """(all descriptors, those on files under ``under``)."""
    names = os.listdir(f"/proc/{pid}/fd")
    on_stores = 0
    for name in names:
        try:
            on_stores += os.readlink(f"/proc/{pid}/fd/{name}").startswith(str(under))
        except OSError:
            pass
    return len(names), on_stores


def make_stores(root: Path, count: int, size_name: str) -> list[Path]:
    template = root / "template" / "whatsmeow.sqlite3"
    if not template.exists():
        template.parent.mkdir(parents=True)
        neonize("create", template)  # the real whatsmeow schema, once
    stores = []
    for n in range(count):
        store = root / "sessions" / f"s{n:03d}" / "whatsmeow.sqlite3"
        if not store.exists():
            store.parent.mkdir(parents=True)
            shutil.copy(template, store)
            fill_store(store, SIZES[size_name], seed=n + 1)
            prepare_store_file(store)  # WAL mode and zapkeep's triggers, as at boot
        stores.append(store)
    return stores


class Poller:
    """One store's channel doing what its mirror does: poll after poll; ``answered`` records when
    a poll came back with changes."""

    def __init__(self, channel: MirrorProcess) -> None:
        self.channel = channel
        self.after = channel.request({"op": "scan", "after": 0, "known": {}}).sequence
        self.answered = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            batch = self.channel.request({"op": "poll", "after": self.after, "wait": POLL_WAIT})
            if batch.changes:
                self.answered.set()
            self.after = batch.sequence

    def stop(self) -> None:
        self.stopping = True
        self.channel.nudge()
        self.thread.join(timeout=POLL_WAIT + 5)
        self.channel.close()


def commit_one(store: Path, n: int) -> None:
    conn = sqlite3.connect(store, timeout=5)
    with conn:
        conn.execute(
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, full_name) VALUES (?,?,?)",
            (DEVICE_JID, f"5599{n:09d}@s.whatsapp.net", "Bench"),
        )
    conn.close()


def measure(layout: str, stores: list[Path], root: Path) -> Row:
    shared = CaptureHost()
    channels = [
        MirrorProcess(s, f"s{n}", shared if layout == "shared" else CaptureHost()) for n, s in enumerate(stores)
    ]
    pollers = [Poller(c) for c in channels]
    try:
        pids = sorted({c.pid for c in channels if c.pid is not None})
        time.sleep(2.0)  # settled: every poll waiting
        cpu0, began = sum(cpu_seconds(p) for p in pids), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = (sum(cpu_seconds(p) for p in pids) - cpu0) / (time.monotonic() - began) * 100
        pss = sum(pss_kib(p) for p in pids) / 1024
        fd_counts = [descriptors(p, root / "sessions") for p in pids]
        wakes = []
        for n in range(0, len(stores), max(1, len(stores) // 10)):  # up to 10 stores, while the rest wait
            pollers[n].answered.clear()
            began = time.perf_counter()
            commit_one(stores[n], int(time.time() * 1000) % 10**9 + n)
            assert pollers[n].answered.wait(30), "a commit was never answered"
            wakes.append((time.perf_counter() - began) * 1000)
        return Row(
            layout,
            len(stores),
            len(pids),
            pss,
            sum(threads(p) for p in pids),
            sum(f for f, _ in fd_counts),
            sum(s for _, s in fd_counts),
            idle,
            statistics.median(wakes),
        )
    finally:
        for poller in pollers:
            poller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,50")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--layouts", default="per-store,shared")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    root = Path(tempfile.mkdtemp(prefix="zapkeep-bench-capture-"))
    try:
        stores = make_stores(root, max(counts), args.size)
        rows = [measure(layout, stores[:count], root) for count in counts for layout in args.layouts.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"store size: {args.size}; each store scanned once, then polled ({POLL_WAIT:.0f} s waits)")
    print(
        f"{'layout':<10} {'stores':>6} {'procs':>5} {'PSS MiB':>8} {'MiB/store':>9} {'threads':>7} "
        f"{'fds':>5} {'store fds':>9} {'idle CPU %':>10} {'wake ms':>8}"
    )
    for r in rows:
        print(
            f"{r.layout:<10} {r.stores:>6} {r.processes:>5} {r.pss_mib:>8.1f} {r.pss_mib / r.stores:>9.2f} "
            f"{r.threads:>7} {r.fds:>5} {r.store_fds:>9} {r.idle_cpu_pct:>10.2f} {r.wake_ms:>8.1f}"
        )


if __name__ == "__main__":
    main()
