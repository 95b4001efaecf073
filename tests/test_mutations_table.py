"""scripts/mutations.toml stays applicable: a refactor that moves a mutated snippet or renames a
catching test fails here, not months later when someone runs scripts/mutations.sh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mutations  # noqa: E402  (scripts/ is not a package)


def test_every_mutation_applies_exactly_once_and_changes_the_code() -> None:
    table = mutations.load_table(mutations.TABLE)
    assert len(table) >= 9
    for mutation in table:
        for path, text in mutations.mutated(mutation, ROOT).items():
            assert text != path.read_text(), mutation.name


def test_a_snippet_found_twice_or_not_at_all_is_refused(tmp_path: Path) -> None:
    (tmp_path / "code.py").write_text("x = 1\nx = 1\ny = 2\n")

    def mutation(find: str) -> mutations.Mutation:
        edit = mutations.Edit("code.py", find, "x = 0")
        return mutations.Mutation("m", "why", ("tests/test_x.py::t",), (edit,))

    with pytest.raises(mutations.TableError, match="occurs 2 times"):
        mutations.mutated(mutation("x = 1"), tmp_path)
    with pytest.raises(mutations.TableError, match="occurs 0 times"):
        mutations.mutated(mutation("z = 3"), tmp_path)
    assert mutations.mutated(mutation("y = 2"), tmp_path) == {tmp_path / "code.py": "x = 1\nx = 1\nx = 0\n"}
    assert (tmp_path / "code.py").read_text() == "x = 1\nx = 1\ny = 2\n"  # checked, not written


def test_every_catching_test_exists() -> None:
    tests = sorted({t for m in mutations.load_table(mutations.TABLE) for t in m.tests})
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
