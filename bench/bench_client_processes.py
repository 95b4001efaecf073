"""Benchmark: the memory of live neonize clients, one client process for every round vs one per round
(issue 25, item 2).

    .venv/bin/python -m bench.bench_client_processes [--rounds 1 10 20 100] [--settle 5] [--per-round-up-to 20]

Each round is the real client (``bot.connection.client_process`` running neonize) on a fresh store,
dialling WhatsApp through a loopback proxy that accepts and never answers (``HTTPS_PROXY``): the
resident cost of a live client, nothing leaving the machine. Once every round's dial has reached the
proxy (and ``--settle`` seconds more), PSS is summed from ``/proc/<pid>/smaps_rollup`` over this
process (the daemon's side of the rounds) and every client process. Side by side: the client
processes as they are (``ClientProcesses``: one process, many clients, one Go runtime) and as they
were (a process per round: ``rounds_per_child=1``; only up to ``--per-round-up-to`` rounds, as 100
would take ~4 GB). Idle CPU: the tree's CPU time over the settle pause, in % of one core. Run on
demand; it prints one table.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bot.connection.client_process import ClientProcesses
from tests.fake_whatsapp import wait_until


def black_hole() -> tuple[str, list[socket.socket]]:
    """A loopback proxy that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=256)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", accepted


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(rounds: int, per_round: bool, scratch: Path, accepted: list[socket.socket], settle: float) -> dict:
    processes = ClientProcesses(logging.ERROR, rounds_per_child=1 if per_round else 200)
    clients = []
    before = len(accepted)
    try:
        for n in range(rounds):
            client = processes(scratch / f"{'p' if per_round else 's'}{rounds}-{n}.sqlite3", lambda event: None)
            threading.Thread(target=client.run, daemon=True).start()
            clients.append(client)
        wait_until(lambda: len(accepted) - before >= rounds, timeout=120, message="every round dialling")
        children = processes.pids()
        tree = [os.getpid(), *children]
        cpu = sum(cpu_seconds(pid) for pid in tree)
        time.sleep(settle)  # (a measurement's pause, not a test's)
        return {
            "cpu": (sum(cpu_seconds(pid) for pid in tree) - cpu) / settle * 100,
            "pss": sum(pss_kb(pid) for pid in tree) / 1024,
            "daemon": pss_kb(os.getpid()) / 1024,
            "processes": len(children),
            "threads": sum(threads(pid) for pid in tree),
        }
    finally:
        processes.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_client_processes")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10, 20, 100])
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--per-round-up-to", type=int, default=20)
    args = parser.parse_args()
    proxy, accepted = black_hole()
    os.environ["HTTPS_PROXY"] = proxy  # read by each client process's Go runtime when it starts
    print("live rounds dialling a loopback proxy that never answers; PSS over this process + its client processes")
    print(
        f"{'layout':<22} {'rounds':>6} {'PSS MB':>8} {'daemon MB':>10} {'per added':>10} {'procs':>6} "
        f"{'threads':>8} {'idle CPU %':>10}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as scratch:
        for per_round, layout in ((False, "one client process"), (True, "a process per round")):
            first: tuple[int, float] | None = None
            for rounds in args.rounds:
                if per_round and rounds > args.per_round_up_to:
                    continue
                found = measure(rounds, per_round, Path(scratch), accepted, args.settle)
                added = "" if first is None else f"{(found['pss'] - first[1]) / (rounds - first[0]):.1f}"
                first = first or (rounds, found["pss"])
                print(
                    f"{layout:<22} {rounds:>6} {found['pss']:>8.1f} {found['daemon']:>10.1f} {added:>10} "
                    f"{found['processes']:>6} {found['threads']:>8} {found['cpu']:>10.1f}",
                    flush=True,
                )
    assert "neonize" not in sys.modules, "the benchmark imported neonize"
    return 0


if __name__ == "__main__":
    sys.exit(main())
