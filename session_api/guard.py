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


EVERY_ADDRESS = "every address"


class FailedAttempts:
    def __init__(
        self,
        budget: FailureBudget = FailureBudget(),
        clock: Callable[[], float] = time.monotonic,
        *,
        overall: FailureBudget | None = None,
    ) -> None:
        """``overall``: a second budget that every address spends together, so that trying from
        many addresses does not multiply the attempts."""
        self.budget = budget
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)
        self._limited: set[str] = set()  # addresses told about in the log (until their budget refills)
        self._overall = None if overall is None else FailedAttempts(overall, clock)

    def waiting(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, when it (or every address together) spent its
        budget; else None (nothing counted)."""
        overall = None if self._overall is None else self._overall.waiting(EVERY_ADDRESS)
        return _longer(self._waiting(address), overall)

    def fail(self, address: str) -> float | None:
        """A wrong token from ``address``: None while it (and every address together) is within
        its budget, else the seconds until it may try again."""
        overall = None if self._overall is None else self._overall.fail(EVERY_ADDRESS)
        return _longer(self._fail(address), overall)

    def _waiting(self, address: str) -> float | None:
        with self._lock:
            tokens, at = self._buckets.get(address, (float(self.budget.burst), self._clock()))
            tokens = min(float(self.budget.burst), tokens + (self._clock() - at) / self.budget.refill_seconds)
        return None if tokens >= 1.0 else (1.0 - tokens) * self.budget.refill_seconds

    def _fail(self, address: str) -> float | None:
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


def _longer(first: float | None, second: float | None) -> float | None:
    waits = [wait for wait in (first, second) if wait is not None]
    return max(waits) if waits else None
