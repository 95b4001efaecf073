"""What the runtime tests share: fast timings, a config, and waiting for a paired, mirrored session."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.process.config import Config
from bot.runtime import Runtime, Timing
from bot.session.state import State
from tests.synthetic import take_snapshot
from database import Database
from tests.fake_whatsapp import FakeClient, FakeWhatsApp, wait_until

FAST = Timing(
    after_connect_seconds=0.2,
    after_pair_seconds=0.1,
    mirror_poll_seconds=0.2,
    # whatsmeow's own length: a test that pairs may take seconds between the QR and its scan on a
    # loaded machine, and a round that ended meanwhile would drop the scan with its client.
    qr_round_seconds=90.0,
    qr_check_seconds=0.2,
)


def make_config(tmp_path: Path, **overrides: str) -> Config:
    env = {"DATA_DIR": str(tmp_path / "data"), "BACKUP_INTERVAL_SECONDS": "3600", **overrides}
    return Config.from_env(env)


def versions(db: Database) -> list[int]:
    return [h.version for h in db.list_history("default")]


def stored_rows(db: Database, table: str) -> list[str]:
    return [r.row_text for r in db.load_rows("default") if r.table == table]


def mirrored(runtime: Runtime, db: Database) -> bool:
    """The database holds exactly the local store: the stored checksum is the store's own."""
    record = db.load_session("default")
    return record is not None and record.checksum == take_snapshot(runtime.config.store_path)["checksum"]


def start_paired(runtime: Runtime, network: FakeWhatsApp, db: Database) -> FakeClient:
    """Start from nothing, scan the QR, wait until connected, the store is mirrored and the
    snapshot after pairing is in history (the only one until shutdown)."""
    runtime.start()
    wait_until(lambda: runtime.state is State.QR, message="qr state")
    client = network.current()
    client.scan_qr()
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected")
    wait_until(lambda: versions(db) != [], message="the snapshot after pairing")
    wait_until(lambda: mirrored(runtime, db), message="the store mirrored")
    return client


class Calls:
    """Wraps a function and counts its calls that began after the last ``mark()`` and have ended
    (returned or raised): "the worker has looked again since", the event a proof of absence waits
    for instead of a sleep (the next outbox pass, lease attempt or store poll). ``counts`` picks the
    calls that count (e.g. only a mirror's polls)."""

    def __init__(self, function: Callable[..., Any], counts: Callable[..., bool] = lambda *a, **k: True) -> None:
        self._function = function
        self._counts = counts
        self._lock = threading.Lock()
        self._epoch = 0
        self._ended = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        counted = self._counts(*args, **kwargs)
        with self._lock:
            epoch = self._epoch
        try:
            return self._function(*args, **kwargs)
        finally:
            with self._lock:
                if counted and epoch == self._epoch:
                    self._ended += 1

    def mark(self) -> None:
        with self._lock:
            self._epoch += 1
            self._ended = 0

    @property
    def ended(self) -> int:
        """Calls begun after the mark that have ended."""
        return self._ended

    def wait(self, count: int = 1, *, message: str, timeout: float = 30.0) -> None:
        """Until ``count`` calls begun after the mark have ended."""
        wait_until(lambda: self._ended >= count, timeout=timeout, message=message)
