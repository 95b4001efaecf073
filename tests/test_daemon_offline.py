"""The daemon with the real neonize library, offline (connect() fails at a closed loopback proxy)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bot.connection.client_process import STOP_GRACE_SECONDS
from bot.session.persistence import sync_session
from database import PostgresDatabase
from tests.fake_whatsapp import wait_until
from tests.pg_cluster import free_port
from tests.synthetic import DEVICE_JID, PUSH_NAME, create_paired_store, neonize, table_rows

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
# A signal may land while the first client process is still starting (importing neonize): the
# daemon gives it STOP_GRACE_SECONDS to end its round, then kills it. The rest of the shutdown
# (the scheduler, the mirror's last read, the final backup, the lease) is quick; this is its room
# on a loaded machine.
SHUTDOWN_MARGIN_SECONDS = 15.0
# Longer than any wait below: a session stored within one was stored at boot, not by the interval's backup.
NO_INTERVAL_BACKUP = {"BACKUP_INTERVAL_SECONDS": "3600"}


def test_restored_paired_store_reconnects_with_capped_backoff_and_never_shows_a_qr(
    database_url: str, tmp_path: Path
) -> None:
    seed = tmp_path / "seed" / "whatsmeow.sqlite3"
    create_paired_store(seed)
    db = PostgresDatabase(database_url)
    db.open()
    assert sync_session(db, "default", seed).written_rows > 0
    db.close()

    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "offline_runtime.py"), str(tmp_path / "data"), database_url, "600"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **OFFLINE_ENV},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["finished"] and report["simulated_seconds"] >= 600
    assert report["states"] == ["reconnecting"]
    assert report["jid"] == DEVICE_JID  # restored from the database before neonize opened the store
    # Never a QR: whatsmeow itself finds the device in the store it ran on, so it logs in rather than
    # pairs. (Offline no QR can come from the servers at all, so "none was seen" alone proved nothing:
    # an unpaired daemon sees none either.)
    store = tmp_path / "data" / "sessions" / "default" / "whatsmeow.sqlite3"
    assert neonize("devices", store) == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    delays = report["delays"]
    assert all(later >= earlier / 2 for earlier, later in itertools.pairwise(delays))  # jitter never undoes growth
    assert max(delays) <= 60 and min(delays[8:]) >= 30  # capped at 60 s, jitter at most halves it
    assert delays[0] <= 1.0 and delays[5] > delays[0] * 4
    assert report["reconnect_count"] == len(delays)
    assert "proxyconnect tcp: dial tcp 127.0.0.1:9" in report["last_error"]
    assert report["supervisor_alive"]


def _start_daemon(data_dir: Path, database_url: str, port: int, **extra_env: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "PORT": str(port),
        "API_TOKEN": "daemon-test-token-123456",
        **extra_env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bot"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=STOP_GRACE_SECONDS + SHUTDOWN_MARGIN_SECONDS)
    return process.returncode, output


def test_daemon_backs_up_a_local_store_then_rebuilds_it_after_data_dir_is_lost(
    database_url: str, tmp_path: Path, processes: list
) -> None:
    data_dir = tmp_path / "data"
    store = data_dir / "sessions" / "default" / "whatsmeow.sqlite3"
    create_paired_store(store)
    original = table_rows(store)
    db = PostgresDatabase(database_url)
    db.open()
    try:
        daemon = _start_daemon(data_dir, database_url, free_port(), **NO_INTERVAL_BACKUP)
        processes.append(daemon)
        wait_until(
            lambda: db.load_session("default") is not None, timeout=60, message="the session in the DB (at boot)"
        )
        code, output = _stop(daemon)
        assert code == 0, output[-3000:]
        assert "stopped cleanly" in output

        import shutil

        shutil.rmtree(data_dir)
        daemon = _start_daemon(data_dir, database_url, free_port())
        processes.append(daemon)
        wait_until(store.exists, timeout=20, message="the store rebuilt")
        wait_until(
            lambda: "restored session default" in (daemon.stdout.readline() or ""),
            timeout=20,
            message="the restore log line",
        )
        code, output = _stop(daemon)
        assert code == 0, output[-3000:]
    finally:
        db.close()

    assert table_rows(store) == original
    assert neonize("devices", store) == [{"jid": DEVICE_JID, "push_name": PUSH_NAME}]
    assert store.stat().st_mode & 0o777 == 0o600


def test_bad_configuration_fails_at_boot_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    for variable, value in [
        ("SESSION_ID", "../../etc"),
        ("PORT", "http"),
        ("BACKUP_INTERVAL_SECONDS", "0"),
        ("DATABASE_URL", "mysql://x"),
        ("LOG_LEVEL", "LOUD"),
        ("PAIR_PHONE", "12ab"),
        ("TRUST_PROXY", "yes please"),
        ("MAX_SESSIONS", "0"),
    ]:
        env = {**os.environ, **OFFLINE_ENV, "DATA_DIR": str(tmp_path), variable: value}
        result = subprocess.run(
            [sys.executable, "-m", "bot"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], result.stderr
    assert not (tmp_path / "sessions").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_daemon_within_seconds(tmp_path: Path, signum: int, processes: list) -> None:
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "DATA_DIR": str(tmp_path), "PORT": str(port)}
    env.pop("DATABASE_URL", None)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bot"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    processes.append(daemon)
    wait_until(lambda: _healthy(port), timeout=20, message="healthz")
    bound = STOP_GRACE_SECONDS + SHUTDOWN_MARGIN_SECONDS  # stops within seconds: never hangs on a client
    daemon.send_signal(signum)
    try:
        output, _ = daemon.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon was still running {bound:.0f} s after {signal.Signals(signum).name}")
    assert daemon.returncode == 0, output[-2000:]
    assert "API_TOKEN is not set; generated one" in output  # never an open API


def test_with_trust_proxy_the_console_cookie_is_secure_behind_the_platforms_tls_proxy(
    tmp_path: Path, processes: list
) -> None:
    """As on Railway: the proxy ends TLS and says so in X-Forwarded-Proto, and appends the client's address."""
    import http.client

    port = free_port()
    token = "daemon-test-token-123456"
    env = {**os.environ, **OFFLINE_ENV, "DATA_DIR": str(tmp_path), "PORT": str(port), "API_TOKEN": token}
    env.pop("DATABASE_URL", None)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bot"],
        cwd=ROOT,
        env={**env, "TRUST_PROXY": "true"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    processes.append(daemon)
    wait_until(lambda: _healthy(port), timeout=20, message="healthz")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/console/sign-in",
            body=f"csrf_token=t0ken&password={token}",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": "zapkeep_sign_in=t0ken",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-For": "203.0.113.9",
            },
        )
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    code, output = _stop(daemon)
    assert response.status == 303, output[-2000:]
    (session_cookie,) = [v for n, v in response.getheaders() if n == "Set-Cookie" and v.startswith("zapkeep_console=")]
    assert "; Secure" in session_cookie and "; HttpOnly" in session_cookie
    assert code == 0 and "POST /console/sign-in 303" in output and "203.0.113.9" in output, output[-2000:]


