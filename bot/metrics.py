"""The daemon's numbers in Prometheus's text format (``GET /metrics``).

Counters and the batch histogram are counted where things happen (``Metrics``, through each
session's ``SessionCounts``); the sessions' state, lease, mirror and outbox are read when
Prometheus scrapes (``SessionsCollector``), so nothing is kept twice. One ``Metrics`` serves every
session of a daemon: each per-session number carries a ``session_id`` label, one family per metric
and one sample per session (two collectors yielding the same family would make the exposition
invalid). The process's own numbers stay unlabelled. Each daemon has its own registry: no
process-wide global.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.session.state import SessionStatus, State
from database import Database

if TYPE_CHECKING:
    from bot.messages.webhooks import EndpointStatus

SESSION = "session_id"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # memory, CPU, open descriptors of this process
        self._received = Counter(
            "zapkeep_messages_received",
            "Messages received, by what the chatbot did",
            [SESSION, "outcome"],
            registry=self.registry,
        )
        self._sent = Counter(
            "zapkeep_messages_sent",
            "Outgoing messages settled, by outcome",
            [SESSION, "outcome"],
            registry=self.registry,
        )
        self._batch_rows = Counter(
            "zapkeep_mirror_rows", "Store rows mirrored to the database", [SESSION], registry=self.registry
        )
        self._batch_bytes = Counter(
            "zapkeep_mirror_bytes", "Bytes of store rows mirrored to the database", [SESSION], registry=self.registry
        )
        self._batch_seconds = Histogram(
            "zapkeep_mirror_batch_seconds",
            "Time to write one batch of store changes to the database",
            [SESSION],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self._sessions = SessionsCollector()
        self._webhooks = WebhooksCollector()
        self.registry.register(self._sessions)
        self.registry.register(self._webhooks)
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

    def session(self, session_id: str) -> SessionCounts:
        """What one session's pipeline and mirror count with (``bot.process.counters.MessageCounts``)."""
        return SessionCounts(self, session_id)

    def received(self, session_id: str, outcome: str) -> None:
        self._received.labels(session_id, outcome.split(":", 1)[0]).inc()  # "ignored:group" -> "ignored"

    def sent(self, session_id: str, outcome: str) -> None:
        self._sent.labels(session_id, outcome).inc()

    def mirrored(self, session_id: str, rows: int, size_bytes: int, seconds: float) -> None:
        self._batch_rows.labels(session_id).inc(rows)
        self._batch_bytes.labels(session_id).inc(size_bytes)
        self._batch_seconds.labels(session_id).observe(seconds)

    def watch(self, status: Callable[[], SessionStatus], db: Database, session_id: str) -> None:
        """Read this session's state at each scrape (a session watched again replaces the old view)."""
        self._sessions.add(session_id, status, db)

    def watch_webhooks(self, session_id: str, endpoints: Callable[[], list[EndpointStatus]]) -> None:
        self._webhooks.add(session_id, endpoints)

    def unwatch(self, session_id: str) -> None:
        """A session removed from this daemon: none of its samples is shown again."""
        self._sessions.remove(session_id)
        self._webhooks.remove(session_id)
        for counted in (self._received, self._sent, self._batch_rows, self._batch_bytes, self._batch_seconds):
            counted.remove_by_labels({SESSION: session_id})

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class SessionCounts:
    """One session's view of the shared counters: the pipeline and the mirror count without
    knowing which session they serve."""

    metrics: Metrics
    session_id: str

    def received(self, outcome: str) -> None:
        self.metrics.received(self.session_id, outcome)

    def sent(self, outcome: str) -> None:
        self.metrics.sent(self.session_id, outcome)

    def mirrored(self, rows: int, size_bytes: int, seconds: float) -> None:
        self.metrics.mirrored(self.session_id, rows, size_bytes, seconds)


@dataclass(frozen=True)
class _Watched:
    status: Callable[[], SessionStatus]
    db: Database


