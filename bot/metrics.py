"""The daemon's numbers in Prometheus's text format (``GET /metrics``).

Counters and the batch histogram are counted where things happen (``Metrics``); the session's
state, the lease, the mirror and the outbox are read when Prometheus scrapes (``SessionCollector``),
so nothing is kept twice. Each daemon has its own registry: no process-wide global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.session.state import SessionStatus, State
from database import Database

if TYPE_CHECKING:
    from bot.messages.webhooks import EndpointStatus


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # memory, CPU, open descriptors of this process
        self._received = Counter(
            "zapkeep_messages_received",
            "Messages received, by what the chatbot did",
            ["outcome"],
            registry=self.registry,
        )
        self._sent = Counter(
            "zapkeep_messages_sent", "Outgoing messages settled, by outcome", ["outcome"], registry=self.registry
        )
        self._batch_rows = Counter("zapkeep_mirror_rows", "Store rows mirrored to the database", registry=self.registry)
        self._batch_bytes = Counter(
            "zapkeep_mirror_bytes", "Bytes of store rows mirrored to the database", registry=self.registry
        )
        self._batch_seconds = Histogram(
            "zapkeep_mirror_batch_seconds",
            "Time to write one batch of store changes to the database",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self._take_overs = Counter(
            "zapkeep_take_overs",
            "Sessions this instance took over (lease free, released or run out)",
            registry=self.registry,
        )

    def took_over(self) -> None:
        self._take_overs.inc()

    def watch_owned(self, owned: Callable[[], int]) -> None:
        """The sessions this instance owns now (several replicas share them)."""
        self.registry.register(OwnedCollector(owned))

    def received(self, outcome: str) -> None:
        self._received.labels(outcome=outcome.split(":", 1)[0]).inc()  # "ignored:group" -> "ignored"

    def sent(self, outcome: str) -> None:
        self._sent.labels(outcome=outcome).inc()

    def mirrored(self, rows: int, size_bytes: int, seconds: float) -> None:
        self._batch_rows.inc(rows)
        self._batch_bytes.inc(size_bytes)
        self._batch_seconds.observe(seconds)

    def watch(self, status: Callable[[], SessionStatus], db: Database, session_id: str) -> None:
        self.registry.register(SessionCollector(status, db, session_id))

    def watch_webhooks(self, endpoints: Callable[[], list[EndpointStatus]]) -> None:
        self.registry.register(WebhookCollector(endpoints))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SessionCollector(Collector):
    def __init__(self, status: Callable[[], SessionStatus], db: Database, session_id: str) -> None:
        self._status = status
        self._db = db
        self._session_id = session_id

    def describe(self) -> list:
        return []  # read at each scrape; nothing to describe ahead

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._status()
        now = datetime.now(UTC)
        state = GaugeMetricFamily("zapkeep_state", "1 for the session's current state", labels=["state"])
        for candidate in State:
            state.add_metric([candidate.value], 1.0 if candidate.value == status.state else 0.0)
        yield state
        connected = (now - status.connected_since).total_seconds() if status.connected_since else 0.0
        yield GaugeMetricFamily(
            "zapkeep_connected_seconds", "Seconds since the connection came up (0: not connected)", connected
        )
        yield CounterMetricFamily("zapkeep_reconnects", "Connection drops and failed dials", status.reconnect_count)
        yield CounterMetricFamily(
            "zapkeep_stored_rows_unreadable",
            "Stored rows found not to open (altered or corrupt): repaired by the owner, or refused at boot",
            status.unreadable_rows,
        )
        yield GaugeMetricFamily(
            "zapkeep_lease_owned", "1 while this daemon owns the session", float(status.owns_session)
        )
        yield GaugeMetricFamily(
            "zapkeep_fencing_token", "The lease's fencing token (0: none)", status.fencing_token or 0
        )
        yield GaugeMetricFamily(
            "zapkeep_mirror_pending_changes",
            "Store changes read, not yet in the database",
            status.mirror_pending_changes,
        )
        age = (now - status.last_mirrored_at).total_seconds() if status.last_mirrored_at else float("nan")
        yield GaugeMetricFamily("zapkeep_mirror_last_write_age_seconds", "Seconds since the last mirrored change", age)
        try:
            if status.database_unreachable_since is not None:  # known away: not waited for
                raise ConnectionError("the database is unreachable")
            queued, oldest = self._db.outbox_depth(self._session_id)
        except Exception:  # the database is away: every other number still matters, most of all now
            yield GaugeMetricFamily("zapkeep_database_up", "1 when the database answered this scrape", 0.0)
            return
        yield GaugeMetricFamily("zapkeep_database_up", "1 when the database answered this scrape", 1.0)
        yield GaugeMetricFamily("zapkeep_outbox_queued", "Replies and sends waiting in the outbox", queued)
        oldest_age = (now - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("zapkeep_outbox_oldest_age_seconds", "Age of the oldest waiting message", oldest_age)


class OwnedCollector(Collector):
    def __init__(self, owned: Callable[[], int]) -> None:
        self._owned = owned

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("zapkeep_sessions_owned", "Sessions whose lease this instance holds", self._owned())


class WebhookCollector(Collector):
    """Each WEBHOOK_URL's deliveries, labelled by the URL shown (scheme, host, path)."""

    def __init__(self, endpoints: Callable[[], list[EndpointStatus]]) -> None:
        self._endpoints = endpoints

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["endpoint"]
        delivered = CounterMetricFamily("zapkeep_webhook_delivered", "Events the endpoint accepted", labels=labels)
        failed = CounterMetricFamily(
            "zapkeep_webhook_failed_attempts", "Deliveries refused or unanswered", labels=labels
        )
        given_up = CounterMetricFamily(
            "zapkeep_webhook_given_up", "Events given up after a day of retries", labels=labels
        )
        failing = GaugeMetricFamily(
            "zapkeep_webhook_failing", "1 while an event waits for a retry or the last delivery failed", labels=labels
        )
        for endpoint in self._endpoints():
            delivered.add_metric([endpoint.url], endpoint.delivered)
            failed.add_metric([endpoint.url], endpoint.failed_attempts)
            given_up.add_metric([endpoint.url], endpoint.given_up)
            failing.add_metric([endpoint.url], 1.0 if endpoint.failing_since is not None else 0.0)
        yield from (delivered, failed, given_up, failing)
