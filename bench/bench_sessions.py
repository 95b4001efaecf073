"""Benchmark: what each WhatsApp number costs, 1, 10, 50 and 100 sessions side by side (issue 25).

    .venv/bin/python -m bench.bench_sessions [--sessions 1,10,50,100] [--create api|boot]
        [--baseline] [--postgres | --database-url URL] [--idle 20] [--settle 10]

Real daemons (``python -m bot``), a throw-away DATA_DIR, the embedded SQLite database (or a fresh
PostgreSQL database per row: ``--postgres`` starts a cluster of ``tests/pg_cluster.py``;
``--database-url`` names a server where its user may CREATE DATABASE). Every real neonize client
dials a loopback "proxy" of this script (``HTTPS_PROXY``) that accepts and never answers, so each
client sits in its dial: the resident cost of a live client. The proxy counts the connections it
holds: one per session proves every client is dialling.

Each row starts from nothing. Multi-session (the default): one daemon with ``SESSION_ID`` unset;
``--create api`` boots it (it creates ``default``) and creates the other N-1 with ``POST
/api/sessions``; ``--create boot`` registers s001..sNNN in the database (``register_session``)
before it boots. ``--baseline``: today's architecture, N daemons each with ``SESSION_ID=sNNN`` and
its own PORT on the same database (the embedded one: the same DATA_DIR), all spawned at once.

Measured over the whole process tree (the daemons and every descendant): PSS (sum of ``Pss`` of
``/proc/<pid>/smaps_rollup``), and per added session against the 1-session row; threads; open
descriptors; idle CPU (utime+stime over --idle seconds, --settle seconds after the boot, in % of
one core); the boot: from spawning the daemon(s) (``--create api``: from the first POST) until
every session is ``connecting``/``qr``/``reconnecting`` (or beyond), and until the proxy holds one
connection per session. whatsmeow gives a dial up after 60 s and dials again: the dials the proxy
accepted during the idle window are printed beside it (a re-dial's CPU is in the idle figure; a
live client would not re-dial). A second table says where the PSS goes (by process kind). Run on
demand, never part of the test suite; LOG_LEVEL=WARNING; every process it started is ended on
exit, Ctrl-C or SIGTERM (it makes itself a child subreaper, so a daemon's orphaned children stay
its own to end).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bot.process.config import Config
from database import Database, open_database
from tests.pg_cluster import PostgresCluster

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-sessions-token-0123456789abcdef"
STARTED = frozenset({"connecting", "qr", "reconnecting", "connected"})  # the client has been started
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE_SECONDS = 30.0
HTTP_TIMEOUT = 30.0
# Whatever the shell holds, the daemons get exactly these (a stray one would change what is measured).
CLEARED = ("SESSION_ID", "PAIR_PHONE", "WEBHOOK_URL", "SESSION_ENCRYPTION_KEY", "SESSION_ENCRYPTION_KEY_OLD")
CLEARED_PROXIES = ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")
NO_SESSIONS_API = (
    "this tree's daemon has no sessions API (issue 25's multi-session daemon is not in it); "
    "--baseline measures today's architecture"
)


class BenchError(Exception):
    """A row could not be measured: printed in one line, everything stopped."""


class DaemonExited(BenchError):
    """A daemon ended by itself: its log's last lines say why."""


# --- the proxy ---------------------------------------------------------------------------------------


