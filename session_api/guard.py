"""Wrong tokens cost: each address may send a few, then one every few seconds; past that it gets
429 with Retry-After until its budget refills. A right token always passes, so an attacker
sharing an address with the admin (a platform's proxy) cannot lock the admin out, and nothing
sleeps in a server thread (which would hand the attacker the threads instead)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailureBudget:
    burst: int = 10  # wrong tokens an address may send at once
    refill_seconds: float = 6.0  # then one more each this often (10 a minute)
    addresses: int = 10_000  # remembered at most (the least recently failing are forgotten)


class FailedAttempts:
    def __init__(self, budget: FailureBudget = FailureBudget(), clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)
        self._limited: set[str] = set()  # addresses told about in the log (until their budget refills)

    def waiting(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, when it spent its budget; else None (nothing counted)."""
        with self._lock:
            tokens, at = self._buckets.get(address, (float(self.budget.burst), self._clock()))
            tokens = min(float(self.budget.burst), tokens + (self._clock() - at) / self.budget.refill_seconds)
        return None if tokens >= 1.0 else (1.0 - tokens) * self.budget.refill_seconds

    def fail(self, address: str) -> float | None:
        """A wrong token from ``address``: None while it is within its budget, else the seconds
        until it may try again."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(address, (float(self.budget.burst), now))
            tokens = min(float(self.budget.burst), tokens + (now - at) / self.budget.refill_seconds)
            limited = tokens < 1.0
            if not limited:
                if tokens >= self.budget.burst:
                    self._limited.discard(address)  # quiet for a while: a new episode gets a new line
                tokens -= 1.0
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > self.budget.addresses:
                self._limited.discard(self._buckets.popitem(last=False)[0])
            first_refusal = limited and address not in self._limited
            if first_refusal:
                self._limited.add(address)
        if not limited:
            return None
        if first_refusal:
            log.warning("API: %d wrong tokens from %s; slowing it down", self.budget.burst, address)
        return (1.0 - tokens) * self.budget.refill_seconds
