"""``python -m tests.fake_daemon HOST:PORT``: the real daemon (``python -m bot run``, same
environment, same signals) whose client processes talk to ``tests.fake_network``'s server at
HOST:PORT instead of WhatsApp.

``ZAPKEEP_FAKE_CALL_TIMEOUT``: seconds the daemon waits for its client's answer (tests of a
timeout set it short). ``ZAPKEEP_BENCH_SHARED_LANE=1``: the benchmark's "before" (as the code was
before issue 23): one lane of 4 workers for replies and number checks, no cap on concurrent
checks, 8 server threads."""

from __future__ import annotations

import logging
import os
import sys

from bot.__main__ import main
from bot.connection.client_process import CALL_TIMEOUT_SECONDS, process_client_factory

if __name__ == "__main__":
    if os.environ.get("ZAPKEEP_BENCH_SHARED_LANE") == "1":
        from session_api import routes
        from session_api.server import ApiServer

        routes.MAX_CONCURRENT_CHECKS = 1_000_000
        ApiServer.__init__.__kwdefaults__["threads"] = 8  # type: ignore[index]
    timeout = float(os.environ.get("ZAPKEEP_FAKE_CALL_TIMEOUT") or CALL_TIMEOUT_SECONDS)
    child = [sys.executable, "-m", "tests.fake_network", sys.argv[1]]
    sys.exit(
        main(["run"], client_factory=process_client_factory(logging.INFO, child=child, call_timeout_seconds=timeout))
    )
