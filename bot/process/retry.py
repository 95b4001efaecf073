"""The one retry schedule: how long to wait before trying again after failures in a row.

Every part that retries with a growing delay uses it: the reconnect rounds (exponential, jittered),
the outbox, the webhook deliveries, the mirror and the chatbot's inbox (fixed steps, the last one
repeated). Each keeps its own numbers beside its code."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySchedule:
    """``steps`` are the first delays, in order; past them each delay is the previous one times
    ``factor`` (1: the last step repeats), never above ``cap``. ``equal_jitter``: a delay is drawn
    in [ceiling/2, ceiling], so that many retrying clients spread out and none waits less than half."""

    steps: tuple[float, ...]
    factor: float = 1.0
    cap: float = math.inf
    equal_jitter: bool = False

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 0 or self.factor < 1 or self.cap < 0:
            raise ValueError(f"not a retry schedule: {self!r}")

    @classmethod
    def exponential(cls, first: float, cap: float, *, factor: float = 2.0) -> RetrySchedule:
        """first, first*factor, ... up to cap, with equal jitter."""
        return cls((first,), factor=factor, cap=cap, equal_jitter=True)

    def ceiling(self, attempt: int) -> float:
        """The delay after ``attempt`` failures in a row (1: after the first), before jitter."""
        attempt = max(1, attempt)
        if attempt <= len(self.steps):
            return min(self.cap, self.steps[attempt - 1])
        grown = self.steps[-1] * self.factor ** min(attempt - len(self.steps), 64)  # (past any cap; no overflow)
        return min(self.cap, grown)

    def delay(self, attempt: int, draw: float = 1.0) -> float:
        """``draw``: a number in [0, 1] from the caller's own generator (used with jitter only)."""
        ceiling = self.ceiling(attempt)
        if not self.equal_jitter:
            return ceiling
        return ceiling / 2 + ceiling / 2 * draw
