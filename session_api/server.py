"""Serving the admin API with waitress from a named thread inside the daemon."""

from __future__ import annotations

import logging
import threading

from flask import Flask
from waitress.server import create_server

log = logging.getLogger(__name__)


class ApiServer:
    def __init__(self, app: Flask, host: str, port: int, *, threads: int = 8) -> None:
        self._server = create_server(app, host=host, port=port, threads=threads, ident="zapkeep",
                                     clear_untrusted_proxy_headers=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.effective_port

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the API server is already running")
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        log.info("admin API listening on %s:%s", self._server.effective_host, self.port)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.close()
        self._thread.join(timeout=5)
        self._thread = None
