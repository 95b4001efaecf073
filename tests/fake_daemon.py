"""``python -m tests.fake_daemon HOST:PORT``: the real daemon (``python -m bot run``, same
environment, same signals) whose client processes talk to ``tests.fake_network``'s server at
HOST:PORT instead of WhatsApp."""

from __future__ import annotations

import logging
import sys

from bot.__main__ import main
from bot.client_process import process_client_factory

if __name__ == "__main__":
    child = [sys.executable, "-m", "tests.fake_network", sys.argv[1]]
    sys.exit(main(["run"], client_factory=process_client_factory(logging.INFO, child=child)))
