"""Snapshots and restores of the local store, run in a child process.

The daemon's own process has neonize loaded, whose Go code carries its own SQLite; a
Python sqlite3 handle on the same file in that process corrupts it (NEONIZE.md). So the
daemon never opens the store itself: it runs ``python -m bot.store_worker`` and exchanges
the document over pipes. The child imports neither neonize nor the database layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bot.errors import RestoreError, SessionDocumentError, SnapshotError, ZapkeepError

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_EXIT_DOCUMENT_ERROR = 3
_EXIT_FAILED = 2
DEFAULT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Snapshot:
    """A session document as taken from the local store, with the facts worth logging."""

    text: str
    checksum: str
    device_jid: str | None
    push_name: str | None
    total_rows: int
    duration_ms: float

    @property
    def size_bytes(self) -> int:
        return len(self.text.encode())

    @property
    def paired(self) -> bool:
        return self.device_jid is not None


@dataclass(frozen=True)
class RestoreSummary:
    checksum: str
    tables: int
    rows: int
    duration_ms: float


def snapshot_store(store_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Snapshot:
    started = time.perf_counter()
    output = _run("snapshot", store_path, stdin="", timeout=timeout, error=SnapshotError)
    # A one-line summary, then the document: no need to parse megabytes for four facts.
    header, _, text = output.partition("\n")
    metadata = json.loads(header)
    return Snapshot(
        text=text,
        checksum=metadata["checksum"],
        device_jid=metadata["device_jid"],
        push_name=metadata["push_name"],
        total_rows=metadata["total_rows"],
        duration_ms=(time.perf_counter() - started) * 1000,
    )


def restore_store(document_text: str, store_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> RestoreSummary:
    """Validate the document and rebuild the store from it; the old store survives any failure."""
    started = time.perf_counter()
    summary = json.loads(_run("restore", store_path, stdin=document_text, timeout=timeout, error=RestoreError))
    return RestoreSummary(
        checksum=summary["checksum"],
        tables=summary["tables"],
        rows=summary["rows"],
        duration_ms=(time.perf_counter() - started) * 1000,
    )


def prepare_store(store_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Make the store file private and WAL-mode (creating it empty) before neonize opens it."""
    _run("prepare", store_path, stdin="", timeout=timeout, error=RestoreError)


def _run(command: str, store_path: Path, *, stdin: str, timeout: float, error: type[ZapkeepError]) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bot.store_worker", command, str(store_path)],
            input=stdin.encode(),
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"store {command} did not finish within {timeout:.0f} s") from exc
    message = result.stderr.decode(errors="replace").strip().splitlines()
    if result.returncode == _EXIT_DOCUMENT_ERROR:
        raise SessionDocumentError(message[-1] if message else "invalid session document")
    if result.returncode != 0:
        raise error(message[-1] if message else f"store {command} failed with exit code {result.returncode}")
    return result.stdout.decode()


def main(argv: list[str]) -> int:
    """Child side: ``snapshot PATH`` writes a summary line and the document to stdout; ``restore PATH`` reads it
    from stdin; ``prepare PATH`` readies the file for neonize."""
    from bot import session_store

    if len(argv) != 2 or argv[0] not in ("snapshot", "restore", "prepare"):
        print("usage: python -m bot.store_worker snapshot|restore|prepare STORE_PATH", file=sys.stderr)
        return _EXIT_FAILED
    command, store_path = argv[0], Path(argv[1])
    try:
        if command == "snapshot":
            document = session_store.take_snapshot(store_path)
            summary = {"checksum": document["checksum"], **document["metadata"]}
            # canonical JSON escapes newlines, so the first newline ends the summary line
            sys.stdout.buffer.write(json.dumps(summary).encode() + b"\n" + session_store.canonical_json(document))
        elif command == "prepare":
            session_store.prepare_store_file(store_path)
        else:
            document = session_store.parse_document(sys.stdin.buffer.read())
            session = session_store.restore_snapshot(document, store_path)
            summary = {"checksum": session.checksum, "tables": len(session.tables), "rows": session.row_count}
            sys.stdout.write(json.dumps(summary))
    except SessionDocumentError as exc:
        print(exc, file=sys.stderr)
        return _EXIT_DOCUMENT_ERROR
    except ZapkeepError as exc:
        print(exc, file=sys.stderr)
        return _EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