class SessionsCollector(Collector):
    """Every watched session's state, one family per metric and one sample per session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}

    def add(self, session_id: str, status: Callable[[], SessionStatus], db: Database) -> None:
        with self._lock:
            self._watched[session_id] = _Watched(status, db)

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._watched.pop(session_id, None)

    def describe(self) -> list:
        return []  # read at each scrape; nothing to describe ahead

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            watched = sorted(self._watched.items())
        one = [SESSION]
        state = GaugeMetricFamily("zapkeep_state", "1 for the session's current state", labels=[SESSION, "state"])
        connected = GaugeMetricFamily(
            "zapkeep_connected_seconds", "Seconds since the connection came up (0: not connected)", labels=one
        )
        reconnects = CounterMetricFamily("zapkeep_reconnects", "Connection drops and failed dials", labels=one)
        unreadable = CounterMetricFamily(
            "zapkeep_stored_rows_unreadable",
            "Stored rows found not to open (altered or corrupt): repaired by the owner, or refused at boot",
            labels=one,
        )
        owned = GaugeMetricFamily("zapkeep_lease_owned", "1 while this daemon owns the session", labels=one)
        token = GaugeMetricFamily("zapkeep_fencing_token", "The lease's fencing token (0: none)", labels=one)
        pending = GaugeMetricFamily(
            "zapkeep_mirror_pending_changes", "Store changes read, not yet in the database", labels=one
        )
        write_age = GaugeMetricFamily(
            "zapkeep_mirror_last_write_age_seconds", "Seconds since the last mirrored change", labels=one
        )
        database_up = GaugeMetricFamily(
            "zapkeep_database_up", "1 when the database answered this scrape (for this session)", labels=one
        )
        queued = GaugeMetricFamily("zapkeep_outbox_queued", "Replies and sends waiting in the outbox", labels=one)
        oldest_age = GaugeMetricFamily(
            "zapkeep_outbox_oldest_age_seconds", "Age of the oldest waiting message", labels=one
        )
        now = datetime.now(UTC)
        for session_id, view in watched:
            status = view.status()
            label = [session_id]
            for candidate in State:
                state.add_metric([session_id, candidate.value], 1.0 if candidate.value == status.state else 0.0)
            since = status.connected_since
            connected.add_metric(label, (now - since).total_seconds() if since else 0.0)
            reconnects.add_metric(label, status.reconnect_count)
            unreadable.add_metric(label, status.unreadable_rows)
            owned.add_metric(label, float(status.owns_session))
            token.add_metric(label, status.fencing_token or 0)
            pending.add_metric(label, status.mirror_pending_changes)
            last = status.last_mirrored_at
            write_age.add_metric(label, (now - last).total_seconds() if last else float("nan"))
            try:
                if status.database_unreachable_since is not None:  # known away: not waited for
                    raise ConnectionError("the database is unreachable")
                depth, oldest = view.db.outbox_depth(session_id)
            except Exception:  # the database is away: every other number still matters, most of all now
                database_up.add_metric(label, 0.0)
                continue
            database_up.add_metric(label, 1.0)
            queued.add_metric(label, depth)
            oldest_age.add_metric(label, (now - oldest).total_seconds() if oldest is not None else 0.0)
        yield from (state, connected, reconnects, unreadable, owned, token, pending, write_age, database_up)
        yield from (queued, oldest_age)


class OwnedCollector(Collector):
    def __init__(self, owned: Callable[[], int]) -> None:
        self._owned = owned

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("zapkeep_sessions_owned", "Sessions whose lease this instance holds", self._owned())


class WebhooksCollector(Collector):
    """Each session's WEBHOOK_URL deliveries, labelled by session and by the URL shown (scheme,
    host, path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, Callable[[], list[EndpointStatus]]] = {}

    def add(self, session_id: str, endpoints: Callable[[], list[EndpointStatus]]) -> None:
        with self._lock:
            self._watched[session_id] = endpoints

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._watched.pop(session_id, None)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            watched = sorted(self._watched.items())
        if not watched:
            return
        labels = [SESSION, "endpoint"]
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
        for session_id, endpoints in watched:
            for endpoint in endpoints():
                label = [session_id, endpoint.url]
                delivered.add_metric(label, endpoint.delivered)
                failed.add_metric(label, endpoint.failed_attempts)
                given_up.add_metric(label, endpoint.given_up)
                failing.add_metric(label, 1.0 if endpoint.failing_since is not None else 0.0)
        yield from (delivered, failed, given_up, failing)
