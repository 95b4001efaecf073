"""What a deploy needs from the platform: libmagic in the image, or one clear line without it."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import bot
from tests.fake_whatsapp import wait_until
from tests.redeploy import TOKEN, Daemon

ROOT = Path(__file__).resolve().parent.parent


def _libmagic_files() -> list[Path]:
    """Every file the dynamic loader could take for libmagic (the real file behind the symlinks)."""
    found = {Path(p).resolve() for p in Path("/").glob("usr/lib/*/libmagic.so*")}
    found |= {Path(p).resolve() for p in Path("/").glob("lib/*/libmagic.so*")}
    return sorted(p for p in found if p.is_file())


def test_the_daemon_without_libmagic_exits_with_one_line_naming_the_package(tmp_path: Path) -> None:
    libraries = _libmagic_files()
    if os.geteuid() != 0 or shutil.which("unshare") is None or not libraries:
        pytest.skip("hiding libmagic needs root and unshare(1) (a private mount namespace)")
    assert ctypes.util.find_library("magic")  # present on this machine: the test hides it
    hide = " && ".join(f"mount --bind /dev/null {library}" for library in libraries)
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'{hide} && exec "$0" -m bot', sys.executable],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and "libmagic1" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_railpack_installs_libmagic_in_the_runtime_image() -> None:
    config = json.loads((ROOT / "railpack.json").read_text())
    assert config["deploy"]["aptPackages"] == ["libmagic1t64"]  # its name on Railpack's Debian (trixie)
    railway = tomllib.loads((ROOT / "railway.toml").read_text())
    assert railway["build"]["builder"] == "RAILPACK"  # also with a Dockerfile in the root


def test_json_logs_parse_carry_the_session_and_the_access_log_names_no_token(database_url: str, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "daemon", database_url, env={"LOG_FORMAT": "json"})
    try:
        daemon.start()
        wait_until(lambda: daemon.status()["owns_session"], timeout=30, message="the daemon owns the session")
        wrong = urllib.request.Request(
            f"http://127.0.0.1:{daemon.port}/api/session/status", headers={"Authorization": "Bearer not-the-token-42"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=10)
        assert refused.value.code == 401
        refused.value.close()
        assert daemon.terminate() == 0
    finally:
        daemon.stop_if_running()
    lines = daemon.log().splitlines()
    # (Go's own prints in the client process cannot be JSON; every line Python logs is.)
    assert not [line for line in lines if PYTHON_TEXT_LINE.match(line)]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) > 10
    for record in records:
        assert {"time", "level", "logger", "message", "session_id", "state"} <= set(record), record
        assert OFFSET.search(record["time"]), record["time"]
    daemon_records = [r for r in records if r["logger"].startswith("bot.runtime")]
    assert daemon_records and all(r["session_id"] == "default" and r["state"] for r in daemon_records)
    access = {(r["method"], r["route"], r["status"]) for r in records if r["logger"] == "session_api.access"}
    assert ("GET", "/api/session/status", 200) in access and ("GET", "/api/session/status", 401) in access
    assert all(isinstance(r["duration_ms"], float) and r["client"] == "127.0.0.1" for r in records if "route" in r)
    assert TOKEN not in daemon.log() and "not-the-token-42" not in daemon.log()


PYTHON_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S* (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
OFFSET = re.compile(r"T\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def test_pip_install_gives_a_working_zapkeep_command(tmp_path: Path) -> None:
    source = tmp_path / "source"  # (a build writes into its source tree: never into the repository)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "data", "__pycache__", ".*cache*"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The dependencies are this run's own (installing them again would need the network); so are
    # setuptools and wheel, the build's (requirements-dev.txt).
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zapkeep-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # (setuptools and wheel are the test environment's: no index is needed)
    installed = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env |= {"DATA_DIR": str(tmp_path / "data"), "HTTPS_PROXY": "http://127.0.0.1:9"}

    def zapkeep(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [venv / "bin" / "zapkeep", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    version = zapkeep("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"zapkeep {bot.__version__}", version.stderr
    assert "DATABASE_URL" in zapkeep("export", "--help").stdout and "SESSION_ID" in zapkeep("status", "--help").stdout
    status = zapkeep("status")  # the installed modules, the embedded database, no source tree
    assert status.returncode == 0 and json.loads(status.stdout)["sessions"] == [], status.stderr[-2000:]

    def installed_python(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [venv / "bin" / "python", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    licence = installed_python("from importlib.metadata import metadata; print(metadata('zapkeep')['License'])")
    assert licence.stdout.strip() == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")

    rules = installed_python(
        "from bot.messages import rules; from bot.process import config; from bot.session import store_schema as s; "
        "print(config.SHIPPED_REPLIES, rules.load_rules(config.SHIPPED_REPLIES).business, s.whatsmeow_schema().version)"
    )
    assert rules.returncode == 0 and str(site) in rules.stdout and " 15" in rules.stdout, rules.stderr[-2000:]
    console = installed_python(  # the web console's pages and script travel with the package
        "import pathlib, session_api; p = pathlib.Path(session_api.__file__).parent; "
        "print(all((p / f).is_file() for f in ('templates/console/session.html', 'static/console.js', 'static/console.css')))"
    )
    assert console.stdout.strip() == "True", console.stderr[-2000:]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continued lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def test_the_container_image_runs_the_daemon_unprivileged_with_signals_and_a_health_check() -> None:
    """No container engine runs on the test machines (the Docker client has no daemon): the
    Dockerfile is checked for what the daemon relies on."""
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in instructions:
        by_keyword.setdefault(keyword, []).append(arguments)
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+", by_keyword["FROM"][0])
    assert any("apt-get install" in run and "libmagic1" in run for run in by_keyword["RUN"])
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["python", "-m", "bot"]  # exec form: signals reach Python
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert by_keyword["USER"][-1] not in ("root", "0")
    assert "/healthz" in by_keyword["HEALTHCHECK"][-1] and "CMD [" in by_keyword["HEALTHCHECK"][-1]
    assert "VOLUME" not in by_keyword  # Railway's Dockerfile builder refuses it ("use Railway Volumes")
    assert "DATA_DIR=/data" in by_keyword["ENV"][-1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for copy in by_keyword["COPY"]:
        source = copy.split()[0]
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignored or f"!{source}/" in ignored, f"{source} is excluded by .dockerignore"
    for module in ("bot", "session_api", "database.py"):  # everything `python -m bot` imports
        assert any(copy.split()[0] == module for copy in by_keyword["COPY"]), module
    compose = (ROOT / "compose.yaml").read_text()
    assert "stop_grace_period: 30s" in compose and "DATABASE_URL: postgresql://" in compose
