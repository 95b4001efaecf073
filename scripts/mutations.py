"""Mutation check: put each small bug of scripts/mutations.toml into a copy of the tree, alone, run
the tests that should catch it, and print a table of caught / missed with the test's name.

    .venv/bin/python scripts/mutations.py [--only TEXT]... [--no-baseline] [--check] [--keep] [--table FILE]

A mutation is caught when one of its tests fails (pytest exit code 1). Anything else is a miss:
every test passed, a test was skipped, a node id does not exist, or the mutated tree did not even
import (the mutation is then no meaningful bug and must be fixed). First, unless --no-baseline,
the same tests run once on an unmutated copy: a test that fails there proves nothing about a
mutation. Exits 1 when anything is missed, 2 when the table does not apply to this tree or a test
fails without any mutation.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "scripts" / "mutations.toml"
LOG_DIR = Path(tempfile.gettempdir()) / "zapkeep-mutations"
RUN_TIMEOUT_SECONDS = 900  # one mutation's tests; pytest.ini bounds each test at 300 s already


class TableError(Exception):
    """The mutation table does not apply to this tree (a snippet moved, a file is gone)."""


@dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    tests: tuple[str, ...]
    edits: tuple[Edit, ...]
    pending: str | None = None


@dataclass(frozen=True)
class Outcome:
    verdict: str  # caught | missed | skipped | not found | broken | timeout
    detail: str  # the failing test (and why), or the tests that passed
    seconds: float
    log: Path


def load_table(path: Path) -> list[Mutation]:
    data = tomllib.loads(path.read_text())
    mutations = []
    for entry in data["mutation"]:
        edits = tuple(Edit(e["file"], e["find"], e["replace"]) for e in entry["edit"])
        if not edits or not entry["tests"]:
            raise TableError(f"{entry['name']}: a mutation needs at least one edit and one test")
        mutations.append(Mutation(entry["name"], entry["why"], tuple(entry["tests"]), edits, entry.get("pending")))
    return mutations


def mutated(mutation: Mutation, tree: Path) -> dict[Path, str]:
    """The new text of each file the mutation edits in ``tree``; each snippet must occur exactly
    once, so a refactor cannot silently turn a mutation into a no-op."""
    texts: dict[Path, str] = {}
    for edit in mutation.edits:
        path = tree / edit.file
        if not path.is_file():
            raise TableError(f"{mutation.name}: {edit.file} does not exist")
        text = texts.get(path, path.read_text())
        found = text.count(edit.find)
        if found != 1:
            raise TableError(
                f"{mutation.name}: the snippet occurs {found} times in {edit.file} (must be exactly once):\n{edit.find}"
            )
        texts[path] = text.replace(edit.find, edit.replace)
    return texts


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked files, with their uncommitted changes, and new
    files not ignored), with the virtualenv linked rather than copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.is_file() or name == ".venv" or name.startswith(".venv/"):
            continue  # deleted in the working tree, or the venv symlink itself
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (destination / ".venv").symlink_to((ROOT / ".venv").resolve())


def run_tests(tree: Path, tests: tuple[str, ...], log: Path, *, stop_at_first: bool) -> tuple[int | None, Path]:
    """pytest in ``tree`` on ``tests``; (exit code, or None on timeout; the JUnit report)."""
    report = tree / "junit.xml"
    command = [str(tree / ".venv" / "bin" / "python"), "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"]
    command += ["-x"] if stop_at_first else []
    command += [f"--junitxml={report}"]
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=RUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        try:  # pytest's own group: whatever a mutant left running must not outlive its deleted tree
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        return code, report


def read_report(report: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(failed: (test, first line of why), passed, skipped) from pytest's JUnit XML."""
    failed: list[tuple[str, str]] = []
    passed: list[str] = []
    skipped: list[str] = []
    if not report.is_file():
        return failed, passed, skipped
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').removeprefix('tests.')}::{case.get('name')}"
        problem = case.find("failure")
        kind = ""
        if problem is None:
            problem, kind = case.find("error"), "error, not an assertion: "  # e.g. a fixture's setup
        if problem is not None:
            why = (problem.get("message") or problem.text or "").strip().splitlines()
            # The failing line in the test itself (the first line pytest marks ">"): "assert False" says little.
            at = [line[1:].strip() for line in (problem.text or "").splitlines() if line.startswith(">")]
            where = f" at `{at[0][:100]}`" if at else ""
            failed.append((name, kind + (why[0][:120] if why else "") + where))
        elif case.find("skipped") is not None:
            skipped.append(name)
        else:
            passed.append(name)
    return failed, passed, skipped


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def judge(code: int | None, report: Path, seconds: float, log: Path) -> Outcome:
    failed, passed, skipped = read_report(report)
    if code is None:
        return Outcome("timeout", f"no answer within {RUN_TIMEOUT_SECONDS} s", seconds, log)
    if code == 1 and failed:
        test, why = failed[0]
        return Outcome("caught", f"{test}: {why}" if why else test, seconds, log)
    if code == 0 and skipped:
        return Outcome("skipped", "skipped: " + ", ".join(skipped), seconds, log)
    if code == 0:
        return Outcome("missed", "passed: " + ", ".join(passed), seconds, log)
    if code in (4, 5) and re.search(r"ERROR: not found:|no tests ran", log.read_text(errors="replace")):
        return Outcome("not found", "pytest found no such test (see the log)", seconds, log)
    return Outcome("broken", f"pytest exit code {code}: the tree did not import or collect (see the log)", seconds, log)


