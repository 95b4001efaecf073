"""Log output, set up the same way in the daemon and in its WhatsApp client process."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int) -> None:
    """Before neonize is imported: its import calls basicConfig, a no-op once this has run."""
    logging.basicConfig(level=level, stream=sys.stderr, format=FORMAT)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
