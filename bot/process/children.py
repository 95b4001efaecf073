"""The one way the daemon starts a child process (the mirror, the store worker, the WhatsApp client).

Every child runs this same interpreter with the parent's environment and the project on
``PYTHONPATH`` (so ``python -m bot...`` finds the package whatever the working directory), and speaks
over pipes on its stdin and stdout; stderr goes to the daemon's own unless the caller reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding bot/ (site-packages when installed)


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` as a script with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_environment() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path}


def start_child(
    command: list[str], *, capture_stderr: bool = False, own_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``command`` with pipes on its stdin and stdout (and stderr when ``capture_stderr``);
    ``own_session`` keeps a Ctrl-C in the terminal from reaching it directly."""
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if capture_stderr else None,
        env=child_environment(),
        start_new_session=own_session,
    )
