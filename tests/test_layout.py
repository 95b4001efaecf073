"""The layout of bot/ (issue 24): no import circle anywhere, also none hidden in an import inside a
function, and the areas below the top never import the top."""

from __future__ import annotations

from tests.import_graph import cycles, import_graph

TOP = {"bot.runtime", "bot.services", "bot.wiring", "bot.__main__"}
BELOW = ("bot.process.", "bot.session.", "bot.connection.", "bot.messages.")


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


def test_the_areas_below_never_import_the_runtime_the_wiring_or_the_command_line() -> None:
    graph = import_graph()
    upward = sorted(f"{s} -> {t}" for s, targets in graph.items() if s.startswith(BELOW) for t in targets & TOP)
    assert upward == []
    assert all(t == "database" or not t.startswith(("bot", "session_api")) for t in graph.get("database", ()))
