"""``python -m tests.crashing_client LOG_LEVEL``: the real client process (``bot.connection.client_process``
running ``bot.connection.whatsapp.NeonizeClient``), except that a round on a store file named
``crash.sqlite3`` makes the Go library panic, which ends the whole process (exit code 134) as a Go
crash in production would: its client asks whatsmeow for a device the store does not hold, and
whatsmeow's ``NewClient`` dereferences nil (docs/neonize.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from bot.connection import client_process, events

CRASHING_STORE = "crash.sqlite3"


class _CrashingRound:
    def __init__(self, store_path: Path) -> None:
        self._store_path = store_path

    def run(self) -> str | None:
        from neonize.client import NewClient
        from neonize.utils import build_jid

        NewClient(str(self._store_path), jid=build_jid("5511900000000"), uuid="crash").connect()
        return "the Go library did not crash"

    def stop(self) -> None:
        pass


def factory(store_path: Path, sink: events.EventSink) -> events.WhatsAppClient:
    from bot.connection import whatsapp

    whatsapp.configure_library_logging(logging.getLogger().level)
    if store_path.name == CRASHING_STORE:
        return _CrashingRound(store_path)  # type: ignore[return-value]
    return whatsapp.NeonizeClient(store_path, sink)


if __name__ == "__main__":
    client_process.run_child(sys.argv[1:], factory)  # never returns
