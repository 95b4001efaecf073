"""`python -m bot console`, driven like an operator's terminal: lines in, replies out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """/clock 2026-11-23 18:30
oi
3
/clock 2026-11-23 19:30
Qual o PREÇO?
hmm?
quero falar com um atendente
alô?
/operator Oi, aqui é a Maria
/quit
this line is never read
"""


def run_console(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATA_DIR": str(tmp_path), **env}
    environment.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "bot", "console", "--name", "Ana"],
        cwd=ROOT,
        env=environment,
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_console_answers_a_scripted_conversation(tmp_path: Path) -> None:
    result = run_console(tmp_path, SCRIPT)

    assert result.returncode == 0, result.stderr
    replies = [block for block in result.stdout.split("\n\n") if block.startswith("bot> ")]
    assert len(replies) == 6
    greeting, menu_3, price, closed, handoff, paused = replies
    assert greeting.startswith("bot> Olá, Ana! 👋 Bem-vindo(a) à Padaria Pão de Cada Dia")
    assert "Croissant: R$ 7,50" in menu_3
    assert "(clock set to 2026-11-23 19:30 America/Sao_Paulo; closed)" in result.stdout
    assert "Pão francês" in price  # the rules still answer after hours
    assert "No momento estamos fechados" in closed  # what nothing else answers gets the after-hours reply
    assert "Já chamei um atendente" in handoff
    assert paused == "bot> (no reply: the bot is paused in this chat)"
    assert "an operator answered from the phone" in result.stdout
    assert result.stderr == ""  # no log noise in the conversation
    assert not (tmp_path / "zapkeep.sqlite3").exists()  # a throw-away database


def test_console_refuses_a_broken_rules_file_with_one_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("business = \n", encoding="utf-8")
    result = run_console(tmp_path, "oi\n", BOT_REPLIES=str(rules))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "BOT_REPLIES" in result.stderr and "line 1" in result.stderr
