"""What the admin API asks of the daemon's sessions: a host (``bot.host.Host``) hosting many, each
with its runtime, outbox and webhooks; or one bare runtime, served as a host of that one session
(the tests and benchmarks of a single runtime)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from bot.messages.outbox import Outbox
from bot.messages.webhooks import Dispatcher
from bot.metrics import Metrics
from bot.process.config import Config
from bot.process.errors import StateConflictError
from bot.runtime import Runtime


class SessionParts(Protocol):
    """A session hosted here (``bot.wiring.Services``): what the API's views use of it."""

    @property
    def runtime(self) -> Runtime: ...
    @property
    def outbox(self) -> Outbox | None: ...
    @property
    def webhooks(self) -> list[Dispatcher]: ...


class SessionHost(Protocol):
    """``bot.host.Host``'s interface as the API uses it."""

    @property
    def config(self) -> Config: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def default_session_id(self) -> str: ...
    def hosted(self) -> list[str]: ...
    def services(self, session_id: str) -> SessionParts | None: ...
    def create_session(self, session_id: str, pair_phone: str | None = None, rules: str | None = None) -> None: ...
    def delete_session(self, session_id: str, logout: bool = False, purge: bool = False) -> bool: ...


@dataclass(frozen=True)
class OneSession:
    runtime: Runtime
    outbox: Outbox | None = None
    webhooks: list[Dispatcher] = field(default_factory=list)


class OneRuntime:
    """One runtime built by hand, served as a host of its one session. It runs no commands for
    other daemons (no host executes them), so nothing is forwarded to another daemon from it
    either: other sessions are answered as today (409 "not running here")."""

    forwards_commands = False

    def __init__(self, runtime: Runtime, outbox: Outbox | None, webhooks: list[Dispatcher]) -> None:
        self._session = OneSession(runtime, outbox, webhooks)
        self.config = runtime.config
        self.instance_id = runtime.owner_id
        self.metrics = runtime.metrics
        self.default_session_id = runtime.config.session_id

    def hosted(self) -> list[str]:
        return [self.default_session_id]

    def services(self, session_id: str) -> OneSession | None:
        return self._session if session_id == self.default_session_id else None

    def create_session(self, session_id: str, pair_phone: str | None = None, rules: str | None = None) -> None:
        raise StateConflictError("this daemon serves one runtime; it creates no sessions")

    def delete_session(self, session_id: str, logout: bool = False, purge: bool = False) -> bool:
        raise StateConflictError("this daemon serves one runtime; it deletes no sessions")