class HoldingProxy:
    """A loopback "HTTPS proxy" that accepts every connection, reads what it is sent (the client's
    CONNECT) and never answers: each client waits in its dial, connected to nothing."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._held = 0
        self._accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holding-proxy", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        """(connections held now, connections accepted in all)."""
        with self._lock:
            return self._held, self._accepted

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._listener:
                    self._accept()
                else:
                    self._read(sock)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._selector.register(conn, selectors.EVENT_READ)
        with self._lock:
            self._held += 1
            self._accepted += 1

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client gave up (or was stopped)
            self._selector.unregister(conn)
            conn.close()
            with self._lock:
                self._held -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


# --- the process tree --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    started: int  # start time in clock ticks since boot: with the pid, who it is (pids are reused)
    ticks: int  # utime + stime + cutime + cstime (reaped children's CPU lands in cutime/cstime)
    threads: int


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 of proc(5): state 3, ppid 4, utime..cstime 14-17, num_threads 20, starttime 22.
    return Proc(
        pid=pid,
        ppid=int(fields[1]),
        state=fields[0],
        started=int(fields[19]),
        ticks=sum(int(v) for v in fields[11:15]),
        threads=int(fields[17]),
    )


def all_processes() -> dict[int, Proc]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                found[proc.pid] = proc
    return found


def tree(roots: list[int]) -> list[Proc]:
    """The roots and every living descendant (zombies left out: they hold no memory)."""
    procs = all_processes()
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: list[Proc] = []
    todo = [pid for pid in roots if pid in procs]
    while todo:
        pid = todo.pop()
        if procs[pid].state != "Z":
            found.append(procs[pid])
        todo.extend(children.get(pid, []))
    return found


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith("Pss:")), 0)
    except OSError:  # it ended meanwhile
        return 0


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def kind(pid: int, roots: set[int]) -> str:
    """What a process of the tree is: the daemon, or the module a child runs (``-m module``)."""
    if pid in roots:
        return "daemon (python -m bot)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return "?"
    if b"-m" in argv[:-1]:
        return argv[argv.index(b"-m") + 1].decode(errors="replace")
    return Path(argv[0].decode(errors="replace")).name or "?"


@dataclass(frozen=True)
class Footprint:
    processes: int
    pss_kb: int
    threads: int
    descriptors: int
    by_kind: dict[str, tuple[int, int]]  # kind -> (processes, PSS KB)


def footprint(roots: list[int]) -> Footprint:
    procs = tree(roots)
    by_kind: dict[str, tuple[int, int]] = {}
    total = 0
    for proc in procs:
        pss = pss_kb(proc.pid)
        total += pss
        name = kind(proc.pid, set(roots))
        count, kb = by_kind.get(name, (0, 0))
        by_kind[name] = (count + 1, kb + pss)
    return Footprint(len(procs), total, sum(p.threads for p in procs), sum(descriptors(p.pid) for p in procs), by_kind)


def idle_cpu_percent(roots: list[int], seconds: float) -> float:
    """CPU of the tree over ``seconds``, in % of one core. A process that ends meanwhile is counted
    through its parent's cutime/cstime once reaped (a child started meanwhile: all its ticks)."""
    before = {(p.pid, p.started): p.ticks for p in tree(roots)}
    started = time.monotonic()
    time.sleep(seconds)
    after = tree(roots)
    elapsed = time.monotonic() - started
    ticks = sum(p.ticks - before.get((p.pid, p.started), 0) for p in after)
    return ticks / CLOCK_TICKS / elapsed * 100


# --- processes: start, stop, clean up ----------------------------------------------------------------


def become_subreaper() -> None:
    """Orphans of the daemons (a child left by a daemon that was killed) become this process's
    children, so the final sweep finds and ends them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("warning: not a child subreaper; a killed daemon's children may outlive the bench", file=sys.stderr)


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # Its own session: a Ctrl-C in the terminal reaches this script, which stops it in order.
        return subprocess.Popen(
            [sys.executable, "-m", "bot"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def alive(proc: Proc) -> bool:
    now = read_proc(proc.pid)
    return now is not None and now.started == proc.started and now.state != "Z"


def stop_all(daemons: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL for every process of their trees still there."""
    members = tree([d.pid for d in daemons])
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for daemon in daemons:
        try:
            daemon.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in members:
        if alive(proc):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait(timeout=10)
    # A daemon killed above left the children it started meanwhile to this process (a subreaper).
    me = os.getpid()
    for proc in tree([me]):
        if proc.pid != me and kind(proc.pid, set()).startswith("bot."):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.2)
    reap_orphans()


def reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep() -> None:
    """The last resort on the way out: every process still under this one is killed and reaped."""
    for proc in tree([os.getpid()]):
        if proc.pid != os.getpid():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(tree([os.getpid()])) > 1:
        reap_orphans()
        time.sleep(0.05)
    reap_orphans()


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the bench as Ctrl-C does: through its clean-up


def listen_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range: a port picked by binding to 0 is ephemeral, and with
    many daemons dialling at once one of their outgoing sockets can take it before its daemon listens."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        ephemeral = int(handle.read().split()[0])
    start = random.randrange(max(1024, ephemeral - 12000), ephemeral - 2000)
    found: list[int] = []
    for port in range(start, ephemeral):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise BenchError(f"no {count} free ports between {start} and {ephemeral}")


