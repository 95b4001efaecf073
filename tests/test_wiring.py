"""One module wires a session's parts (issue 24): bot/wiring.py builds them, the runtime receives them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The rules console (`python -m bot console`) is no session: a chatbot and an outbox over a
# throw-away database, with the replies printed.
NOT_A_SESSION = {"bot/console.py"}
# Every part of a session: the runtime's own, and what is built around it.
PARTS = {
    "Runtime",
    "Mirror",
    "LeaseKeeper",
    "BackgroundScheduler",
    "Pairing",
    "Backups",
    "Restores",
    "SendGateway",
    "Outbox",
    "Chatbot",
    "StateJournal",
    "Dispatcher",
}


def test_a_sessions_parts_are_built_in_bot_wiring_only() -> None:
    built = []
    for path in sorted((ROOT / "bot").rglob("*.py")):
        if str(path.relative_to(ROOT)) in NOT_A_SESSION:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PARTS:
                built.append(f"{path.relative_to(ROOT)}:{node.func.id}")
    assert {b.split(":")[0] for b in built} == {"bot/wiring.py"}, built
    assert {b.split(":")[1] for b in built} == PARTS  # (the scan sees every part being built)