def check_one(mutation: Mutation, keep: bool) -> Outcome:
    tree = Path(tempfile.mkdtemp(prefix="zapkeep-mutant-"))
    log = LOG_DIR / f"{slug(mutation.name)}.log"
    try:
        copy_tree(tree)
        for path, text in mutated(mutation, tree).items():
            path.write_text(text)
        started = time.monotonic()
        code, report = run_tests(tree, mutation.tests, log, stop_at_first=True)
        return judge(code, report, time.monotonic() - started, log)
    finally:
        if keep:
            print(f"  (kept {tree})", file=sys.stderr)
        else:
            shutil.rmtree(tree, ignore_errors=True)


def baseline(tests: tuple[str, ...]) -> tuple[list[tuple[str, str]], float]:
    """Every selected test once on an unmutated copy: (the failing tests, seconds)."""
    tree = Path(tempfile.mkdtemp(prefix="zapkeep-unmutated-"))
    try:
        copy_tree(tree)
        started = time.monotonic()
        code, report = run_tests(tree, tests, LOG_DIR / "baseline.log", stop_at_first=False)
        failed, _, _ = read_report(report)
        if code not in (0, 1) or (code == 1 and not failed):
            failed = [("(baseline run)", f"pytest exit code {code}; see {LOG_DIR / 'baseline.log'}")]
        return failed, time.monotonic() - started
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def print_table(rows: list[tuple[Mutation, Outcome]]) -> None:
    print("\n| mutation | result | test | s |")
    print("|---|---|---|---|")
    for mutation, outcome in rows:
        mark = " (pending)" if mutation.pending and outcome.verdict != "caught" else ""
        detail = outcome.detail.replace("|", "\\|")
        print(f"| {mutation.name} | {outcome.verdict}{mark} | {detail} | {outcome.seconds:.0f} |")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE, help="another mutation table (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[], help="run the mutations whose name contains this")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated tree")
    parser.add_argument("--check", action="store_true", help="only check that every mutation applies; run nothing")
    parser.add_argument("--keep", action="store_true", help="keep each mutated copy (its path is printed)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        mutations = load_table(args.table)
    except (OSError, KeyError, TableError, tomllib.TOMLDecodeError) as exc:
        print(f"{args.table}: cannot read the mutation table: {exc!r}", file=sys.stderr)
        return 2
    if args.only:
        mutations = [m for m in mutations if any(o.lower() in m.name.lower() for o in args.only)]
        if not mutations:
            print(f"no mutation matches {args.only}", file=sys.stderr)
            return 2
    try:
        for mutation in mutations:  # every snippet checked before anything runs
            mutated(mutation, ROOT)
    except TableError as exc:
        print(f"{args.table} does not apply to this tree: {exc}", file=sys.stderr)
        return 2
    print(f"{len(mutations)} mutations apply to this tree", flush=True)
    if args.check:
        return 0

    LOG_DIR.mkdir(exist_ok=True)
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        failing, seconds = baseline(tests)
        print(f"baseline: the {len(tests)} selected tests on the unmutated tree, {seconds:.0f} s")
        if failing:
            for test, why in failing:
                print(f"  FAILS WITHOUT ANY MUTATION: {test}: {why}", file=sys.stderr)
            print("a test that fails on the unmutated tree proves nothing; fix it first", file=sys.stderr)
            return 2

    rows = []
    for number, mutation in enumerate(mutations, 1):
        print(f"[{number}/{len(mutations)}] {mutation.name} ...", end=" ", flush=True)
        outcome = check_one(mutation, args.keep)
        print(f"{outcome.verdict} ({outcome.seconds:.0f} s)", flush=True)
        rows.append((mutation, outcome))

    print_table(rows)
    pending = [(m, o) for m, o in rows if m.pending and o.verdict != "caught"]
    for mutation, _ in pending:
        print(f"\npending, {mutation.name}: {' '.join(mutation.pending.split())}")
    missed = [(m, o) for m, o in rows if o.verdict != "caught"]
    for mutation, outcome in missed:
        print(f"log of '{mutation.name}': {outcome.log}", file=sys.stderr)
    caught = len(rows) - len(missed)
    print(f"\n{caught} of {len(rows)} mutations caught in {time.monotonic() - started:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
