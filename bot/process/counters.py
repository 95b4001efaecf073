"""What the message pipeline counts, as the pipeline sees it: a seam so that ``bot.messages`` needs
nothing from the layer above (``bot.metrics`` implements it and the wiring passes it in)."""

from __future__ import annotations

from typing import Protocol


class MessageCounts(Protocol):
    def received(self, outcome: str) -> None: ...

    def sent(self, outcome: str) -> None: ...


class NotCounted:
    """For a pipeline built without metrics (the rules console, tests)."""

    def received(self, outcome: str) -> None:
        pass

    def sent(self, outcome: str) -> None:
        pass