# --- HTTP --------------------------------------------------------------------------------------------


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")[:200]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class SessionStates:
    """Session id -> state, from GET /api/sessions of the multi-session daemon. In a tree whose
    daemon hosts many sessions but has no sessions API yet, from the overview that route answers
    with, read from the database (``Database.session_overview``)."""

    def __init__(self, port: int, data_dir: Path, database_url: str | None) -> None:
        self._port = port
        self._data_dir = data_dir
        self._database_url = database_url
        self._db: Database | None = None

    @property
    def from_database(self) -> bool:
        return self._db is not None

    def __call__(self) -> dict[str, str]:
        if self._db is not None:
            return {o.session_id: o.state for o in self._db.session_overview()}  # type: ignore[attr-defined]
        status, body = call(self._port, "GET", "/api/sessions")
        if status in (404, 405):
            if not hasattr(Database, "session_overview"):
                raise BenchError(f"GET /api/sessions answered {status}: {NO_SESSIONS_API}")
            self._db = open_bench_database(self._data_dir, self._database_url)
            return self()
        if status != 200:
            raise BenchError(f"GET /api/sessions answered {status}: {body}")
        sessions = body["sessions"] if isinstance(body, dict) else body
        return {s["session_id"]: s["state"] for s in sessions}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def own_state(port: int, session_id: str) -> str:
    """GET /api/session/status of one of today's daemons: its own session's state."""
    try:
        status, body = call(port, "GET", f"/api/session/status?session_id={session_id}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return "unreachable"
    return str(body["session"]["state"]) if status == 200 else f"HTTP {status}"


# --- one row -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    sessions: int
    footprint: Footprint
    idle_cpu: float
    to_started: float  # seconds until every session was started (connecting or beyond)
    to_dialling: float | None  # ... until the proxy held one connection per session (None: never)
    held: int  # connections the proxy held after the idle window
    accepted: int  # connections it accepted in all (more than held: clients dialled again)
    redials: int  # connections it accepted during the idle window (their CPU is in the idle figure)
    states_from_database: bool  # no GET /api/sessions: the states were read from the database's overview


@dataclass
class Setup:
    args: argparse.Namespace
    work: Path
    database_url: Callable[[], str | None]  # a fresh database for each row (None: the embedded one)
    drop_database: Callable[[str | None], None]


def session_ids(count: int) -> list[str]:
    return [f"s{n:03d}" for n in range(1, count + 1)]


def daemon_env(data_dir: Path, database_url: str | None, port: int, proxy: int, sessions: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in CLEARED + CLEARED_PROXIES}
    env.update(
        {
            "HTTPS_PROXY": f"http://127.0.0.1:{proxy}",
            "https_proxy": f"http://127.0.0.1:{proxy}",
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url or "",  # empty: the embedded SQLite database, whatever .env says
            "PORT": str(port),
            "API_TOKEN": TOKEN,
            "LOG_LEVEL": "WARNING",
            **{name: "" for name in CLEARED},
        }
    )
    if sessions > 100:
        env["MAX_SESSIONS"] = str(sessions)  # (the default is 100)
    return env


def wait_for(
    what: str, done: Callable[[], bool], timeout: float, watch: list[subprocess.Popen[bytes]], logs: list[Path]
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        for daemon, log in zip(watch, logs, strict=True):
            if daemon.poll() is not None:
                raise DaemonExited(f"a daemon exited ({daemon.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f} s:\n{tail(logs[0])}")
        time.sleep(0.25)


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def open_bench_database(data_dir: Path, database_url: str | None) -> Database:
    """The daemon's database (its embedded one in ``data_dir`` when there is no URL)."""
    config = Config.from_env({"DATA_DIR": str(data_dir), "DATABASE_URL": database_url or ""})
    return open_database(database_url, config.embedded_database_path)


def register_sessions(data_dir: Path, database_url: str | None, ids: list[str]) -> None:
    """--create boot: the sessions exist in the database before the daemon boots."""
    db = open_bench_database(data_dir, database_url)
    try:
        for session_id in ids:
            db.register_session(session_id)  # type: ignore[attr-defined]  # (issue 25's storage piece)
    finally:
        db.close()


def measure(setup: Setup, count: int) -> Row:
    args = setup.args
    row_dir = setup.work / f"row-{count}"
    row_dir.mkdir()
    database_url = setup.database_url()
    proxy = HoldingProxy()
    daemons: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    closing: list[Callable[[], None]] = []
    states: SessionStates | None = None
    try:
        ids = session_ids(count)
        if args.baseline:
            # Today's architecture: one daemon per number. The embedded database lives in DATA_DIR,
            # so they share one; on PostgreSQL each has its own DATA_DIR (its own container).
            ports = listen_ports(len(ids))
            begun = time.monotonic()
            for session_id, port in zip(ids, ports, strict=True):
                data_dir = row_dir / ("data" if database_url is None else session_id)
                data_dir.mkdir(exist_ok=True)
                env = daemon_env(data_dir, database_url, port, proxy.port, count)
                env["SESSION_ID"] = session_id
                logs.append(row_dir / f"{session_id}.log")
                daemons.append(spawn(env, logs[-1]))
            waiting = dict(zip(ids, ports, strict=True))

            def all_started() -> bool:
                for session_id, port in list(waiting.items()):
                    if own_state(port, session_id) in STARTED:
                        del waiting[session_id]
                return not waiting

        else:
            port = listen_ports(1)[0]
            data_dir = row_dir / "data"
            data_dir.mkdir()
            if args.create == "boot":
                register_sessions(data_dir, database_url, ids)
            else:
                ids = ["default", *ids[1:]]  # the first boot creates "default"; the API the others
            logs.append(row_dir / "daemon.log")
            states = SessionStates(port, data_dir, database_url)
            closing.append(states.close)
            begun = time.monotonic()
            daemons.append(spawn(daemon_env(data_dir, database_url, port, proxy.port, count), logs[0]))
            if args.create == "api":
                first = lambda: healthy(port) and states().get("default") in STARTED  # noqa: E731
                wait_for("the daemon's first session started", first, args.boot_timeout, daemons, logs)
                begun = time.monotonic()
                for session_id in ids[1:]:
                    status, body = call(port, "POST", "/api/sessions", {"session_id": session_id})
                    if status in (404, 405):
                        raise BenchError(f"POST /api/sessions answered {status}: {NO_SESSIONS_API}")
                    if status != 201:
                        raise BenchError(f"POST /api/sessions {session_id} answered {status}: {body}")

            def all_started() -> bool:
                if not healthy(port):
                    return False
                now = states()
                return all(now.get(session_id) in STARTED for session_id in ids)

        dialling: list[float] = []

        def done() -> bool:
            if not dialling and proxy.counts()[0] >= count:
                dialling.append(time.monotonic() - begun)
            return all_started()

        wait_for(f"{count} sessions started", done, args.boot_timeout, daemons, logs)
        to_started = time.monotonic() - begun
        try:
            wait_for(
                f"{count} connections at the proxy", lambda: done() and bool(dialling), args.dial_timeout, daemons, logs
            )
        except DaemonExited:
            raise
        except BenchError:
            pass  # printed as "-": not every client dialled
        time.sleep(args.settle)  # the boot's own work is not idle
        roots = [d.pid for d in daemons]
        accepted_before = proxy.counts()[1]
        cpu = idle_cpu_percent(roots, args.idle)
        held, accepted = proxy.counts()
        return Row(
            count,
            footprint(roots),
            cpu,
            to_started,
            dialling[0] if dialling else None,
            held,
            accepted,
            accepted - accepted_before,
            states is not None and states.from_database,
        )
    finally:
        for close in closing:
            close()
        stop_all(daemons)
        proxy.close()
        setup.drop_database(database_url)


# --- the table ---------------------------------------------------------------------------------------


def mb(kb: float) -> str:
    return f"{kb / 1024:,.1f}"


def print_tables(rows: list[Row], heading: str) -> None:
    print(heading)
    base = next((r for r in rows if r.sessions == 1), None)
    head = (
        f"{'sessions':>8} | {'procs':>5} | {'PSS MB':>8} | {'+MB/session':>11} | {'threads':>7} | {'fds':>5} | "
        f"{'idle CPU %':>10} | {'redials':>7} | {'started s':>9} | {'dialling s':>10} | {'proxy held/accepted':>19}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        f = row.footprint
        added = (
            mb((f.pss_kb - base.footprint.pss_kb) / (row.sessions - 1))
            if base is not None and row.sessions > 1
            else "-"
        )
        dialling = "-" if row.to_dialling is None else f"{row.to_dialling:.1f}"
        print(
            f"{row.sessions:>8} | {f.processes:>5} | {mb(f.pss_kb):>8} | {added:>11} | {f.threads:>7} | "
            f"{f.descriptors:>5} | {row.idle_cpu:>10.1f} | {row.redials:>7} | {row.to_started:>9.1f} | {dialling:>10} | "
            f"{f'{row.held}/{row.accepted}':>19}"
        )
    if any(row.states_from_database for row in rows):
        print("(states read from the database's session overview: this tree's daemon has no GET /api/sessions)")
    kinds = sorted({k for row in rows for k in row.footprint.by_kind}, key=lambda k: (not k.startswith("daemon"), k))
    print("\nwhere the PSS goes: processes x MB in all")
    print(f"{'process':<32} | " + " | ".join(f"{row.sessions:>14}" for row in rows))
    for name in kinds:
        cells = []
        for row in rows:
            count, kb = row.footprint.by_kind.get(name, (0, 0))
            cells.append(f"{count:>3} x {mb(kb):>8}" if count else f"{'-':>14}")
        print(f"{name[:32]:<32} | " + " | ".join(cells))


# --- main --------------------------------------------------------------------------------------------


@contextmanager
def databases(args: argparse.Namespace) -> Iterator[tuple[Callable[[], str | None], Callable[[str | None], None], str]]:
    """(a fresh database for a row, drop it, its name for the heading)."""
    if not args.postgres and args.database_url is None:
        yield (lambda: None), (lambda url: None), "embedded SQLite"
        return
    import psycopg

    cluster = PostgresCluster().start() if args.database_url is None else None
    server = cluster.url() if cluster is not None else args.database_url
    admin = psycopg.connect(server, autocommit=True)

    def fresh() -> str:
        name = f"zapkeep_bench_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')  # the name is ours
        return _with_db(server, name)

    def drop(url: str | None) -> None:
        if url is not None:
            name = url.rsplit("/", 1)[1].split("?", 1)[0]
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        yield fresh, drop, "PostgreSQL (a throw-away cluster)" if cluster is not None else "PostgreSQL (--database-url)"
    finally:
        admin.close()
        if cluster is not None:
            cluster.stop()


def _with_db(url: str, name: str) -> str:
    """The same server URL with another database name (query kept)."""
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,10,50,100", help="session counts, one row each (default 1,10,50,100)")
    parser.add_argument(
        "--create",
        choices=("api", "boot"),
        default="api",
        help="api: POST /api/sessions after the boot; boot: registered in the database before it",
    )
    parser.add_argument("--baseline", action="store_true", help="today's architecture: one daemon per session")
    parser.add_argument(
        "--postgres", action="store_true", help="a throw-away PostgreSQL cluster, a fresh database a row"
    )
    parser.add_argument(
        "--database-url", help="a PostgreSQL server whose user may CREATE DATABASE (one a row, dropped after)"
    )
    parser.add_argument("--idle", type=float, default=20.0, help="seconds over which idle CPU is measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the boot before measuring")
    parser.add_argument("--boot-timeout", type=float, default=300.0, help="give up on a row after this long")
    parser.add_argument(
        "--dial-timeout",
        type=float,
        default=30.0,
        help="after every session started, how long to wait for one connection each at the proxy",
    )
    args = parser.parse_args()
    try:
        args.counts = [int(n) for n in args.sessions.split(",") if n.strip()]
    except ValueError:
        parser.error("--sessions must be numbers separated by commas, e.g. 1,10")
    if not args.counts or min(args.counts) < 1 or max(args.counts) > 999:
        parser.error("--sessions must hold counts between 1 and 999")
    if args.database_url is not None and not args.database_url.startswith(("postgres://", "postgresql://")):
        parser.error("--database-url must be a postgresql:// URL")
    if not args.baseline and args.create == "boot" and not hasattr(Database, "register_session"):
        parser.error(
            "--create boot needs Database.register_session (issue 25's session registry), not in this tree yet; "
            "use --create api, or --baseline for today's architecture"
        )
    return args


def main() -> int:
    args = parse_args()
    become_subreaper()
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)  # also when started with SIGINT ignored (a background job)
    work = Path(tempfile.mkdtemp(prefix="zapkeep-bench-sessions-"))
    rows: list[Row] = []
    code = 0
    try:
        with databases(args) as (fresh, drop, database_name):
            setup = Setup(args, work, fresh, drop)
            for count in args.counts:
                print(f"... {count} session(s)", file=sys.stderr, flush=True)
                rows.append(measure(setup, count))
    except BenchError as exc:
        print(f"bench_sessions: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench_sessions: interrupted; stopping everything it started", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up is not interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sweep()
        shutil.rmtree(work, ignore_errors=True)
    if rows:
        how = (
            "today's architecture: one daemon per session (SESSION_ID=sNNN), all spawned at once; started s: from the spawn"
            if args.baseline
            else (
                "one daemon, SESSION_ID unset; "
                + (
                    "default + N-1 created with POST /api/sessions; started s: from the first POST"
                    if args.create == "api"
                    else "s001..sNNN registered before the boot; started s: from the spawn"
                )
            )
        )
        print_tables(
            rows,
            f"{how}\n{database_name}; every client dialling a loopback proxy that never answers; "
            f"idle CPU over {args.idle:.0f} s, {args.settle:.0f} s after the boot (% of one core); redials: dials the "
            "proxy accepted meanwhile (whatsmeow gives a dial up after 60 s and dials again: their CPU is in it)\n",
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
