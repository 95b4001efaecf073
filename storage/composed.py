"""The database: every concern's queries composed over one back-end (``storage.postgres``,
``storage.sqlite``); callers see one object, ``db.write_batch(...)``, ``db.acquire_lease(...)``."""

from __future__ import annotations

from storage.commands import CommandQueries
from storage.events import EventQueries
from storage.instances import InstanceQueries
from storage.leases import LeaseQueries
from storage.messages import MessageQueries
from storage.outbox import OutboxQueries
from storage.registry import RegistryQueries
from storage.resealing import ResealQueries
from storage.sessions import SessionQueries
from storage.upgrades import SchemaUpgrades


class Database(
    SchemaUpgrades,
    SessionQueries,
    ResealQueries,
    LeaseQueries,
    InstanceQueries,
    OutboxQueries,
    MessageQueries,
    EventQueries,
    RegistryQueries,
    CommandQueries,
):
    """The session tables, over whichever back-end the configuration chose."""

    def open(self) -> None:
        """Connect and bring the schema up to date (idempotent)."""
        self._open()
        self.migrate()
