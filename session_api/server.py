"""Serving the admin API with waitress from a named thread inside the daemon."""

from __future__ import annotations

import logging
import threading

from flask import Flask

from session_api.live import end_streams
from waitress import wasyncore
from waitress.server import create_server

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how quickly the loop notices a stop request
CONNECTION_LIMIT = 500
IDLE_TIMEOUT_SECONDS = 15
MAX_BODY_BYTES = 64 * 1024 * 1024  # a large store's document is a few MB; anything beyond is a mistake


# Behind a trusted proxy (TRUST_PROXY): the client's address and the scheme it used (one hop: the
# address the proxy appended, never one the client wrote into the header itself).
TRUSTED_PROXY_HEADERS = {"x-forwarded-for", "x-forwarded-proto"}


class ApiServer:
    # 10: the calls that wait on someone else (at most 4 event streams, 2 downloads, 2 number checks)
    # leave 2 for the probes and the rest of the API.
    def __init__(
        self, app: Flask, host: str, port: int, *, threads: int = 10, trusted_proxy: str | None = None
    ) -> None:
        """``trusted_proxy``: "*" or an address whose X-Forwarded-For/-Proto are believed; None:
        those headers are dropped from every request (a client could forge them)."""
        proxy = (
            {}
            if trusted_proxy is None
            else {
                "trusted_proxy": trusted_proxy,
                "trusted_proxy_count": 1,
                "trusted_proxy_headers": TRUSTED_PROXY_HEADERS,
            }
        )
        self._server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="zapkeep",
            clear_untrusted_proxy_headers=True,
            # Idle or half-sent connections cannot starve /healthz: many may wait (poll, not select,
            # so their number is not capped by FD_SETSIZE), and each is closed after a short silence.
            connection_limit=CONNECTION_LIMIT,
            channel_timeout=IDLE_TIMEOUT_SECONDS,
            cleanup_interval=5,
            asyncore_use_poll=True,
            # Refused from the headers, before any of the body is read (waitress's default is 1 GiB).
            max_request_body_size=MAX_BODY_BYTES,
            max_request_header_size=64 * 1024,
            **proxy,
        )
        self._app = app
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.effective_port

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the API server is already running")
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        log.info("admin API listening on %s:%s", self._server.effective_host, self.port)

    def _serve(self) -> None:
        # waitress's own run() loops until its sockets are closed, and closing them from another
        # thread races its poll(); so the loop runs in short turns and the sockets are closed here.
        server = self._server
        while not self._stopping.is_set():
            wasyncore.loop(timeout=POLL_SECONDS, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)
        server.task_dispatcher.shutdown()
        wasyncore.close_all(server._map, ignore_all=True)

    def stop(self) -> None:
        if self._thread is None:
            return
        end_streams(self._app)  # they hold worker threads that waitress would wait for
        self._stopping.set()
        self._thread.join(timeout=10)
        self._thread = None