def _read_output(process: subprocess.Popen[str]) -> tuple[list[str], threading.Thread]:
    """The process's output lines as they come (read by a thread of their own until it ends)."""
    lines: list[str] = []

    def read() -> None:
        try:
            for line in process.stdout:
                lines.append(line)
        except (OSError, ValueError):  # closed by the clean-up of a failed test
            pass

    reader = threading.Thread(target=read, name="daemon-output", daemon=True)
    reader.start()
    return lines, reader


def _healthy(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def test_a_second_signal_never_skips_the_final_backup_and_the_lease_release(
    database_url: str, tmp_path: Path, processes: list
) -> None:
    data_dir = tmp_path / "data"
    create_paired_store(data_dir / "sessions" / "default" / "whatsmeow.sqlite3")
    db = PostgresDatabase(database_url)
    db.open()
    try:
        daemon = _start_daemon(data_dir, database_url, free_port())
        processes.append(daemon)
        lines, reader = _read_output(daemon)
        wait_until(lambda: db.load_session("default") is not None, timeout=60, message="the session in the DB")
        with db.transaction() as tx:
            # The lease row held: the daemon cannot release the lease, so cannot finish its
            # shutdown, before every signal has landed in it.
            tx.execute("SELECT 1 FROM whatsapp_session_leases WHERE session_id = %s FOR UPDATE", ("default",))
            for n in range(1, 4):  # what `timeout`, `docker stop` and an impatient operator send
                daemon.send_signal(signal.SIGTERM)
                # The next one only once the daemon's handler ran: two pending signals are one.
                wait_until(
                    lambda: sum("received SIGTERM" in line for line in lines) >= n,
                    timeout=30,
                    message=f"SIGTERM #{n} handled",
                )
        code = daemon.wait(timeout=60)
        reader.join(timeout=10)
        output = "".join(lines)
        assert code == 0, output[-3000:]
        assert sum("received SIGTERM again" in line for line in lines) == 2, output[-3000:]
        assert "stopped cleanly" in output
        lease = db.lease("default")
        assert lease is not None and lease.owner_id is None  # released: the next start takes over at once
    finally:
        db.close()
