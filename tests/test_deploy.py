"""What a deploy needs from the platform: libmagic in the image, or one clear line without it."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "libmagic1" in config["deploy"]["aptPackages"]
