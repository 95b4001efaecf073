"""The layout of bot/ (issue 24): no import circle anywhere, also none hidden in an import inside a
function, and the areas below the top never import the top."""

from __future__ import annotations

import ast
import re

from tests.import_graph import ROOT, cycles, import_graph

TOP = {"bot.runtime", "bot.wiring", "bot.metrics", "bot.console", "bot.__main__"}
BELOW = ("bot.process.", "bot.session.", "bot.connection.", "bot.messages.")


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


def test_the_areas_below_never_import_the_runtime_the_wiring_or_the_command_line() -> None:
    graph = import_graph()
    upward = sorted(f"{s} -> {t}" for s, targets in graph.items() if s.startswith(BELOW) for t in targets & TOP)
    assert upward == []
    storage = {s: targets for s, targets in graph.items() if s == "database" or s.startswith("storage")}
    assert storage and all(not t.startswith(("bot", "session_api")) for targets in storage.values() for t in targets)


def test_every_child_process_of_the_daemon_is_started_one_way() -> None:
    """bot/process/children.py is the only place in bot/ that starts a process (so every child gets
    the same environment and stdio conventions)."""
    starters = {"Popen", "run", "call", "check_call", "check_output"}
    found = []
    for path in sorted((ROOT / "bot").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in starters
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "subprocess"
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert [f for f in found if not f.startswith("bot/process/children.py:")] == []
    assert found  # the scan sees the one place there is


def test_every_function_and_class_of_bot_serves_the_product() -> None:
    """A top-level function or class of bot/ that only tests/ or bench/ use belongs in tests/
    (the product names it somewhere besides its own definition: a call, an import, an entry point)."""
    product = [*(ROOT / "bot").rglob("*.py"), *(ROOT / "session_api").rglob("*.py"), ROOT / "database.py"]
    text = "\n".join(path.read_text() for path in product) + (ROOT / "pyproject.toml").read_text()
    unused = []
    for path in sorted((ROOT / "bot").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            named = isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("__")
            if named and len(re.findall(rf"\b{re.escape(node.name)}\b", text)) < 2:
                unused.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert unused == []
