"""One-shot work on the local store, run in a child process: restore, prepare, inspect, scan.

The daemon's own process has neonize loaded, whose Go code carries its own SQLite; a
Python sqlite3 handle on the same file in that process corrupts it (docs/neonize.md). So the
daemon never opens the store itself: it runs ``python -m bot.session.store_worker`` and exchanges
the document over pipes. The child imports neither neonize nor the database layer. (The
long-lived mirror process is ``bot.session.capture_process``.)
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bot.process.children import module_command, start_child
from bot.session.change_capture import Batch, TableDef
from bot.process.errors import DiskFullError, RestoreError, SessionDocumentError, SnapshotError, ZapkeepError

_EXIT_DOCUMENT_ERROR = 3
_EXIT_DISK_FULL = 4
_EXIT_FAILED = 2
DEFAULT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class RestoreSummary:
    checksum: str
    tables: int
    rows: int
    duration_ms: float


@dataclass(frozen=True)
class StoreInfo:
    """What the local store says of itself, for the boot rule."""

    lineage: str | None
    sequence: int
    device_jid: str | None


def restore_store(
    document_text: str, store_path: Path, *, lineage: str, sequence: int, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> RestoreSummary:
    """Validate the document and rebuild the store from it; the old store survives any failure."""
    started = time.perf_counter()
    output = _run(
        "restore", store_path, lineage, str(sequence), stdin=document_text, timeout=timeout, error=RestoreError
    )
    summary = json.loads(output)
    return RestoreSummary(
        checksum=summary["checksum"],
        tables=summary["tables"],
        rows=summary["rows"],
        duration_ms=(time.perf_counter() - started) * 1000,
    )


@dataclass(frozen=True)
class BuiltStore:
    """A new local store built beside the live one, to be installed (a rename) or discarded."""

    path: Path
    summary: RestoreSummary


def build_store(
    document_text: str, store_path: Path, *, lineage: str, sequence: int, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> BuiltStore:
    """A restore's first half, the one that needs disk space: the store is built beside
    ``store_path``, which is left as it is (DiskFullError when the disk has no room)."""
    started = time.perf_counter()
    output = _run("build", store_path, lineage, str(sequence), stdin=document_text, timeout=timeout, error=RestoreError)
    summary = json.loads(output)
    return BuiltStore(
        Path(summary["built"]),
        RestoreSummary(summary["checksum"], summary["tables"], summary["rows"], (time.perf_counter() - started) * 1000),
    )


def prepare_store(store_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Make the store file private and WAL-mode (creating it empty), with change capture, before neonize opens it."""
    _run("prepare", store_path, stdin="", timeout=timeout, error=RestoreError)


def inspect_store(store_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> StoreInfo | None:
    """The local store's lineage, change sequence and device; None when there is no store."""
    if not store_path.is_file():
        return None
    info = json.loads(_run("inspect", store_path, stdin="", timeout=timeout, error=SnapshotError))
    return StoreInfo(**info)


def scan_store(store_path: Path, after: int, known: dict, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Batch:
    """Compare every row of the store with ``known`` (what the database holds): the difference."""
    if not store_path.is_file():
        raise SnapshotError(f"no local store at {store_path}")
    request = json.dumps({"after": after, "known": known})
    return Batch.from_json(json.loads(_run("scan", store_path, stdin=request, timeout=timeout, error=SnapshotError)))


def document_rows(document_text: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> tuple[list[TableDef], list]:
    """A document's table definitions and keyed rows ``(table, key, row, hash)``, as the database stores them."""
    output = json.loads(_run("rows", Path("-"), stdin=document_text, timeout=timeout, error=SessionDocumentError))
    return [TableDef(**t) for t in output["tables"]], output["rows"]


def _run(command: str, store_path: Path, *args: str, stdin: str, timeout: float, error: type[ZapkeepError]) -> str:
    worker = start_child(
        module_command("bot.session.store_worker", command, str(store_path), *args), capture_stderr=True
    )
    with worker:
        try:
            stdout, stderr = worker.communicate(stdin.encode(), timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            worker.kill()  # as subprocess.run did on a timeout: no worker outlives its call
            worker.wait()
            raise error(f"store {command} did not finish within {timeout:.0f} s") from exc
    message = stderr.decode(errors="replace").strip().splitlines()
    if worker.returncode == _EXIT_DOCUMENT_ERROR:
        raise SessionDocumentError(message[-1] if message else "invalid session document")
    if worker.returncode == _EXIT_DISK_FULL:
        raise DiskFullError(message[-1] if message else f"store {command}: no space left on the disk")
    if worker.returncode != 0:
        raise error(message[-1] if message else f"store {command} failed with exit code {worker.returncode}")
    return stdout.decode()


def main(argv: list[str]) -> int:
    """Child side: one command, the store's path, then its arguments; documents come on stdin."""
    from bot.session import capture_process, cells, document as session_document

    commands = {"restore": 4, "build": 4, "prepare": 2, "inspect": 2, "scan": 2, "rows": 2}
    if not argv or commands.get(argv[0]) != len(argv):
        print(
            "usage: python -m bot.session.store_worker restore|build|prepare|inspect|scan|rows STORE_PATH [...]",
            file=sys.stderr,
        )
        return _EXIT_FAILED
    command, store_path = argv[0], Path(argv[1])
    try:
        if command == "prepare":
            session_document.prepare_store_file(store_path)
        elif command == "inspect":
            sys.stdout.write(json.dumps(asdict(_inspect(store_path))))
        elif command == "scan":
            request = json.loads(sys.stdin.buffer.read())
            capture = capture_process.CaptureSession(store_path)
            try:
                batch = capture.scan(int(request["after"]), request["known"])
            finally:
                capture.close()
            sys.stdout.buffer.write(cells.canonical_json(batch.to_json()))
        elif command == "rows":
            document = session_document.parse_document(sys.stdin.buffer.read())
            tables, rows = session_document.document_rows(document)
            output = {"tables": [asdict(t) for t in tables], "rows": rows}
            sys.stdout.buffer.write(cells.canonical_json(output))
        elif command == "build":
            document = session_document.parse_document(sys.stdin.buffer.read())
            session, built = session_document.build_aside(document, store_path, lineage=argv[2], sequence=int(argv[3]))
            summary = {"checksum": session.checksum, "tables": len(session.tables), "rows": session.row_count}
            sys.stdout.write(json.dumps({**summary, "built": str(built)}))
        else:
            document = session_document.parse_document(sys.stdin.buffer.read())
            session = session_document.restore_snapshot(document, store_path, lineage=argv[2], sequence=int(argv[3]))
            summary = {"checksum": session.checksum, "tables": len(session.tables), "rows": session.row_count}
            sys.stdout.write(json.dumps(summary))
    except SessionDocumentError as exc:
        print(exc, file=sys.stderr)
        return _EXIT_DOCUMENT_ERROR
    except DiskFullError as exc:
        print(exc, file=sys.stderr)
        return _EXIT_DISK_FULL
    except ZapkeepError as exc:
        print(exc, file=sys.stderr)
        return _EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"store {command} failed: {exc}", file=sys.stderr)
        return _EXIT_FAILED
    return 0


def _inspect(store_path: Path) -> StoreInfo:
    from bot.session import change_capture

    conn = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True, timeout=4.0)
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        lineage = None
        if change_capture.STATE_TABLE in names:
            row = conn.execute(f"SELECT lineage FROM {change_capture.STATE_TABLE} LIMIT 1").fetchone()
            lineage = row[0] if row else None
        sequence = change_capture.sequence(conn) if "sqlite_sequence" in names else 0
        device = change_capture.device(conn)
        return StoreInfo(lineage, sequence, device.jid if device else None)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
